"""One cluster job's life: the resources it asks for, its main_cil.py words, its state (claimed,
submitted, pending, running, finished, failed, lost), its submission to LSF (one bsub) or SLURM
(one sbatch, or a task of an array), the job runner that runs main_cil.py inside it, and the
single runs the cluster scripts submit. Grids of jobs are grid_cil.py.

A job is a run folder holding `job.json` (its arguments as JSON), `submitted.json` (where it
went), the run's files, `stdout`, `stderr` and `exit_code`. A job command never passes a value
through a shell: the job runner reads its arguments from its folder.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import click

from io_cil import InputError, read_json, write_json, write_json_once, write_text
from options_cil import CONTEXT, OPTIONS, flag_word
from runs_cil import (FILES, OWNER_FILE, RUN_NAME, STOP_SIGNALS, check_run_name, host_name,
                      lock_owner, own_folder, path, process_alive, read_exit_code, read_state,
                      set_aside)
from settings_cil import resolve_settings

REPO = Path(__file__).resolve().parent
SUBMITTERS = {"lsf": "bsub", "slurm": "sbatch"}
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
SUBMITTED = "submitted.json"
JOB_FIX = "submit the job again (run the grid again, or the cluster script)"
SUBMITTED_FIX = "delete it; the grid then counts the job as not submitted and runs it again"
ARRAYS_DIR = "arrays"        # SLURM: one immutable task list per submitted array
SCHEDULER_OUTPUT = "scheduler"   # SLURM's and LSF's own output, per job


# ---------------------------------------------------------------------------------------------
# Resources a job asks the scheduler for


def check_resources(resources, where):
    if not isinstance(resources, dict):
        raise InputError(f"{where}: resources {json.dumps(resources)}: expected an object such "
                         'as {"walltime": "8:00", "cores": 4}')
    unknown = set(resources) - set(RESOURCES)
    if unknown:
        raise InputError(f"{where}: resources {', '.join(sorted(unknown))} unknown; use "
                         f"{', '.join(RESOURCES)}")
    resolved = {key: resources.get(key, default) for key, (default, _) in RESOURCES.items()}
    for key in WHOLE_RESOURCES:
        value = resolved[key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise InputError(f"{where}: resources {key} {value!r}: expected a whole number from 1")
    hours, minutes = walltime_parts(resolved["walltime"], where)
    if resolved["stop_warning"] >= hours * 60 + minutes:
        raise InputError(f"{where}: resources stop_warning {resolved['stop_warning']} (minutes) "
                         f"must be shorter than the walltime {resolved['walltime']}")
    for key in ("partition", "account", "qos", "gpu_clause"):
        value = resolved[key]
        if value is not None and not (isinstance(value, str) and RUN_NAME.fullmatch(value)):
            raise InputError(f"{where}: resources {key} {value!r}: expected a name of letters, "
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
    raise InputError(f"{where}: walltime {value!r}: use H:MM (hours:minutes, e.g. 4:00) or "
                     "whole minutes (e.g. 90), above 0 (SLURM reads 0 as no limit), the same "
                     "for LSF and SLURM")


# ---------------------------------------------------------------------------------------------
# One job's main_cil.py words


def main_options_parser():
    return click.Command("main_cil.py", params=OPTIONS, context_settings=CONTEXT)


def plain(value):
    """A typed value as text: 0.001, True, rotation_range=90 (perturbations key=value)."""
    if isinstance(value, dict):
        return " ".join(f"{key}={plain(item)}" for key, item in value.items())
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def job_words(options):
    """main_cil.py words for {option: typed value}: --name=value, --flag, --no-flag."""
    by_name = {option.name: option for option in OPTIONS}
    words = []
    for name, value in options.items():
        if name == "aug":
            value = [f"{key}={plain(item)}" for key, item in value.items()]
        words += flag_word(by_name[name], value)
    return words


def checked_settings(words, where):
    """Resolve the settings `words` give, as main_cil.py will: InputError if they cannot run."""
    try:
        ctx = main_options_parser().make_context("main_cil.py", list(words))
        return resolve_settings(ctx)[0]
    except (InputError, click.ClickException) as error:
        message = error.format_message() if isinstance(error, click.ClickException) else error
        raise InputError(f"{where}: {message}") from None


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
# Submission: commands built as argument lists; for LSF, which runs the command through a
# shell, one word quoted once


def job_argv(folder):
    """The command a scheduler runs for one job: this interpreter, this file, its folder."""
    return [sys.executable, str(REPO / "grid_cil.py"), "job", str(Path(folder).resolve())]


def exec_line(words):
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
        raise InputError(f"resources gpu_clause {clause!r}: LSF takes rusage or gpu")
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
        raise InputError("resources qos: LSF has no quality of service; drop it or use partition "
                         "(the queue)")
    output = Path(folder).resolve() / SCHEDULER_OUTPUT
    return [*words, "-o", f"{output}/lsf-%J.out", exec_line(job_argv(folder))]


def slurm_resources(resources, gpus):
    hours, minutes = walltime_parts(resources["walltime"])
    words = [f"--cpus-per-task={resources['cores']}", f"--mem-per-cpu={resources['mem_per_core']}",
             f"--time={hours}:{minutes:02d}:00",
             # B: to the batch shell, which exec made the job runner; it forwards the signal
             f"--signal=B:TERM@{resources['stop_warning'] * 60}"]
    clause = resources["gpu_clause"] or "gres"
    if clause not in GPU_CLAUSES["slurm"]:
        raise InputError(f"resources gpu_clause {clause!r}: SLURM takes gres or gpus")
    if gpus:
        words.append(f"--gres=gpu:{gpus}" if clause == "gres" else f"--gpus={gpus}")
    for key in ("partition", "account", "qos"):
        if resources[key]:
            words.append(f"--{key}={resources[key]}")
    return words


def submit(command, what):
    """Run a submission command; its answer, or InputError with the scheduler's words."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise InputError(f"{command[0]} refused {what} ({result.returncode}): "
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
    except InputError:
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
               f"--chdir={REPO}", "--export=ALL", f"--wrap={exec_line(task)}"]
    if dry_run:
        return shlex.join(command)
    try:
        answer = submit(command, f"the array of {len(folders)} job(s)")
    except InputError:
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
               f"--chdir={REPO}", "--export=ALL", f"--wrap={exec_line(job_argv(folder))}"]
    if dry_run:
        return shlex.join(command)
    try:
        answer = submit(command, folder.name)
    except InputError:
        withdraw(folder)
        raise
    record_submission(folder, "slurm", answer.split(";")[0])
    return f"job {answer.split(';')[0]}"


