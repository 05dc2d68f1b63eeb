"""Grid searches: one job per combination of main_cil.py options, one folder per job, one table.

    python grid_cil.py grid.json --scheduler lsf|slurm|local [--dry-run] [--parallel K]
    python grid_cil.py summary jobs/<grid-name> [--metric patch_f1]

grid.json maps main_cil.py options to a list of values (varied) or one value (fixed), plus an
optional "resources" object for the scheduler (cores, mem_per_core, walltime, gpu_clause):

    {"loss": ["bce", "bce_dice"], "filters": [16, 32], "gpus": [1], "epochs": 60,
     "resources": {"walltime": "8:00"}}

Each job gets jobs/<grid-name>/<job-id>/ with `args` (one argument per line), `submit.sh` (how it
was submitted), `run/` (the run folder: config, model, metrics, stdout, stderr, exit code) and
`valid_output/` (validation predictions).
Job ids are made of the varied values, so they stay the same when the grid is run again; a rerun
skips finished and submitted jobs, resumes failed ones that left a checkpoint and restarts the
others.
"""

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

import main_cil

JOBS_DIR = Path("jobs")
SCHEDULERS = ("lsf", "slurm", "local")
SCRIPTS = {"lsf": Path("cluster/bsub_train.sh"), "slurm": Path("cluster/sbatch_train.sh")}
SUBMITTERS = {"lsf": "bsub", "slurm": "sbatch"}
RESOURCES = {"cores": "CORES", "mem_per_core": "MEM_PER_CORE", "walltime": "WALLTIME",
             "gpu_clause": "GPU_CLAUSE"}       # grid.json "resources" key -> script variable
# The grid decides these itself: every job's run folder and outputs stay in the job's folder.
RESERVED = ("logs-dir", "run-name", "resume", "force", "valid-output-dir", "submit-output-dir")
RUN = "run"                                            # the run folder's name inside a job
DEFAULT_METRIC = "patch_f1"


class GridError(Exception):
    """A problem with the grid file, the jobs folder or the scheduler, shown as one line."""


def option_names():
    """{name: is_flag} of main_cil.py's options, names as on the command line without dashes."""
    return {param.opts[0].lstrip("-"): param.is_flag for param in main_cil.main.params}


def negated_flags():
    """Flags that have a --no- form, like batchnorm."""
    return {opt.lstrip("-") for param in main_cil.main.params for opt in param.secondary_opts}


def load_grid(path):
    """(varied {option: values}, fixed {option: value}, resources {} ) from a grid file."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GridError(f"{path}: not a readable JSON grid ({error})") from None
    if not isinstance(grid, dict):
        raise GridError(f"{path}: expected a JSON object of option: [values]")
    resources = grid.pop("resources", {})
    unknown = set(resources) - set(RESOURCES)
    if unknown:
        raise GridError(f"{path}: resources {', '.join(sorted(unknown))} unknown; use "
                        f"{', '.join(RESOURCES)}")
    known = option_names()
    varied, fixed = {}, {}
    for key, value in grid.items():
        name = key.replace("_", "-")
        if name in RESERVED or name not in known:
            allowed = ", ".join(sorted(set(known) - set(RESERVED)))
            raise GridError(f"{path}: '{key}' is not an option a grid may set; options: {allowed}")
        (varied if isinstance(value, list) else fixed)[name] = value
    return varied, fixed, resources


def option_args(name, value, is_flag):
    """Command-line words for one option value: --name v, --flag / --no-flag, or nothing."""
    if is_flag:
        if value is True:
            return [f"--{name}"]
        return [f"--no-{name}"] if f"no-{name}" in negated_flags() else []
    if name == "aug":                       # repeatable KEY=VALUE
        return [word for item in value for word in ("--aug", item)]
    return [f"--{name}", str(value)]


def job_id(combination):
    """A folder name from the varied values: loss-bce__filters-32."""
    parts = [f"{name}-{value}" for name, value in combination.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(parts)) or "single"


def expand(varied, fixed):
    """[(job id, {option: value})] for every combination, in the grid file's order."""
    flags = option_names()
    jobs = []
    for values in itertools.product(*varied.values()):
        combination = dict(zip(varied, values))
        options = {**fixed, **combination}
        args = [word for name, value in options.items()
                for word in option_args(name, value, flags[name])]
        jobs.append((job_id(combination), combination, args))
    return jobs


def job_status(job_dir):
    """finished, failed (exit N), submitted, or new."""
    exit_file = job_dir / RUN / "exit_code"
    if exit_file.is_file():
        code = exit_file.read_text().strip()
        return "finished" if code == "0" else f"failed (exit {code})"
    return "submitted" if (job_dir / "submitted").is_file() else "new"


