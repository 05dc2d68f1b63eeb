"""The run folder: its name, its files, its lock, and finding earlier runs. The only module that
knows the layout; main_cil.py, train_cil.py, grid_cil.py and the cluster scripts ask it.

    logs/<run>/                      one run (a grid job's run is jobs/<grid>/<job>/)
        config.json  split.json  best.keras  checkpoint/  history.csv  metrics.json
        lock  job.json  stdout  stderr  exit_code  export/  fold-<i>/ (a fold, itself a run)
    data/valid/output/<run>/         its validation pictures
    data/roadseg/submit_output/<run>/  its test masks and submission.csv

A run owns these three folders and nothing else, and only when the tool made them: each holds
the tool's mark (.cil-owner) from the moment it exists. A folder without it (the project's data/,
a checkout, anything a user made) is never written into, adopted or moved. Its name is one path
component, checked before anything is created. `--force` moves an earlier run aside into
`.trash/` beside it instead of deleting it, and no run is started, replaced, resumed or moved
while a live process holds it or any run inside it.
"""

import json
import os
import re
import signal
import socket
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from io_cil import (InputError, damaged, os_error_line, read_json, temporary_name, writable,
                    write_json, write_json_once)

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")   # one path component, no dot first
TRASH_DIR = ".trash"
OWNER_FILE = ".cil-owner"    # the tool's mark in every folder it made for a run
FILES = dict(config="config.json", split="split.json", best_model="best.keras",
             checkpoint_dir="checkpoint", history="history.csv", metrics="metrics.json",
             lock="lock", job="job.json", stdout="stdout", stderr="stderr", exit_code="exit_code",
             export_dir="export", contact_sheet="contact_sheet.png",
             panels="images",                # TensorBoard's image panels
             oof="oof_predictions.npz")      # a fold's predictions of the images it left out
STATE_FILE = "state.json"                    # inside checkpoint/: which model file is current
# The formats of the two records a run is read back by. config.json: 1 is {settings, sources,
# ...} without a number (2026-11-23 to 2026-12-07), 2 adds "format"; the flat settings of
# 2026-11-22 are no longer read. checkpoint/state.json: 1, the same keys with or without the
# number.
CONFIG_FORMAT = 2
STATE_FORMAT = 1
SUBMISSION_FILE = "submission.csv"
LOCK_FIX = "delete it if no process of the tool holds the run"
FOLD_PREFIX = "fold-"


# Every way a scheduler or a user asks a job to stop, each a request to checkpoint and exit:
# Ctrl-C and bkill's first signal (SIGINT), scancel, bkill's second and SLURM's time limit or
# --signal warning (SIGTERM), LSF's run-limit warning (-wa USR2) and run limit (SIGUSR2).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a resumable checkpoint of the run has been written."""

    def __init__(self, signal_name, signal_number, epoch, run_dir):
        super().__init__(f"stopped by {signal_name} during epoch {epoch}")
        self.signal_number, self.run_dir = signal_number, Path(run_dir)


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the run's last checkpoint is its last good state."""

    def __init__(self, message, run_dir):
        super().__init__(message)
        self.run_dir = Path(run_dir)


def check_run_name(name):
    """`name` when it is one safe folder name, InputError otherwise."""
    if not RUN_NAME.fullmatch(str(name)):
        raise InputError(f"--run-name {name!r}: a run name is one folder name of letters, digits, "
                         "'.', '_' and '-', at most 100 characters, starting with a letter or "
                         "digit")
    return name


def path(folder, name):
    """The path of the run file `name` (a key of FILES) in a run folder."""
    return Path(folder) / FILES[name]


def run_folder_of(path_given):
    """The run folder a path names: the folder itself, or the folder of a file inside it."""
    given = Path(path_given)
    return given if given.is_dir() else given.parent


def is_run(folder):
    """A started run: it has its config.json (a folder a scheduler reserved has not, yet)."""
    return path(folder, "config").is_file()


def newer_format(file, record, known):
    """InputError when `record` says it has a format this version of the tool does not know."""
    if not isinstance(record.get("format", 1), int) or record.get("format", 1) > known:
        return damaged(file, f"format {record.get('format')!r}, newer than this tool's {known}",
                       "read it with the version of the tool that wrote it")
    return None


