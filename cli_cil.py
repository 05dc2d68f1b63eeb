"""What every command line of the tool shares: numbers that must be finite, and the edge where a
fault becomes one line on stderr and exit code 2 (main_cil.py, grid_cil.py, bench_cil.py,
mask_to_submission.py). Faults are raised where they are found; this is where they are told.
"""

import contextlib
import math
import sys

import click

from data_cil import InputError, os_error_line

USAGE_EXIT = 2               # click's code for a usage error, and ours for every bad input
HELP_OPTIONS = dict(help_option_names=["-h", "--help"], max_content_width=100)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that refuses NaN and infinity: NaN passes every comparison of a range
    check, so `--lr nan` would reach training."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def finite(value, label):
    """`value` as a float when it is a finite number, else InputError naming `label`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{label}: {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise InputError(f"{label}: {value!r} is not a finite number")
    return number


def fail(line):
    """Print `error: line` on stderr and exit with USAGE_EXIT."""
    click.echo(f"error: {line}", err=True)
    sys.exit(USAGE_EXIT)


@contextlib.contextmanager
def one_line_errors(*kinds, debug=False):
    """Inside, InputError, a failed file operation (OSError) and the `kinds` given end the
    command with one line and USAGE_EXIT; with `debug`, they propagate with their traceback."""
    try:
        yield
    except (InputError, *kinds) as error:
        if debug:
            raise
        fail(str(error))
    except OSError as error:
        if debug:
            raise
        fail(os_error_line(error))


class OneLineUsage:
    """Mixed into a click command or group: a usage error (unknown option, bad value, missing
    argument) is one line, `error: ...` and exit code 2, like every other fault, instead of
    click's usage block; `--help` still shows the whole page."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as error:
            fail(" ".join(error.format_message().split()))
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class OneLineCommand(OneLineUsage, click.Command):
    """A click command whose usage errors are one line (OneLineUsage)."""
