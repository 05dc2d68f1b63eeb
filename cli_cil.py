"""What every command line of the tool shares: numbers that must be finite, and the edge where a
fault becomes one line on stderr and exit code 2, or 1 when memory ran out (main_cil.py,
grid_cil.py, bench_cil.py, mask_to_submission.py). Faults are raised where they are found; this
is where they are told.
"""

import contextlib
import math
import re
import sys

import click

from io_cil import InputError, os_error_line

USAGE_EXIT = 2               # click's code for a usage error, and ours for every bad input
MEMORY_EXIT = 1              # out of memory: the input may be fine, the machine too small
# How the backends name running out of memory: TensorFlow's ResourceExhaustedError, torch's
# OutOfMemoryError (a RuntimeError); XLA (JAX) raises a runtime error whose text says so.
MEMORY_ERRORS = ("ResourceExhaustedError", "OutOfMemoryError")
XLA_MEMORY_STATUS = "RESOURCE_EXHAUSTED"
MEMORY_HINT = "ask for less at once, or run on a machine with more memory"
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


def fail(line, code=USAGE_EXIT):
    """Print `error: line` on stderr and exit with `code`."""
    click.echo(f"error: {line}", err=True)
    sys.exit(code)


def out_of_memory_line(error, hint):
    """The one line telling that `error` is the machine's memory running out, and `hint` (what
    to lower); None for any other error."""
    text = str(error)
    if not (isinstance(error, MemoryError) or type(error).__name__ in MEMORY_ERRORS
            or XLA_MEMORY_STATUS in text[:200]):
        return None
    detail = re.search(r"OOM when allocating tensor with shape\[[^\]]*\]|Unable to allocate "
                       r"[^\n]*?with shape \([^)]*\)", text)
    reason = detail.group(0) if detail else type(error).__name__
    return f"out of memory ({reason}); {hint}"


@contextlib.contextmanager
def one_line_errors(*kinds, debug=False, memory_hint=MEMORY_HINT):
    """Inside, InputError, a failed file operation (OSError) and the `kinds` given end the
    command with one line and USAGE_EXIT, running out of memory with one line (and
    `memory_hint`) and MEMORY_EXIT; with `debug`, they propagate with their traceback."""
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
    except Exception as error:   # only running out of memory is told here; the rest goes on
        line = out_of_memory_line(error, memory_hint)
        if debug or line is None:
            raise
        fail(line, MEMORY_EXIT)


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
