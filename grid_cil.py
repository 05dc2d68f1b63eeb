"""Grid searches: one job per combination of main_cil.py options, run here or submitted to LSF or
SLURM (one job's life is jobs_cil.py), and one table of the results; and the command line of
both (grid_cil.py is what the cluster scripts and the schedulers call).

    python grid_cil.py grid.json [--scheduler local|lsf|slurm] [--dry-run] [--parallel K]
    python grid_cil.py summary jobs/<grid> [--metric patch_f1]
    python grid_cil.py submit lsf|slurm -- [main_cil.py options]   # one run (cluster/*.sh)
    python grid_cil.py job RUN_FOLDER                             # inside a job

grid.json maps main_cil.py options to a list of values (varied) or one value (fixed), plus an
optional "resources" object for the scheduler:

    {"loss": ["bce", "bce_dice"], "filters": [16, 32], "gpus": 1, "epochs": 60,
     "resources": {"walltime": "8:00", "cores": 4}}

Every value is checked by the option's own type, and every job's settings are resolved, before
anything is submitted. Each job is the run folder jobs/<grid>/<job-id>/. Job ids are made of the
varied values, so they stay the same when
the grid runs again; a rerun skips finished, pending and running jobs, resumes failed or lost
ones that left a checkpoint, and moves the others aside (into .trash/) before starting them anew.
"""

import hashlib
import itertools
import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from cli_cil import HELP_OPTIONS, OneLineUsage, one_line_errors
from io_cil import InputError, unique_keys, write_json, write_text
from jobs_cil import (check_resources, checked_settings, claim, job_argv, job_status, job_words,
                      next_action, plain, prepare, record_submission, run_array_task, run_here,
                      run_job, scheduler_available, submit_lsf, submit_single, submit_slurm_array)
from options_cil import monitored_metrics
from runs_cil import FOLD_PREFIX, RUN_NAME, fold_folder, own_folder, path, read_metrics
from settings_cil import option_for, typed_value

JOBS_DIR = Path("jobs")
SCHEDULERS = ("lsf", "slurm", "local")
# The grid places every job's run and outputs itself; a grid file may not set these.
RESERVED = ("run_name", "logs_dir", "valid_output_dir", "submit_output_dir", "resume", "force",
            "config")
JOB_ID_LENGTH = 80           # longer ids, or ids with other characters, end in a hash instead
DEFAULT_METRIC = "patch_f1"


# ---------------------------------------------------------------------------------------------
# Grid files


def load_grid(path_given):
    """(name, varied {option: [typed values]}, fixed {option: typed value}, resources)."""
    grid_path = Path(path_given)
    name = grid_path.stem
    if not RUN_NAME.fullmatch(name):
        raise InputError(f"{grid_path}: a grid's name (its file name) must be letters, digits, "
                         "'.', '_' and '-', starting with a letter or digit")
    try:
        grid = json.loads(grid_path.read_text(), object_pairs_hook=unique_keys)
    except (OSError, ValueError) as error:
        raise InputError(f"{grid_path}: not a readable JSON grid ({error})") from None
    if not isinstance(grid, dict):
        raise InputError(f"{grid_path}: expected a JSON object of option: [values]")
    resources = check_resources(grid.pop("resources", {}), grid_path)
    if not grid:
        raise InputError(f"{grid_path}: sets no option; a grid needs at least one, e.g. "
                         '{"loss": ["bce", "dice"]}')
    varied, fixed = {}, {}
    for key, value in grid.items():
        option = option_for(key, grid_path)
        if option.name in RESERVED:
            raise InputError(f"{grid_path}: '{key}' is not an option a grid may set: the grid "
                             "places each job's run itself")
        if isinstance(value, list):        # for aug: each item is one job's overrides
            if not value:
                raise InputError(f"{grid_path}: '{key}' has an empty list of values")
            varied[option.name] = [typed_value(option, item, grid_path) for item in value]
        else:
            fixed[option.name] = typed_value(option, value, grid_path)
    return name, varied, fixed, resources


def _canonical(value):
    return json.dumps(value, sort_keys=True, default=str)