def job_arguments(job_dir, args):
    """The arguments to (re)start a job: its options, or --resume for a failed job that left a
    checkpoint, or its options with --force over a failed job's partial run. Validation and
    test outputs go inside the job folder: all jobs share the run name RUN, and --force must
    not delete another job's outputs."""
    run_dir = job_dir / RUN
    outputs = ["--valid-output-dir", str(job_dir / "valid_output"),
               "--submit-output-dir", str(job_dir / "submit_output")]
    if (run_dir / "checkpoint/state.json").is_file():
        return ["--resume", str(run_dir), *outputs]
    if (run_dir / "config.json").is_file():
        return [*args, *outputs, "--force"]
    return [*args, *outputs]


def job_environment(job_dir):
    """What cluster/run_job.sh needs to put a job's run folder inside its job folder."""
    return {"LOGS_DIR": str(job_dir), "RUN_NAME": RUN}


def resource_environment(resources, gpus):
    env = {RESOURCES[key]: str(value) for key, value in resources.items()}
    env["GPUS"] = str(gpus)
    return env


def write_job(job_dir, args, submit_line):
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "args").write_text("".join(f"{word}\n" for word in args))
    (job_dir / "submit.sh").write_text(f"#!/usr/bin/env bash\n# {job_dir.name}: how this job was "
                                       f"submitted\ncd {shlex.quote(str(Path.cwd()))}\n"
                                       f"{submit_line}\n")


def shell_line(env, command):
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()),
                     *map(shlex.quote, command)])


def run_local(job_dir, args):
    """Run one job here, output into its run folder; returns its exit code."""
    run_dir = job_dir / RUN
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**job_environment(job_dir), "PYTHON": sys.executable}
    with open(run_dir / "stdout", "w") as out, open(run_dir / "stderr", "w") as err:
        return subprocess.run(["bash", "cluster/run_job.sh", *args], stdout=out, stderr=err,
                              env={**os.environ, **env}).returncode


def submit(env, command, job_dir):
    """Run a submission command; the scheduler's answer is kept as the job's `submitted` mark."""
    result = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True)
    if result.returncode:
        raise GridError(f"{' '.join(command)} failed ({result.returncode}): "
                        f"{(result.stderr or result.stdout).strip()}")
    for folder in job_dir if isinstance(job_dir, list) else [job_dir]:
        (folder / "submitted").write_text(result.stdout)
    return result.stdout.strip()


def run_grid(grid_file, scheduler, *, dry_run=False, parallel=1, jobs_dir=JOBS_DIR):
    if not Path("main_cil.py").is_file():
        raise GridError("run grid_cil.py from the repository root, where main_cil.py is: jobs "
                        "and cluster scripts use paths relative to it")
    varied, fixed, resources = load_grid(grid_file)
    if scheduler != "local" and not dry_run and not shutil.which(SUBMITTERS[scheduler]):
        raise GridError(f"{SUBMITTERS[scheduler]} not found: --scheduler {scheduler} needs an "
                        f"{scheduler.upper()} login node; use --scheduler local here")
    grid_dir = jobs_dir / Path(grid_file).stem
    grid_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid_file, grid_dir / "grid.json")
    todo = []
    for name, combination, args in expand(varied, fixed):
        job_dir = grid_dir / name
        status = job_status(job_dir)
        if status in ("finished", "submitted"):
            click.echo(f"{name}: {status}, skipped")
            continue
        todo.append((job_dir, job_arguments(job_dir, args), int({**fixed, **combination}.get(
            "gpus", 1) or 0)))
    if not todo:
        click.echo(f"{grid_dir}: nothing to run")
        return grid_dir
    if scheduler == "local":
        _run_all_locally(todo, dry_run, parallel)
    elif scheduler == "lsf":
        for job_dir, args, gpus in todo:
            env = {**resource_environment(resources, gpus), **job_environment(job_dir),
                   "JOB_NAME": f"{grid_dir.name}/{job_dir.name}"}
            command = ["bash", str(SCRIPTS["lsf"]), *args]
            write_job(job_dir, args, shell_line(env, command))
            click.echo(shell_line(env, command) if dry_run else
                       f"{job_dir.name}: {submit(env, command, job_dir)}")
    else:
        _submit_slurm_arrays(grid_dir, todo, resources, dry_run)
    return grid_dir


