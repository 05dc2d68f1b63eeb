"""Grid searches and cluster jobs: one run folder per combination of main_cil.py options, run
here or submitted to LSF or SLURM, and one table of the results.

    python grid_cil.py grid.json [--scheduler local|lsf|slurm] [--dry-run] [--parallel K]
    python grid_cil.py summary jobs/<grid> [--metric patch_f1]
    python grid_cil.py submit lsf|slurm -- [main_cil.py options]   # one run (cluster/*.sh)
    python grid_cil.py job RUN_FOLDER                             # inside a job

grid.json maps main_cil.py options to a list of values (varied) or one value (fixed), plus an
optional "resources" object for the scheduler:

    {"loss": ["bce", "bce_dice"], "filters": [16, 32], "gpus": 1, "epochs": 60,
     "resources": {"walltime": "8:00", "cores": 4}}

Every value is checked by the option's own type, and every job's settings are resolved, before
anything is submitted. Each job is the run folder jobs/<grid>/<job-id>/, holding `job.json`
(its arguments as JSON), `submitted.json` (where it went), the run's files, `stdout`, `stderr`
and `exit_code`. A job command never passes a value through a shell: the job reads its
arguments from its folder. Job ids are made of the varied values, so they stay the same when
the grid runs again; a rerun skips finished, pending and running jobs, resumes failed or lost
ones that left a checkpoint, and moves the others aside (into .trash/) before starting them anew.
"""

import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import click

from cli_cil import HELP_OPTIONS, OneLineUsage, one_line_errors
from io_cil import InputError, unique_keys, write_json, write_json_once, write_text
from runs_cil import (FILES, FOLD_PREFIX, OWNER_FILE, RUN_NAME, STOP_SIGNALS, check_run_name,
                      fold_folder, host_name, lock_owner, own_folder, path, process_alive,
                      read_exit_code, read_json, read_metrics, read_state, set_aside)
from options_cil import CONTEXT, OPTIONS, flag_word, monitored_metrics
from settings_cil import option_for, resolve_settings, typed_value

REPO = Path(__file__).resolve().parent
JOBS_DIR = Path("jobs")
SCHEDULERS = ("lsf", "slurm", "local")
SUBMITTERS = {"lsf": "bsub", "slurm": "sbatch"}
# The grid places every job's run and outputs itself; a grid file may not set these.
RESERVED = ("run_name", "logs_dir", "valid_output_dir", "submit_output_dir", "resume", "force",
            "config")
RESOURCES = dict(            # grid.json "resources" key: default, meaning
    cores=(2, "CPU cores (LSF -n, SLURM --cpus-per-task); TensorFlow uses as many threads"),
    mem_per_core=(4096, "MB per core (LSF rusage[mem=...], SLURM --mem-per-cpu)"),
    walltime=("4:00", "H:MM (hours:minutes) or minutes, the same for LSF and SLURM"),
    gpu_clause=(None, "LSF: rusage (ngpus_excl_p) or gpu (-gpu num=N); SLURM: gres or gpus"),
    partition=(None, "SLURM --partition, LSF -q (queue)"),
    account=(None, "SLURM --account, LSF -P (project)"),
    qos=(None, "SLURM --qos (LSF has none)"),
    stop_warning=(5, "minutes before the time limit at which the job is asked to checkpoint and "
                     "stop (LSF -wa USR2 -wt, SLURM --signal=B:TERM@)"),
)
GPU_CLAUSES = {"lsf": ("rusage", "gpu"), "slurm": ("gres", "gpus")}
# Environment variables of the single-run scripts (cluster/*.sh) -> resources
RESOURCE_VARIABLES = dict(cores="CORES", mem_per_core="MEM_PER_CORE", walltime="WALLTIME",
                          gpu_clause="GPU_CLAUSE", partition="PARTITION", account="ACCOUNT",
                          qos="QOS", stop_warning="STOP_WARNING")
WHOLE_RESOURCES = ("cores", "mem_per_core", "stop_warning")
WALLTIME = re.compile(r"(?:(\d+):([0-5]\d)|(\d+))")        # H:MM or minutes
JOB_ID_LENGTH = 80           # longer ids, or ids with other characters, end in a hash instead
DEFAULT_METRIC = "patch_f1"
SUBMITTED = "submitted.json"
JOB_FIX = "submit the job again (run the grid again, or the cluster script)"
SUBMITTED_FIX = "delete it; the grid then counts the job as not submitted and runs it again"
ARRAYS_DIR = "arrays"        # SLURM: one immutable task list per submitted array
SCHEDULER_OUTPUT = "scheduler"   # SLURM's and LSF's own output, per job