def job_id(combination):
    """A folder name from the varied values: loss-bce__filters-32; a hash ends the ids that
    would be long or lose characters, so two combinations never share one."""
    if not combination:
        return "single"
    readable = "__".join(f"{name.replace('_', '-')}-{plain(value)}"
                         for name, value in combination.items())
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", readable).lstrip("._-")
    if safe == readable and len(safe) <= JOB_ID_LENGTH:
        return safe
    digest = hashlib.sha1(_canonical(combination).encode()).hexdigest()[:10]
    return f"{safe[:JOB_ID_LENGTH - 11]}-{digest}"


def combinations(varied):
    """Every combination of the varied values, in the grid file's order."""
    for values in itertools.product(*varied.values()):
        yield dict(zip(varied, values))


def job_folder_name(combination):
    """The job's folder inside the grid: its id; a fold of a varied "fold" is a fold run,
    <id of the other values>/fold-<i>, so the folds of one setting share one cross-validated
    run that gathers them."""
    if "fold" not in combination:
        return job_id(combination)
    rest = {key: value for key, value in combination.items() if key != "fold"}
    return f"{job_id(rest)}/{FOLD_PREFIX}{combination['fold']}"


def expand(name, varied, fixed):
    """[(job id, combination, words)] for every combination, in the grid file's order; each
    job's settings are resolved, so a combination that cannot run is an error now."""
    jobs, seen = [], {}
    for combination in combinations(varied):
        identity = job_folder_name(combination)
        if identity in seen:
            raise InputError(f"{name}: two jobs would be {identity}: {_canonical(seen[identity])} "
                             f"and {_canonical(combination)}; drop the repeated value")
        seen[identity] = combination
        words = job_words({**fixed, **combination})
        checked_settings(words, f"{name}: job {identity}")
        jobs.append((identity, combination, words))
    return jobs


# ---------------------------------------------------------------------------------------------
# Running a grid


def run_grid(grid_file, scheduler, *, dry_run=False, parallel=1, jobs_dir=JOBS_DIR):
    """Run or submit the grid's jobs that are not finished or queued; returns the number of
    local jobs that failed. A dry run prints what would run and creates nothing."""
    name, varied, fixed, resources = load_grid(grid_file)
    jobs = expand(name, varied, fixed)
    scheduler_available(scheduler, dry_run)
    grid_dir = Path(jobs_dir) / name
    if not dry_run:
        own_folder(grid_dir, "grid folder", "rename the grid file or pass another --jobs-dir")
        write_json(grid_dir / "grid.json", json.loads(Path(grid_file).read_text()))
    outputs = ["--valid-output-dir", str(grid_dir / "valid_output"),
               "--submit-output-dir", str(grid_dir / "submit_output")]
    todo = []
    for identity, combination, words in jobs:
        folder = grid_dir / identity
        placement = (grid_dir, identity.split("/")[0])
        action = next_action(folder) if dry_run else prepare(
            folder, [*words, *outputs], [grid_dir / "valid_output" / identity,
                                         grid_dir / "submit_output" / identity], placement)
        if action is None:
            click.echo(f"{identity}: {job_status(folder)}, skipped")
            continue
        if not dry_run and not claim(folder, scheduler):
            click.echo(f"{identity}: taken by another grid call, skipped")
            continue
        gpus = {**fixed, **combination}.get("gpus") or 0
        todo.append((folder, gpus, action, identity))
    if not todo:
        click.echo(f"{grid_dir}: nothing to run")
        return 0
    if scheduler == "local":
        return _run_locally(todo, dry_run, parallel)
    if scheduler == "lsf":
        for folder, gpus, action, identity in todo:
            answer = submit_lsf(folder, f"{name}/{identity}", resources, gpus, dry_run)
            click.echo(f"{identity} ({action}): {answer}" if not dry_run else answer)
        return 0
    for gpus in sorted({job[1] for job in todo}):
        group = [job for job in todo if job[1] == gpus]
        answer = submit_slurm_array(grid_dir, [job[0] for job in group], name, resources, gpus,
                                    dry_run)
        click.echo(answer if dry_run else f"{answer} with {gpus} GPU(s): "
                   f"{', '.join(job[3] for job in group)}")
    return 0