def read_record(folder):
    """The run's config.json, or InputError naming what was expected."""
    file = path(folder, "config")
    fix = "restore it from a copy, or start a new run (its settings are lost)"
    record = read_json(file, fix)
    if record is None:
        raise InputError(f"{file}: not found; {folder} is not a run folder of this tool (pass "
                         "logs/<run>, the folder a run printed)")
    if error := newer_format(file, record, CONFIG_FORMAT):
        raise error
    if not isinstance(record.get("settings"), dict):
        raise damaged(file, "it records no settings", fix)
    return record


def read_metrics(folder):
    """The run's metrics.json, {} before it is written."""
    return read_json(path(folder, "metrics"), f"python main_cil.py --resume {folder} writes it "
                                              "again") or {}


def read_state(folder):
    """The checkpoint's state (epoch, step, best, file, ...) as training wrote it, whole, or
    None without a checkpoint; InputError when it is cut short, of a newer format, or names a
    model file that is not a whole one in its folder (a name with a folder in it would make the
    checkpoint's rotation delete outside the run)."""
    file = path(folder, "checkpoint_dir") / STATE_FILE
    fix = (f"restore it from a copy, or start the run anew with --force (nothing of {folder} is "
           "deleted)")
    state = read_json(file, fix)
    if state is None:
        return None
    if error := newer_format(file, state, STATE_FORMAT):
        raise error
    name = state.get("file")
    if not (isinstance(name, str) and Path(name).name == name
            and (file.parent / name).is_file()):
        raise damaged(file, f"it names {name!r}, which is not a file in {file.parent}", fix)
    if not zipfile.is_zipfile(file.parent / name):   # written whole; cut short, it is no archive
        raise damaged(file.parent / name, "not a whole .keras archive", fix)
    return state


def write_state(folder, state):
    write_json(path(folder, "checkpoint_dir") / STATE_FILE, dict(state, format=STATE_FORMAT))


def read_exit_code(folder):
    """The exit code a job recorded, or None; InputError when the file holds no number."""
    file = path(folder, "exit_code")
    if not file.is_file():
        return None
    text = file.read_text().strip()
    if not text.lstrip("-").isdigit():
        raise damaged(file, f"{text[:20]!r} is not an exit code",
                      "delete it; the grid then asks the scheduler, or runs the job again")
    return int(text)


def fold_folder(folder, fold):
    return Path(folder) / f"{FOLD_PREFIX}{fold}"


# ---------------------------------------------------------------------------------------------
# Lock: which live process holds a run


def host_name():
    """This machine's name as run records (lock, config.json, a grid's claim) write it."""
    return socket.gethostname()


def process_alive(record):
    """Whether the process {pid, host} a record names still runs; one of another host counts
    as alive: this host cannot see it."""
    if record.get("host") != host_name():
        return True
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                                     # alive, another user's
    return True


def lock_owner(folder):
    """{pid, host, started} of the process holding the run, or None when free or stale
    (a process of this host that no longer exists)."""
    owner = read_json(path(folder, "lock"), LOCK_FIX)
    if owner is not None and not (isinstance(owner.get("pid"), int) and "host" in owner):
        raise damaged(path(folder, "lock"), "no pid and host", LOCK_FIX)
    return owner if owner is not None and process_alive(owner) else None


def acquire_lock(folder):
    """Mark the run as held by this process; InputError when a live one holds it. A lock left
    by a process of another host counts as live: this host cannot see that process."""
    lock = path(folder, "lock")
    owner = lock_owner(folder)
    if owner is not None and owner["pid"] != os.getpid():
        raise InputError(f"{folder}: in use by process {owner['pid']} on {owner['host']} since "
                         f"{owner.get('started', '?')}; wait for it, or delete {lock} if that "
                         "process is gone")
    if lock.exists() and owner is None:
        stale = temporary_name(lock, "stale")
        try:
            os.replace(lock, stale)              # one remover wins; the others find nothing
            stale.unlink()
        except FileNotFoundError:
            pass
    owner = dict(pid=os.getpid(), host=host_name(),
                 started=datetime.now().isoformat(timespec="seconds"))
    try:
        taken = not write_json_once(lock, owner)     # whole or not at all: readers see it whole
    except OSError as error:
        raise InputError(os_error_line(error, lock)) from None
    if taken:
        raise InputError(f"{folder}: another process took this run a moment ago; choose another "
                         "--run-name")