class GridError(Exception):
    """A problem with the grid file, the jobs folder or the scheduler, shown as one line."""


# ---------------------------------------------------------------------------------------------
# Grid files


def _main_command():
    return click.Command("main_cil.py", params=OPTIONS, context_settings=CONTEXT)


def check_resources(resources, where):
    if not isinstance(resources, dict):
        raise GridError(f"{where}: resources {json.dumps(resources)}: expected an object such "
                        'as {"walltime": "8:00", "cores": 4}')
    unknown = set(resources) - set(RESOURCES)
    if unknown:
        raise GridError(f"{where}: resources {', '.join(sorted(unknown))} unknown; use "
                        f"{', '.join(RESOURCES)}")
    resolved = {key: resources.get(key, default) for key, (default, _) in RESOURCES.items()}
    for key in WHOLE_RESOURCES:
        value = resolved[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise GridError(f"{where}: resources {key} {value!r}: expected a whole number from 1")
    hours, minutes = walltime_parts(resolved["walltime"], where)
    if resolved["stop_warning"] >= hours * 60 + minutes:
        raise GridError(f"{where}: resources stop_warning {resolved['stop_warning']} (minutes) "
                        f"must be shorter than the walltime {resolved['walltime']}")
    for key in ("partition", "account", "qos", "gpu_clause"):
        value = resolved[key]
        if value is not None and not (isinstance(value, str) and RUN_NAME.fullmatch(value)):
            raise GridError(f"{where}: resources {key} {value!r}: expected a name of letters, "
                            "digits, '.', '_' and '-'")
    return resolved


def walltime_parts(value, where="walltime"):
    """(hours, minutes) of a walltime given as "H:MM" or as minutes."""
    match = WALLTIME.fullmatch(str(value))
    if match and not isinstance(value, bool):
        hours, minutes = (divmod(int(match.group(3)), 60) if match.group(3) is not None
                          else (int(match.group(1)), int(match.group(2))))
        if hours or minutes:
            return hours, minutes
    raise GridError(f"{where}: walltime {value!r}: use H:MM (hours:minutes, e.g. 4:00) or "
                    "whole minutes (e.g. 90), above 0 (SLURM reads 0 as no limit), the same "
                    "for LSF and SLURM")


def load_grid(path_given):
    """(name, varied {option: [typed values]}, fixed {option: typed value}, resources)."""
    grid_path = Path(path_given)
    name = grid_path.stem
    if not RUN_NAME.fullmatch(name):
        raise GridError(f"{grid_path}: a grid's name (its file name) must be letters, digits, "
                        "'.', '_' and '-', starting with a letter or digit")
    try:
        grid = json.loads(grid_path.read_text(), object_pairs_hook=unique_keys)
    except (OSError, ValueError) as error:
        raise GridError(f"{grid_path}: not a readable JSON grid ({error})") from None
    if not isinstance(grid, dict):
        raise GridError(f"{grid_path}: expected a JSON object of option: [values]")
    resources = check_resources(grid.pop("resources", {}), grid_path)
    if not grid:
        raise GridError(f"{grid_path}: sets no option; a grid needs at least one, e.g. "
                        '{"loss": ["bce", "dice"]}')
    varied, fixed = {}, {}
    for key, value in grid.items():
        try:
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
        except InputError as error:
            raise GridError(str(error)) from None
    return name, varied, fixed, resources


def _canonical(value):
    return json.dumps(value, sort_keys=True, default=str)


def job_id(combination):
    """A folder name from the varied values: loss-bce__filters-32; a hash ends the ids that
    would be long or lose characters, so two combinations never share one."""
    if not combination:
        return "single"
    readable = "__".join(f"{name.replace('_', '-')}-{_plain(value)}"
                         for name, value in combination.items())
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", readable).lstrip("._-")
    if safe == readable and len(safe) <= JOB_ID_LENGTH:
        return safe
    digest = hashlib.sha1(_canonical(combination).encode()).hexdigest()[:10]
    return f"{safe[:JOB_ID_LENGTH - 11]}-{digest}"


def _plain(value):
    """A typed value as text: 0.001, True, rotation_range=90 (perturbations key=value)."""
    if isinstance(value, dict):
        return " ".join(f"{key}={_plain(item)}" for key, item in value.items())
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def job_words(options):
    """main_cil.py words for {option: typed value}: --name=value, --flag, --no-flag."""
    by_name = {option.name: option for option in OPTIONS}
    words = []
    for name, value in options.items():
        if name == "aug":
            value = [f"{key}={_plain(item)}" for key, item in value.items()]
        words += flag_word(by_name[name], value)
    return words


def checked_settings(words, where):
    """Resolve the settings `words` give, as main_cil.py will: GridError if they cannot run."""
    try:
        ctx = _main_command().make_context("main_cil.py", list(words))
        return resolve_settings(ctx)[0]
    except (InputError, click.ClickException) as error:
        message = error.format_message() if isinstance(error, click.ClickException) else error
        raise GridError(f"{where}: {message}") from None


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
            raise GridError(f"{name}: two jobs would be {identity}: {_canonical(seen[identity])} "
                            f"and {_canonical(combination)}; drop the repeated value")
        seen[identity] = combination
        words = job_words({**fixed, **combination})
        checked_settings(words, f"{name}: job {identity}")
        jobs.append((identity, combination, words))
    return jobs


# ---------------------------------------------------------------------------------------------
# Job state


def _run_quietly(command):
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def scheduler_state(submitted):
    """pending, running, or None once the scheduler no longer runs the job (or cannot be asked
    from here: then "submitted")."""
    scheduler, job = submitted.get("scheduler"), submitted.get("job_id")
    if scheduler in ("local", "here") or job is None:    # run by a process of this host
        return "running" if process_alive(submitted) else None
    if not shutil.which({"slurm": "squeue", "lsf": "bjobs"}[scheduler]):
        return "submitted"
    if scheduler == "slurm":
        answer = _run_quietly(["squeue", "-h", "-j", job, "-o", "%T"])
        state = answer.stdout.strip().upper() if answer and answer.returncode == 0 else ""
        if state in ("PENDING", "CONFIGURING", "REQUEUED", "RESV_DEL_HOLD", "REQUEUE_HOLD"):
            return "pending"
        if state in ("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING"):
            return "running"
        return None
    answer = _run_quietly(["bjobs", "-noheader", "-o", "stat", job])
    state = answer.stdout.strip().upper() if answer and answer.returncode == 0 else ""
    if state in ("PEND", "PSUSP", "WAIT"):
        return "pending"
    if state in ("RUN", "USUSP", "SSUSP", "PROV"):
        return "running"
    return None


def job_status(folder):
    """pending or running (for a scheduler's job the queue's answer comes first: a requeued job
    may still hold its earlier exit code), finished, failed (exit N), submitted (no scheduler
    to ask from here), lost (no longer run, and no exit code left), or not submitted."""
    submitted = read_json(Path(folder) / SUBMITTED, SUBMITTED_FIX) or {}
    scheduled = bool(submitted.get("job_id")) and submitted.get("scheduler") in SUBMITTERS
    queued = scheduler_state(submitted) if scheduled else None
    if queued in ("pending", "running"):
        return queued
    code = read_exit_code(folder)
    if code is not None:
        return "finished" if code == 0 else f"failed (exit {code})"
    if scheduled:
        return queued or "lost"
    if lock_owner(folder) or (submitted and process_alive(submitted)):
        return "running"                     # here, or being submitted by a live grid call
    return "lost" if submitted.get("job_id") else "not submitted"


def claim(folder, scheduler):
    """Mark the job as being submitted by this process (created exclusively: of two grid calls,
    one wins); False when another call holds it."""
    return write_json_once(Path(folder) / SUBMITTED, dict(
        scheduler=scheduler, job_id=None, pid=os.getpid(), host=host_name(),
        time=datetime.now().isoformat(timespec="seconds")))


def record_submission(folder, scheduler, identifier):
    record = read_json(Path(folder) / SUBMITTED) or {}
    write_json(Path(folder) / SUBMITTED, dict(record, scheduler=scheduler, job_id=identifier))


def next_action(folder):
    """What a run of the grid does with the job in `folder`: None (finished, or in the queue),
    "resume" (a failed or lost job with a checkpoint) or "start"; it changes nothing."""
    status = job_status(folder) if folder.exists() else "not submitted"
    if status in ("finished", "pending", "running", "submitted"):
        return None
    return "resume" if read_state(folder) is not None else "start"


def prepare(folder, words, run_outputs, placement):
    """Make `folder` ready to (re)start and return next_action's answer: a job with a
    checkpoint keeps its run (the job resumes it), any other earlier attempt is moved aside.
    `placement` (logs_dir, run_name) is where main_cil.py puts the run: the folder itself, or
    for a fold, the cross-validated run it belongs to."""
    action = next_action(folder)
    if action is None:
        return None
    if action == "start" and folder.exists() and any(
            item.name not in (OWNER_FILE, FILES["job"]) for item in folder.iterdir()):
        for moved in (folder, *run_outputs):
            if moved.exists():
                set_aside(moved)
    logs_dir, name = placement
    own_folder(Path(logs_dir) / name, "job folder")      # a fold's: the cross-validated run
    own_folder(folder, "job folder")
    for stale in (path(folder, "exit_code"), folder / SUBMITTED, path(folder, "lock")):
        stale.unlink(missing_ok=True)          # the scheduler says it no longer runs
    write_json(path(folder, "job"), dict(args=list(words), logs_dir=str(logs_dir), run_name=name,
                                         cwd=str(Path.cwd())))
    return action


def withdraw(folder):
    """After a scheduler refused the job: its claim removed, so it counts as not submitted."""
    (Path(folder) / SUBMITTED).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Job commands: built as argument lists; for LSF, which runs the command through a shell, one
# word quoted once.


def job_command(folder):
    """The command a scheduler runs for one job: this interpreter, this file, its folder."""
    return [sys.executable, str(REPO / "grid_cil.py"), "job", str(Path(folder).resolve())]


def shell_command(words):
    """`words` as one command line for the scheduler's shell, which it replaces (exec): the job
    runner is then the job's process and sees its signals, and the job ends when it does."""
    return f"exec {shlex.join(words)}"


def lsf_submission(folder, job_name, resources, gpus):
    hours, minutes = walltime_parts(resources["walltime"])
    words = ["bsub", "-J", job_name, "-n", str(resources["cores"]), "-W", f"{hours}:{minutes:02d}",
             "-wa", "USR2", "-wt", str(resources["stop_warning"]), "-R", "span[hosts=1]"]
    rusage = f"mem={resources['mem_per_core']}"
    clause = resources["gpu_clause"] or "rusage"
    if clause not in GPU_CLAUSES["lsf"]:
        raise GridError(f"resources gpu_clause {clause!r}: LSF takes rusage or gpu")
    if gpus and clause == "rusage":
        rusage += f", ngpus_excl_p={gpus}"
    words += ["-R", f"rusage[{rusage}]"]
    if gpus and clause == "gpu":
        words += ["-gpu", f"num={gpus}"]
    if resources["partition"]:
        words += ["-q", resources["partition"]]
    if resources["account"]:
        words += ["-P", resources["account"]]
    if resources["qos"]:
        raise GridError("resources qos: LSF has no quality of service; drop it or use partition "
                        "(the queue)")
    output = Path(folder).resolve() / SCHEDULER_OUTPUT
    return [*words, "-o", f"{output}/lsf-%J.out", shell_command(job_command(folder))]


def slurm_resources(resources, gpus):
    hours, minutes = walltime_parts(resources["walltime"])
    words = [f"--cpus-per-task={resources['cores']}", f"--mem-per-cpu={resources['mem_per_core']}",
             f"--time={hours}:{minutes:02d}:00",
             # B: to the batch shell, which exec made the job runner; it forwards the signal
             f"--signal=B:TERM@{resources['stop_warning'] * 60}"]
    clause = resources["gpu_clause"] or "gres"
    if clause not in GPU_CLAUSES["slurm"]:
        raise GridError(f"resources gpu_clause {clause!r}: SLURM takes gres or gpus")
    if gpus:
        words.append(f"--gres=gpu:{gpus}" if clause == "gres" else f"--gpus={gpus}")
    for key in ("partition", "account", "qos"):
        if resources[key]:
            words.append(f"--{key}={resources[key]}")
    return words


def submit(command, what):
    """Run a submission command; its answer, or GridError with the scheduler's words."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise GridError(f"{command[0]} refused {what} ({result.returncode}): "
                        f"{(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


LSF_JOB_ID = re.compile(r"Job <(\d+)>")


def submit_lsf(folder, job_name, resources, gpus, dry_run):
    command = lsf_submission(folder, job_name, resources, gpus)
    if dry_run:
        return shlex.join(command)
    (Path(folder) / SCHEDULER_OUTPUT).mkdir(exist_ok=True)
    try:
        answer = submit(command, folder.name)
    except GridError:
        withdraw(folder)
        raise
    match = LSF_JOB_ID.search(answer)
    record_submission(folder, "lsf", match.group(1) if match else None)
    return answer


def submit_slurm_array(grid_dir, folders, job_name, resources, gpus, dry_run):
    """One array for jobs of the same resources; its task list is a new file that a later
    submission never rewrites, so a queued task runs the job it was submitted for."""
    arrays = (grid_dir / ARRAYS_DIR).resolve()
    output = (grid_dir / SCHEDULER_OUTPUT).resolve()
    listing = arrays / "NNNN.json"
    if not dry_run:
        arrays.mkdir(exist_ok=True)
        output.mkdir(exist_ok=True)
        listing = _new_task_list(arrays, [str(Path(folder).resolve()) for folder in folders])
    task = [sys.executable, str(REPO / "grid_cil.py"), "job", "--array", str(listing)]
    command = ["sbatch", "--parsable", f"--job-name={job_name}", f"--array=0-{len(folders) - 1}",
               *slurm_resources(resources, gpus), f"--output={output}/slurm-%A_%a.out",
               f"--chdir={REPO}", "--export=ALL", f"--wrap={shell_command(task)}"]
    if dry_run:
        return shlex.join(command)
    try:
        answer = submit(command, f"the array of {len(folders)} job(s)")
    except GridError:
        listing.unlink()
        for folder in folders:
            withdraw(folder)
        raise
    array_id = answer.split(";")[0]
    for index, folder in enumerate(folders):
        record_submission(folder, "slurm", f"{array_id}_{index}")
    return f"array {array_id} of {len(folders)} job(s)"


def _new_task_list(arrays, folders):
    """A task list under a number no other submission has used (created exclusively)."""
    number = len(list(arrays.glob("*.json")))
    while True:
        listing = arrays / f"{number:04d}.json"
        try:
            with open(listing, "x") as file:
                json.dump(folders, file)
            return listing
        except FileExistsError:
            number += 1


def submit_slurm_single(folder, job_name, resources, gpus, dry_run):
    output = (Path(folder) / SCHEDULER_OUTPUT).resolve()
    if not dry_run:
        output.mkdir(exist_ok=True)
    command = ["sbatch", "--parsable", f"--job-name={job_name}",
               *slurm_resources(resources, gpus), f"--output={output}/slurm-%j.out",
               f"--chdir={REPO}", "--export=ALL", f"--wrap={shell_command(job_command(folder))}"]
    if dry_run:
        return shlex.join(command)
    try:
        answer = submit(command, folder.name)
    except GridError:
        withdraw(folder)
        raise
    record_submission(folder, "slurm", answer.split(";")[0])
    return f"job {answer.split(';')[0]}"


# ---------------------------------------------------------------------------------------------
# Running a grid


def _scheduler_available(scheduler, dry_run):
    if scheduler != "local" and not dry_run and not shutil.which(SUBMITTERS[scheduler]):
        raise GridError(f"{SUBMITTERS[scheduler]} not found: --scheduler {scheduler} needs an "
                        f"{scheduler.upper()} login node; use --scheduler local here")


def run_grid(grid_file, scheduler, *, dry_run=False, parallel=1, jobs_dir=JOBS_DIR):
    """Run or submit the grid's jobs that are not finished or queued; returns the number of
    local jobs that failed. A dry run prints what would run and creates nothing."""
    name, varied, fixed, resources = load_grid(grid_file)
    jobs = expand(name, varied, fixed)
    _scheduler_available(scheduler, dry_run)
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
            click.echo(f"{identity} ({action}): {shlex.join(job_command(folder))}")
        return 0

    def one(job):
        folder = job[0]
        record_submission(folder, "local", "local")
        return subprocess.run(job_command(folder)).returncode

    failed = 0
    with ThreadPoolExecutor(parallel) as pool:
        for (_, _, action, identity), code in zip(todo, pool.map(one, todo)):
            click.echo(f"{identity} ({action}): "
                       f"{'finished' if code == 0 else f'failed (exit {code})'}")
            failed += code != 0
    return failed


# ---------------------------------------------------------------------------------------------
# Inside a job


def job_run_words(folder, job):
    """main_cil.py's arguments for the job in `folder`: resume its checkpoint, or start it with
    its arguments, its run placed as job.json says (these words come last and win)."""
    if job.get("resume") or read_state(folder) is not None:
        return [f"--resume={folder}"]
    return [*job["args"], f"--logs-dir={job['logs_dir']}", f"--run-name={job['run_name']}"]


def run_job(folder):
    """Run main_cil.py for the job in `folder` with the arguments of its job.json (or resume its
    checkpoint), from the folder it was submitted in, its output into the folder's stdout and
    stderr; forward a stop signal and wait for it to save, then record the exit code. Returns
    the exit code."""
    folder = Path(folder).resolve()
    job = read_json(path(folder, "job"), JOB_FIX)
    if job is None:
        raise GridError(f"{folder}: no {path(folder, 'job').name}; is it a job folder?")
    if not (isinstance(job.get("args"), list) and all(isinstance(job.get(key), str)
                                                      for key in ("logs_dir", "run_name", "cwd"))):
        raise GridError(f"{path(folder, 'job')}: damaged (args, logs_dir, run_name, cwd not as "
                        f"the tool writes them); {JOB_FIX}")
    path(folder, "exit_code").unlink(missing_ok=True)
    words = job_run_words(folder, job)
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(path(folder, "stdout"), "a") as out, open(path(folder, "stderr"), "a") as err:
        # in the folder the job was submitted from, where its relative paths start
        child = subprocess.Popen([sys.executable, str(REPO / "main_cil.py"), *words],
                                 cwd=job["cwd"], stdout=out, stderr=err, env=environment)
        previous = {number: signal.signal(number, lambda n, f: child.send_signal(n))
                    for number in STOP_SIGNALS}
        try:
            code = child.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
    code = 128 - code if code < 0 else code          # killed by signal N: 128 + N, as a shell
    write_text(path(folder, "exit_code"), f"{code}\n")
    return code


def run_array_task(listing):
    """The job of this SLURM array task: line SLURM_ARRAY_TASK_ID of the array's task list."""
    folders = json.loads(Path(listing).read_text())
    return run_job(folders[int(os.environ["SLURM_ARRAY_TASK_ID"])])


# ---------------------------------------------------------------------------------------------
# Summary


def summary_rows(grid_dir, metric=DEFAULT_METRIC):
    """(columns, rows) of every job of a grid, finished ones by `metric`, best first. A
    cross-validated job is ranked by the mean over its folds, with their spread (sd), and shows
    the out-of-fold value over all images; folds run as jobs of their own count as one row."""
    known = sorted({*monitored_metrics(1), *monitored_metrics(2)})
    if metric not in known:
        raise GridError(f"--metric {metric}: not a metric the runs record; choose one of "
                        f"{', '.join(known)}")
    if not (grid_dir / "grid.json").is_file():
        raise GridError(f"{grid_dir}: not a grid folder (no grid.json); pass jobs/<grid>, the "
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
        row = dict(job=identity, **{key: _plain(combination[key]) for key in shown})
        try:
            row.update(_metric_cells(folder, varied, metric))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise GridError(f"{path(folder, 'metrics')}: damaged (not as the tool writes it); "
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
    with one_line_errors(GridError):
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


def resources_from_environment():
    """Resources of a single run from the scripts' environment variables."""
    resources = {}
    for key, variable in RESOURCE_VARIABLES.items():
        value = os.environ.get(variable)
        if not value:
            continue
        if key in WHOLE_RESOURCES and not value.isdigit():
            raise GridError(f"{variable}={value!r}: expected a whole number from 1")
        resources[key] = int(value) if key in WHOLE_RESOURCES else value
    return check_resources(resources, "environment")


def gpus_from_environment():
    """GPUS, the GPUs a single run's job reserves: a whole number, 0 when unset."""
    value = os.environ.get("GPUS") or "0"
    if not value.isdigit():
        raise GridError(f"GPUS={value!r}: expected a whole number of GPUs (0 for none)")
    return int(value)


def single_run(words, scheduler):
    """(run folder, job.json content, GPUs to reserve, resuming) of one main_cil.py run given by
    `words`; checks only, nothing is created. A new run's folder must not exist; `--resume
    <run>` submits that run again, continuing its checkpoint."""
    settings = checked_settings(words, "main_cil.py options")
    reserved = gpus_from_environment()
    gpus = settings.gpus if settings.gpus is not None else reserved
    if reserved and settings.gpus is not None and settings.gpus != reserved:
        raise GridError(f"GPUS={reserved} reserves {reserved} GPU(s) but --gpus {settings.gpus} "
                        "trains on another number; make them agree")
    if settings.resume:
        folder = Path(settings.logs_dir) / settings.run_name
        status = job_status(folder) if (folder / SUBMITTED).is_file() else None
        if status in ("pending", "running", "submitted"):
            raise GridError(f"{folder}: its job is {status}; wait for it, or cancel it first")
        job = dict(args=[], resume=True, logs_dir=str(folder.parent), run_name=folder.name,
                   cwd=str(Path.cwd()))
        return folder, job, gpus, True
    name = settings.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{scheduler}"
    check_run_name(name)
    folder = Path(settings.logs_dir) / name
    if folder.exists():
        raise GridError(f"{folder}: exists; pass another --run-name, or --resume {folder} to "
                        "continue it")
    ctx = _main_command().make_context("main_cil.py", list(words))
    options = {option.name: ctx.params[option.name] for option in OPTIONS
               if ctx.get_parameter_source(option.name).name == "COMMANDLINE"
               and option.name not in ("run_name", "logs_dir")}
    if gpus and "gpus" not in options:
        options["gpus"] = gpus                 # train on what the job reserves
    job = dict(args=job_words(options), logs_dir=str(folder.parent), run_name=name,
               cwd=str(Path.cwd()))
    return folder, job, gpus, False


def reserve_single(folder, job, resuming, scheduler):
    """The run folder made (or, resuming, reopened) for its job: job.json written, an earlier
    attempt's exit code and claim removed, the claim of `scheduler` written."""
    own_folder(folder, "run folder")
    for stale in (path(folder, "exit_code"), folder / SUBMITTED):
        stale.unlink(missing_ok=True)
    if not (resuming and path(folder, "job").is_file()):
        write_json(path(folder, "job"), job)
    elif not read_json(path(folder, "job"), JOB_FIX).get("resume"):
        write_json(path(folder, "job"), dict(read_json(path(folder, "job"), JOB_FIX),
                                             resume=True))
    claim(folder, scheduler)


def submit_single(scheduler, words, dry_run):
    """Submit one main_cil.py run (or, with --resume, an earlier one again); its run folder
    holds the job's files. A dry run, or a submission the scheduler refuses, leaves nothing
    of a new run behind."""
    _scheduler_available(scheduler, dry_run)
    folder, job, gpus, resuming = single_run(words, scheduler)
    resources = resources_from_environment()
    name = folder.name
    submitter = submit_lsf if scheduler == "lsf" else submit_slurm_single
    if dry_run:
        click.echo(submitter(folder, name, resources, gpus, dry_run=True))
        return
    reserve_single(folder, job, resuming, scheduler)
    try:
        answer = submitter(folder, name, resources, gpus, dry_run=False)
    except GridError:
        if not resuming:
            shutil.rmtree(folder)      # made by this call a moment ago, holding only its job
        raise
    click.echo(f"{folder}: {answer}" + (" (resumes its checkpoint)" if resuming else ""))


def run_here(words):
    """One main_cil.py run as a job inside the allocation this process runs in (a bare
    `sbatch cluster/sbatch_train.sh`): the run folder, its output files and exit code as a
    submitted job has them. Returns the exit code."""
    folder, job, _, resuming = single_run(words, "here")
    reserve_single(folder, job, resuming, "here")
    record_submission(folder, "here", os.environ.get("SLURM_JOB_ID") or "here")
    click.echo(f"{folder}: the run's output goes to {path(folder, 'stdout')} and "
               f"{path(folder, 'stderr')}")
    return run_job(folder)


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