def _run_locally(todo, dry_run, parallel):
    """The jobs run here, `parallel` at a time; returns how many failed."""
    if dry_run:
        for folder, _, action, identity in todo:
            click.echo(f"{identity} ({action}): {shlex.join(job_argv(folder))}")
        return 0

    def one(job):
        folder = job[0]
        record_submission(folder, "local", "local")
        return subprocess.run(job_argv(folder)).returncode

    failed = 0
    with ThreadPoolExecutor(parallel) as pool:
        for (_, _, action, identity), code in zip(todo, pool.map(one, todo)):
            click.echo(f"{identity} ({action}): "
                       f"{'finished' if code == 0 else f'failed (exit {code})'}")
            failed += code != 0
    return failed


# ---------------------------------------------------------------------------------------------
# Summary


def summary_rows(grid_dir, metric=DEFAULT_METRIC):
    """(columns, rows) of every job of a grid, finished ones by `metric`, best first. A
    cross-validated job is ranked by the mean over its folds, with their spread (sd), and shows
    the out-of-fold value over all images; folds run as jobs of their own count as one row."""
    known = sorted({*monitored_metrics(1), *monitored_metrics(2)})
    if metric not in known:
        raise InputError(f"--metric {metric}: not a metric the runs record; choose one of "
                         f"{', '.join(known)}")
    if not (grid_dir / "grid.json").is_file():
        raise InputError(f"{grid_dir}: not a grid folder (no grid.json); pass jobs/<grid>, the "
                         "folder grid_cil.py printed")
    _, varied, _, _ = load_grid(grid_dir / "grid.json")
    shown = [key for key in varied if key != "fold"]
    finished, others, seen = [], [], set()
    for combination in combinations(varied):     # what ran, not checked again
        identity = job_folder_name(combination).split("/")[0]
        if identity in seen:
            continue
        seen.add(identity)
        folder = grid_dir / identity
        row = dict(job=identity, **{key: plain(combination[key]) for key in shown})
        try:
            row.update(_metric_cells(folder, varied, metric))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise InputError(f"{path(folder, 'metrics')}: damaged (not as the tool writes it); "
                             f"python main_cil.py --resume {folder} writes it again") from None
        (finished if row["status"] == "finished" and row[metric] is not None
         else others).append(row)
    finished.sort(key=lambda row: row[metric], reverse=True)
    rows = finished + others
    spread = ["sd", "all_images"] if any("sd" in row for row in rows) else []
    columns = ["job", "status", *shown, *[c for c in (metric, *spread, "f1", "best_epoch",
                                                     "epochs", "s_per_epoch") if c not in shown]]
    return columns, rows


def _metric_cells(folder, varied, metric):
    """A job's status and result cells: a cross-validated job's fold mean and spread and its
    out-of-fold value, another's validation values, training length and speed."""
    metrics = read_metrics(folder)
    cross = metrics.get("cross_validation")
    if cross:
        spread = cross["spread"].get(metric, {})
        return dict(status="finished", **{metric: _number(spread.get("mean")),
                                          "sd": _number(spread.get("sd")),
                                          "all_images": _number(cross["oof"].get(metric))},
                    f1=_number(cross["oof"].get("f1")), best_epoch=cross["median_best_epoch"])
    valid = metrics.get("valid", {})
    return dict(status=_status(folder, varied), **{metric: _number(valid.get(metric))},
                f1=_number(valid.get("f1")), best_epoch=metrics.get("best_epoch"),
                epochs=metrics.get("epochs_run"), s_per_epoch=metrics.get("seconds_per_epoch"))