def release_lock(folder):
    owner = read_json(path(folder, "lock"), LOCK_FIX)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == host_name():
        path(folder, "lock").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Opening a run


# What a run may write besides its folder: kind -> what the folder is called in messages.
OUTPUT_FOLDERS = {"valid": "validation output folder", "submit": "submission output folder"}
OUTPUTS = tuple(OUTPUT_FOLDERS)


@dataclass(frozen=True)
class Run:
    """A run's three folders: the run folder, its validation pictures, its submission."""

    folder: Path
    valid_dir: Path
    submit_dir: Path

    @classmethod
    def named(cls, logs_dir, name, valid_root, submit_root):
        """The run `name` (check_run_name first) with its folders in these three places."""
        return cls(Path(logs_dir) / name, Path(valid_root) / name, Path(submit_root) / name)

    @property
    def name(self):
        return self.folder.name

    def file(self, name):
        return path(self.folder, name)

    def output(self, kind):
        """The output folder of `kind` (of OUTPUTS)."""
        return {"valid": self.valid_dir, "submit": self.submit_dir}[kind]


def is_owned(folder):
    """Whether the tool made `folder`: its mark, or for run folders made before the mark
    (2026-11-23 to 2026-12-02, config.json of format 1), a config.json or job.json that is this
    tool's record."""
    folder = Path(folder)
    if (folder / OWNER_FILE).is_file():
        return True
    for name, keys in (("config", {"settings", "sources"}), ("job", {"args", "run_name"})):
        try:
            record = json.loads(path(folder, name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and keys <= record.keys():
            return True
    return False


def make_folder(folder, what):
    """A folder that holds runs (logs, outputs): made with its parents if missing, never owned."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: not a folder; choose another place for the {what}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the {what} ({error.strerror}); make "
                         f"{folder.parent} writable or choose another folder") from None
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; choose another place for the {what}")
    writable(folder, what)


RUN_PLACE_FIX = "choose another --run-name or another folder for the runs"


def not_made_here(folder, instead):
    """The InputError for a folder the tool did not make: never written into, used or moved."""
    return InputError(f"{folder}: exists and was not made by this tool (no {OWNER_FILE}); the "
                      f"tool never writes into, uses or moves it: {instead}")


def own_folder(folder, what, instead=RUN_PLACE_FIX):
    """`folder`, made now with the tool's mark if missing (whole: a folder and its mark appear
    together); InputError, saying what to do `instead`, when it exists and the tool did not
    make it."""
    folder = Path(folder)
    if not folder.exists():
        make_folder(folder.parent, f"folder that holds the {what}s")
        temporary = temporary_name(folder)
        try:
            temporary.mkdir()
        except OSError as error:
            raise InputError(f"{folder}: cannot create the {what} ({error.strerror}); choose "
                             "another folder") from None
        (temporary / OWNER_FILE).write_text(json.dumps(dict(
            what=what, pid=os.getpid(), host=host_name(),
            made=datetime.now().isoformat(timespec="seconds"))) + "\n")
        try:
            os.rename(temporary, folder)       # fails when another process made it first
        except OSError:
            (temporary / OWNER_FILE).unlink()
            temporary.rmdir()
    if not is_owned(folder):
        raise not_made_here(folder, instead)
    writable(folder, what)
    return folder


def _held_inside(folder):
    """The first run in `folder` (itself or any run inside, such as a fold) that a live process
    other than this one holds, as (run folder, lock owner); None when there is none."""
    for lock in sorted(Path(folder).rglob(FILES["lock"])):
        owner = lock_owner(lock.parent)
        if owner is not None and not (owner["pid"] == os.getpid()
                                      and owner["host"] == host_name()):
            return lock.parent, owner
    return None


def check_movable(folder):
    """InputError unless `folder` may be moved aside: the tool made it and no live process (but
    this one) holds it or a run inside it."""
    folder = Path(folder)
    if not is_owned(folder):
        raise not_made_here(folder, "move it yourself or choose another --run-name")
    held = _held_inside(folder)
    if held:
        run, owner = held
        raise InputError(f"{run}: in use by process {owner['pid']} on {owner['host']} since "
                         f"{owner.get('started', '?')}; {folder} is not moved while it runs: "
                         "wait for it or stop it first")


def set_aside(folder):
    """Move `folder` into .trash/ beside it, named with the time; returns the new path
    (check_movable first)."""
    folder = Path(folder)
    check_movable(folder)
    trash = folder.parent / TRASH_DIR
    trash.mkdir(exist_ok=True)
    target = trash / f"{folder.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    os.replace(folder, target)
    return target


def _has_outputs(folder):
    return folder.exists() and any(item.name != OWNER_FILE for item in folder.iterdir())


def _earlier_outputs(run):
    return [folder for folder in (run.valid_dir, run.submit_dir)
            if folder != run.folder and _has_outputs(folder)]


def refuse_foreign(run):
    """InputError when one of the run's three folders exists and the tool did not make it:
    checked before anything is created or moved."""
    for folder in (run.folder, *(run.output(kind) for kind in OUTPUTS)):
        if folder.exists() and not is_owned(folder):
            raise not_made_here(folder, RUN_PLACE_FIX)


def open_run(logs_dir, name, valid_root, submit_root, *, force=False, resume=False,
             writes=OUTPUTS):
    """Create (or reopen, resuming) the run `name` with the output folders it `writes` (of
    OUTPUTS) and hold its lock.

    A folder that holds a run (or outputs of one) is refused unless `force`, which moves them
    aside; one that a scheduler reserved for this job (made by the tool, no config.json yet) is
    taken as it is; one the tool did not make is refused, `force` or not.
    Returns (Run, [folders moved aside]).
    """
    check_run_name(name)
    run = Run.named(logs_dir, name, valid_root, submit_root)
    refuse_foreign(run)
    roots = {"valid": valid_root, "submit": submit_root}
    for root, what in ((logs_dir, "logs folder"),
                       *((roots[kind], OUTPUT_FOLDERS[kind]) for kind in writes)):
        make_folder(Path(root), what)        # every place first: a refusal leaves nothing
    own_folder(run.folder, "run folder")
    acquire_lock(run.folder)
    moved = []
    try:
        if resume:    # its output folders may be gone (a run copied from a cluster): made again
            own_output_folders(run, writes)
            return run, moved
        if is_run(run.folder) or _earlier_outputs(run):
            taken = run.folder if is_run(run.folder) else _earlier_outputs(run)[0]
            if not force:
                raise InputError(f"{taken}: a run of that name exists; pass --force to move it "
                                 f"aside, --resume {run.folder} to continue it, or another "
                                 "--run-name")
            for folder in (run.folder, *_earlier_outputs(run)):
                check_movable(folder)
            moved = [set_aside(folder) for folder in _earlier_outputs(run)]
            if is_run(run.folder):
                moved.append(set_aside(run.folder))   # its lock, ours, goes with it
                own_folder(run.folder, "run folder")
                acquire_lock(run.folder)
        own_output_folders(run, writes)
    except BaseException:
        release_lock(run.folder)
        raise
    return run, moved


def own_output_folders(run, writes=OUTPUTS):
    """The output folders of `run` that it `writes`, made (owned) if missing: a run that only
    validates leaves no empty submission folder beside the data, nor a submission a
    validation folder."""
    for kind in writes:
        own_folder(run.output(kind), OUTPUT_FOLDERS[kind])


def close_run(run):
    release_lock(run.folder)


def open_fold(parent, index, **options):
    """Fold `index` of the cross-validated run `parent`: a run of its own inside it, opened
    as open_run opens a run."""
    return open_run(parent.folder, fold_folder(parent.folder, index).name, parent.valid_dir,
                    parent.submit_dir, **options)


def create_or_join(run, config, split, compared):
    """The cross-validated `run` with its config.json and split.json: made and written by the
    first fold to start (folds may run as separate jobs at once), joined by the others when
    their settings named in `compared` and their split are the same; InputError otherwise."""
    refuse_foreign(run)
    own_folder(run.folder, "run folder")
    own_output_folders(run, ("valid",))
    if not (write_json_once(run.file("config"), config) & write_json_once(run.file("split"),
                                                                           split)):
        earlier = read_record(run.folder).get("settings", {})
        differing = sorted(key for key in compared
                           if earlier.get(key) != config["settings"].get(key))
        if differing or read_json(run.file("split")) != split:
            raise InputError(f"{run.folder}: a run of that name exists with other "
                             f"{', '.join(differing) or 'folds'}; pass --force to move it aside, "
                             "or another --run-name")
    return run