def scheduler_available(scheduler, dry_run):
    if scheduler != "local" and not dry_run and not shutil.which(SUBMITTERS[scheduler]):
        raise InputError(f"{SUBMITTERS[scheduler]} not found: --scheduler {scheduler} needs an "
                         f"{scheduler.upper()} login node; use --scheduler local here")


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
        raise InputError(f"{folder}: no {path(folder, 'job').name}; is it a job folder?")
    if not (isinstance(job.get("args"), list) and all(isinstance(job.get(key), str)
                                                      for key in ("logs_dir", "run_name", "cwd"))):
        raise InputError(f"{path(folder, 'job')}: damaged (args, logs_dir, run_name, cwd not as "
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
# One run submitted by the cluster scripts (cluster/*.sh), or run inside an allocation


def resources_from_environment():
    """Resources of a single run from the scripts' environment variables."""
    resources = {}
    for key, variable in RESOURCE_VARIABLES.items():
        value = os.environ.get(variable)
        if not value:
            continue
        if key in WHOLE_RESOURCES and not value.isdigit():
            raise InputError(f"{variable}={value!r}: expected a whole number from 1")
        resources[key] = int(value) if key in WHOLE_RESOURCES else value
    return check_resources(resources, "environment")


def gpus_from_environment():
    """GPUS, the GPUs a single run's job reserves: a whole number, 0 when unset."""
    value = os.environ.get("GPUS") or "0"
    if not value.isdigit():
        raise InputError(f"GPUS={value!r}: expected a whole number of GPUs (0 for none)")
    return int(value)


def single_run(words, scheduler):
    """(run folder, job.json content, GPUs to reserve, resuming) of one main_cil.py run given by
    `words`; checks only, nothing is created. A new run's folder must not exist; `--resume
    <run>` submits that run again, continuing its checkpoint."""
    settings = checked_settings(words, "main_cil.py options")
    reserved = gpus_from_environment()
    gpus = settings.gpus if settings.gpus is not None else reserved
    if reserved and settings.gpus is not None and settings.gpus != reserved:
        raise InputError(f"GPUS={reserved} reserves {reserved} GPU(s) but --gpus {settings.gpus} "
                         "trains on another number; make them agree")
    if settings.resume:
        folder = Path(settings.logs_dir) / settings.run_name
        status = job_status(folder) if (folder / SUBMITTED).is_file() else None
        if status in ("pending", "running", "submitted"):
            raise InputError(f"{folder}: its job is {status}; wait for it, or cancel it first")
        job = dict(args=[], resume=True, logs_dir=str(folder.parent), run_name=folder.name,
                   cwd=str(Path.cwd()))
        return folder, job, gpus, True
    name = settings.run_name or f"{datetime.now():%Y%m%d-%H%M%S}-{scheduler}"
    check_run_name(name)
    folder = Path(settings.logs_dir) / name
    if folder.exists():
        raise InputError(f"{folder}: exists; pass another --run-name, or --resume {folder} to "
                         "continue it")
    ctx = main_options_parser().make_context("main_cil.py", list(words))
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
    folder, job, gpus, resuming = single_run(words, scheduler)
    resources = resources_from_environment()
    scheduler_available(scheduler, dry_run)     # after the input: the same answer on every machine
    name = folder.name
    submitter = submit_lsf if scheduler == "lsf" else submit_slurm_single
    if dry_run:
        click.echo(submitter(folder, name, resources, gpus, dry_run=True))
        return
    reserve_single(folder, job, resuming, scheduler)
    try:
        answer = submitter(folder, name, resources, gpus, dry_run=False)
    except InputError:
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