def _number(value):
    """A recorded metric as a float, None when missing; ValueError when it is no number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    return float(value)


def _status(folder, varied):
    """A job's status; for folds run as jobs: how many finished, and the command that gathers
    them once all have."""
    if "fold" not in varied:
        return job_status(folder)
    states = [job_status(fold_folder(folder, fold)) for fold in varied["fold"]]
    done = states.count("finished")
    if done < len(states):
        return f"{done}/{len(states)} folds finished"
    return f"folds finished; gather: python main_cil.py --resume {folder}"


def _cell(value):
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)   # 0.8826, 26.35


def write_summary(grid_dir, metric=DEFAULT_METRIC):
    """post_output.md and post_output.tsv in the grid folder; returns the Markdown."""
    columns, rows = summary_rows(grid_dir, metric)
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    markdown = "\n".join(["| " + " | ".join(columns) + " |",
                          "|" + "---|" * len(columns),
                          *("| " + " | ".join(line) + " |" for line in cells)]) + "\n"
    write_text(grid_dir / "post_output.md", markdown)
    write_text(grid_dir / "post_output.tsv",
               "\n".join("\t".join(line) for line in [columns, *cells]) + "\n")
    return markdown


# ---------------------------------------------------------------------------------------------
# Command line


class GridCommands(OneLineUsage, click.Group):
    """`grid_cil.py GRID.json ...` runs a grid; `grid_cil.py summary FOLDER` tabulates one."""

    def format_usage(self, ctx, formatter):
        formatter.write_usage("grid_cil.py", "GRID.json [--scheduler local|lsf|slurm] [--dry-run] "
                                             "[--parallel K] [--jobs-dir DIR]")
        formatter.write_usage("grid_cil.py", "summary|submit|here|job ... (see COMMAND --help)",
                              prefix="       ")

    def format_commands(self, ctx, formatter):
        """Every command with the whole first line of its help, never cut short."""
        rows = [(name, command.help.splitlines()[0]) for name, command in self.commands.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=GridCommands, context_settings=HELP_OPTIONS)
def main():
    """Run a grid of main_cil.py jobs, submit one run to a cluster, or summarise a grid."""


def _report(action):
    """Run `action`; a fault is one line and exit 2, an int it returns is the exit code."""
    with one_line_errors(InputError):
        result = action()
    if isinstance(result, int):
        sys.exit(result)


@main.command("run")
@click.argument("grid_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="local", show_default=True,
              help="lsf: one bsub per job; slurm: one sbatch array; local: run here.")
@click.option("--dry-run", is_flag=True, help="Print the commands, submit nothing.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local jobs run at the same time.")
@click.option("--jobs-dir", type=click.Path(path_type=Path), default=JOBS_DIR, show_default=True,
              help="Where grid folders go.")
def run_command(grid_file, scheduler, dry_run, parallel, jobs_dir):
    """Expand GRID_FILE into jobs and run or submit the ones not finished."""
    def run_and_count():
        failed = run_grid(grid_file, scheduler, dry_run=dry_run, parallel=parallel,
                          jobs_dir=jobs_dir)
        if failed:
            click.echo(f"{failed} local job(s) failed; their stderr files say why", err=True)
        return 1 if failed else None

    _report(run_and_count)


@main.command("summary")
@click.argument("grid_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--metric", default=DEFAULT_METRIC, show_default=True,
              help="Validation metric (a key of metrics.json 'valid') to sort by.")
def summary_command(grid_dir, metric):
    """Write post_output.md and .tsv for GRID_DIR and print the table."""
    _report(lambda: click.echo(write_summary(grid_dir, metric)))


@main.command("submit", context_settings=dict(ignore_unknown_options=True))
@click.argument("scheduler", type=click.Choice(("lsf", "slurm")))
@click.argument("words", nargs=-1, type=click.UNPROCESSED)
@click.option("--dry-run", is_flag=True, help="Print the command, submit nothing.")
def submit_command(scheduler, words, dry_run):
    """Submit one main_cil.py run with WORDS (after --) to LSF or SLURM."""
    _report(lambda: submit_single(scheduler, words, dry_run))


@main.command("here", context_settings=dict(ignore_unknown_options=True))
@click.argument("words", nargs=-1, type=click.UNPROCESSED)
def here_command(words):
    """Inside an allocation: run one main_cil.py run with WORDS (after --) as a job."""
    _report(lambda: run_here(words))


@main.command("job")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--array", "listing", is_flag=True, help="FOLDER is a SLURM array's task list.")
def job_command_line(folder, listing):
    """Inside a job: run main_cil.py in FOLDER as its job.json says; record the exit code."""
    _report(lambda: run_array_task(folder) if listing else run_job(folder))


if __name__ == "__main__":
    main()