def _run_all_locally(todo, dry_run, parallel):
    for job_dir, args, _ in todo:
        write_job(job_dir, args, shell_line(job_environment(job_dir),
                                            ["bash", "cluster/run_job.sh", *args]))
        if dry_run:
            click.echo((job_dir / "submit.sh").read_text().splitlines()[-1])
    if dry_run:
        return
    with ThreadPoolExecutor(parallel) as pool:
        for (job_dir, _, _), code in zip(todo, pool.map(lambda job: run_local(job[0], job[1]),
                                                        todo)):
            click.echo(f"{job_dir.name}: {'finished' if code == 0 else f'failed (exit {code})'}")


def _submit_slurm_arrays(grid_dir, todo, resources, dry_run):
    """One job array per GPU count (an array shares its resources)."""
    for gpus in sorted({gpus for _, _, gpus in todo}):
        group = [(job_dir, args) for job_dir, args, g in todo if g == gpus]
        listing = grid_dir / f"array-gpus{gpus}.txt"
        listing.write_text("".join(f"{job_dir}\n" for job_dir, _ in group))
        env = {**resource_environment(resources, gpus), "ARRAY_JOBS": str(listing),
               "JOB_NAME": grid_dir.name}
        command = ["bash", str(SCRIPTS["slurm"])]
        for index, (job_dir, args) in enumerate(group):
            write_job(job_dir, args, f"# task {index} of this array\n{shell_line(env, command)}")
        if dry_run:
            click.echo(shell_line(env, command))
        else:
            click.echo(f"array of {len(group)} jobs with {gpus} GPU(s): "
                       f"{submit(env, command, [job_dir for job_dir, _ in group])}")


# ---------------------------------------------------------------------------------------------
# Summary


def _read_json(path):
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(grid_dir, metric=DEFAULT_METRIC):
    """(columns, rows) of every job of a grid, finished ones by `metric`, best first."""
    varied, fixed, _ = load_grid(grid_dir / "grid.json")
    finished, others = [], []
    for name, combination, _ in expand(varied, fixed):
        run_dir = grid_dir / name / RUN
        metrics, config = _read_json(run_dir / "metrics.json"), _read_json(run_dir / "config.json")
        valid = metrics.get("valid", {})
        row = dict(job=name, status=job_status(grid_dir / name), **combination,
                   **{metric: valid.get(metric), "f1": valid.get("f1"),
                      "best_epoch": metrics.get("best_epoch"),
                      "epochs": metrics.get("epochs_run"),
                      "s_per_epoch": metrics.get("seconds_per_epoch"),
                      "gpus": config.get("gpus") if config else combination.get("gpus")})
        (finished if row["status"] == "finished" and row[metric] is not None
         else others).append(row)
    finished.sort(key=lambda row: row[metric], reverse=True)
    columns = ["job", "status", *varied, metric, "f1", "best_epoch", "epochs", "s_per_epoch",
               "gpus"]
    return columns, finished + others


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
    (grid_dir / "post_output.md").write_text(markdown)
    (grid_dir / "post_output.tsv").write_text(
        "\n".join("\t".join(line) for line in [columns, *cells]) + "\n")
    return markdown


# ---------------------------------------------------------------------------------------------
# Command line


class GridCommands(click.Group):
    """`grid_cil.py GRID.json ...` runs a grid; `grid_cil.py summary FOLDER` tabulates one."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=GridCommands)
def main():
    """Run a grid of main_cil.py jobs, or summarise one."""


def _report(action):
    try:
        action()
    except GridError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


@main.command("run")
@click.argument("grid_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="local", show_default=True,
              help="lsf: one bsub per job; slurm: one sbatch array; local: run here.")
@click.option("--dry-run", is_flag=True, help="Write the job folders, print the commands, submit "
              "nothing.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Local jobs run at the same time.")
@click.option("--jobs-dir", type=click.Path(path_type=Path), default=JOBS_DIR, show_default=True,
              help="Where grid folders go.")
def run_command(grid_file, scheduler, dry_run, parallel, jobs_dir):
    """Expand GRID_FILE into jobs and run or submit the ones not finished."""
    _report(lambda: run_grid(grid_file, scheduler, dry_run=dry_run, parallel=parallel,
                             jobs_dir=jobs_dir))


@main.command("summary")
@click.argument("grid_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--metric", default=DEFAULT_METRIC, show_default=True,
              help="Validation metric (a key of metrics.json 'valid') to sort by.")
def summary_command(grid_dir, metric):
    """Write post_output.md and .tsv for GRID_DIR and print the table."""
    _report(lambda: click.echo(write_summary(grid_dir, metric)))


if __name__ == "__main__":
    main()
