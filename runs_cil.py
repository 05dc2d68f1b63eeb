"""The run folder: its name, its files, its lock, and finding earlier runs. The only module that
knows the layout; main_cil.py, train_cil.py, grid_cil.py and the cluster scripts ask it.

    logs/<run>/                      one run (a grid job's run is jobs/<grid>/<job>/)
        config.json  split.json  best.keras  checkpoint/  history.csv  metrics.json
        lock  job.json  stdout  stderr  exit_code  export/  fold-<i>/ (a fold, itself a run)
    data/valid/output/<run>/         its validation pictures
    data/roadseg/submit_output/<run>/  its test masks and submission.csv

A run owns these three folders and nothing else. Its name is one path component, checked before
anything is created. `--force` moves an earlier run aside into `.trash/` beside it instead of
deleting it, and no run is started, replaced or resumed while another live process holds it.
"""

import json
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from data_cil import InputError, write_json

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")   # one path component, no dot first
TRASH_DIR = ".trash"
FILES = dict(config="config.json", split="split.json", best_model="best.keras",
             checkpoint_dir="checkpoint", history="history.csv", metrics="metrics.json",
             lock="lock", job="job.json", stdout="stdout", stderr="stderr", exit_code="exit_code",
             export_dir="export", contact_sheet="contact_sheet.png",
             panels="images",                # TensorBoard's image panels
             oof="oof_predictions.npz")      # a fold's predictions of the images it left out
STATE_FILE = "state.json"                    # inside checkpoint/: which model file is current
SUBMISSION_FILE = "submission.csv"
FOLD_PREFIX = "fold-"


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


def read_json(file):
    return json.loads(Path(file).read_text()) if Path(file).is_file() else None


def read_record(folder):
    """The run's config.json, or InputError naming what was expected."""
    record = read_json(path(folder, "config"))
    if record is None:
        raise InputError(f"{path(folder, 'config')}: not found; is {folder} a run folder of this "
                         "tool?")
    return record


def read_metrics(folder):
    return read_json(path(folder, "metrics")) or {}


def read_state(folder):
    """The checkpoint's state (epoch, step, best, file), or None without a checkpoint."""
    return read_json(path(folder, "checkpoint_dir") / STATE_FILE)


def write_state(folder, state):
    write_json(path(folder, "checkpoint_dir") / STATE_FILE, state)


def read_exit_code(folder):
    file = path(folder, "exit_code")
    return int(file.read_text().strip()) if file.is_file() else None


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
    owner = read_json(path(folder, "lock")) if path(folder, "lock").is_file() else None
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
        stale = lock.with_name(f".{lock.name}.{os.getpid()}.stale")
        try:
            os.replace(lock, stale)              # one remover wins; the others find nothing
            stale.unlink()
        except FileNotFoundError:
            pass
    content = json.dumps(dict(pid=os.getpid(), host=host_name(),
                              started=datetime.now().isoformat(timespec="seconds")))
    try:
        descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise InputError(f"{folder}: another process took this run a moment ago; choose another "
                         "--run-name") from None
    except PermissionError as error:
        raise InputError(f"{folder}: not writable ({error.strerror}); make it writable or choose "
                         "another --logs-dir") from None
    with os.fdopen(descriptor, "w") as file:
        file.write(content + "\n")


def release_lock(folder):
    owner = read_json(path(folder, "lock")) if path(folder, "lock").is_file() else None
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == host_name():
        path(folder, "lock").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Opening a run


@dataclass(frozen=True)
class Run:
    """A run's three folders: the run folder, its validation pictures, its submission."""

    folder: Path
    valid_dir: Path
    submit_dir: Path

    @property
    def name(self):
        return self.folder.name

    def file(self, name):
        return path(self.folder, name)

    def fold(self, index):
        """Fold `index` of a cross-validated run: a run of its own inside this one."""
        name = f"{FOLD_PREFIX}{index}"
        return Run(self.folder / name, self.valid_dir / name, self.submit_dir / name)


def set_aside(folder):
    """Move `folder` into .trash/ beside it, named with the time; returns the new path."""
    trash = folder.parent / TRASH_DIR
    trash.mkdir(exist_ok=True)
    target = trash / f"{folder.name}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    os.replace(folder, target)
    return target


def make_folder(folder, what):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{folder}: cannot create the {what} ({error.strerror}); make "
                         f"{folder.parent} writable or choose another folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: the {what} is not writable; make it writable or choose "
                         "another folder")


def _earlier_outputs(run):
    return [folder for folder in (run.valid_dir, run.submit_dir)
            if folder != run.folder and folder.exists() and any(folder.iterdir())]


def open_run(logs_dir, name, valid_root, submit_root, *, force=False, resume=False):
    """Create (or reopen, resuming) the run `name` with its output folders and hold its lock.

    A folder that holds a run (or outputs of one) is refused unless `force`, which moves them
    aside; one that a scheduler reserved for this job (no config.json yet) is taken as it is.
    Returns (Run, [folders moved aside]).
    """
    check_run_name(name)
    run = Run(Path(logs_dir) / name, Path(valid_root) / name, Path(submit_root) / name)
    make_folder(Path(logs_dir), "logs folder")
    make_folder(run.folder, "run folder")
    acquire_lock(run.folder)
    moved = []
    try:
        if resume:
            return run, moved
        if is_run(run.folder) or _earlier_outputs(run):
            taken = run.folder if is_run(run.folder) else _earlier_outputs(run)[0]
            if not force:
                raise InputError(f"{taken}: a run of that name exists; pass --force to move it "
                                 f"aside, --resume {run.folder} to continue it, or another "
                                 "--run-name")
            moved = [set_aside(folder) for folder in _earlier_outputs(run)]
            if is_run(run.folder):
                moved.append(set_aside(run.folder))   # its lock, ours, goes with it
                make_folder(run.folder, "run folder")
                acquire_lock(run.folder)
        for folder, what in ((run.valid_dir, "validation output folder"),
                             (run.submit_dir, "submission folder")):
            make_folder(folder, what)
    except BaseException:
        release_lock(run.folder)
        raise
    return run, moved


def close_run(run):
    release_lock(run.folder)
