"""The run's record of itself, run.json: written by the fixed code only, read by `record`. DO NOT CHANGE.

`running` from the start (runtime.main), then `finished` with the summary or `failed` with the reason in one line;
a run killed outright stays `running`, and is recorded as a crash (docs/RUN.md, 'The run's record'). Written
atomically beside run.log; `record` trusts this file, never the log's text. Standard library only.
"""
import contextlib
import datetime
import errno
import hashlib
import io
import json
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import threading

RECORD_NAME = "run.json"
FORMAT = 1


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path that becomes the file `path` when the block succeeds, else goes."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_atomically(path, data):
    """Write bytes to path through atomic_path, flushed to the disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def git_blob_sha1(data):
    """The id git gives a file with these bytes (`git hash-object`), to compare a file with a commit's."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git(folder, *args):
    """stdout of `git args` run in folder, or None where git is missing or fails (not a checkout, no commit)."""
    try:
        out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_identity(path):
    """What ran: the file's path, sha256 and git blob, HEAD's commit and whether the file is HEAD's."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return {"path": None, "sha256": None, "blob": None, "commit": None, "committed": None}
    commit = git(os.path.dirname(os.path.abspath(path)), "rev-parse", "HEAD")
    blob = git_blob_sha1(data)
    return {"path": os.path.abspath(path), "sha256": hashlib.sha256(data).hexdigest(), "blob": blob,
            "commit": commit, "committed": None if commit is None else head_blob(path) == blob}


FIXED_FILES = ("prepare.py", "constants.py", "autoresearch")  # the fixed harness: the same for every compared run
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project these fixed files ran from


def fixed_blobs(root=ROOT):
    """{path: git blob id} of the fixed files' Python sources on disk under root: what a run's fixed code was."""
    paths = [name for name in FIXED_FILES if name.endswith(".py")]
    folder = os.path.join(root, "autoresearch")
    paths += sorted(f"autoresearch/{n}" for n in os.listdir(folder) if n.endswith(".py"))
    blobs = {}
    for path in paths:
        with contextlib.suppress(OSError), open(os.path.join(root, path), "rb") as f:
            blobs[path] = git_blob_sha1(f.read())
    return blobs


def git_archive(rev, *paths):
    """The files of commit `rev` (all, or those at paths) as git archive's tar bytes, or None where git fails."""
    try:
        proc = subprocess.run(["git", "archive", "--format=tar", rev, *paths], capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def untar(data, folder):
    """Unpack tar bytes (git's own archives) into folder; with the data filter where Python has it."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(folder, filter="data")
        else:
            tar.extractall(folder)


def printable(text):
    """text safe to store and show: non-UTF-8 bytes become U+FFFD, control characters are escaped (\\x1b)."""
    text = str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in text)


def head_blob(path, rev="HEAD"):
    """The blob id of the file at path in its checkout's HEAD (or `rev`), or None."""
    return git(os.path.dirname(os.path.abspath(path)), "rev-parse", f"{rev}:./{os.path.basename(path)}")


def gpu_of(data):
    """The GPU model a record names ("" before the run saw its device; older records: in their summary)."""
    data = data or {}
    return " ".join(str(data.get("gpu") or (data.get("summary") or {}).get("gpu") or "").split())


def new_run_id():
    """A run id that no other run has: the start time and 48 random bits, e.g. 20261129-231502-3fa9c2d1e07b."""
    return f"{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(6)}"


def pid_alive(pid):
    """True while a process with this pid exists on this machine (another user's too)."""
    try:
        os.kill(int(pid), 0)
    except PermissionError:
        return True
    except (TypeError, ValueError, OSError):
        return False
    return True


def read_regular(path):
    """The bytes of the regular file at path; an OSError for anything else (never a blocking read)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file")
    with os.fdopen(fd, "rb") as f:
        return f.read()


def read(path):
    """The record at path as a dict, or None when there is none or it does not parse."""
    try:
        data = json.loads(read_regular(path))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT and "run_id" in data else None


class RunRecord:
    """This process's run.json. `data` holds what is written; save() writes it whole, atomically."""

    def __init__(self, train_file, settings, constants, folder=None):
        self.path = os.path.join(folder or os.getcwd(), RECORD_NAME)
        self.data = {"format": FORMAT, "run_id": new_run_id(), "status": "running", "pid": os.getpid(),
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "code": code_identity(train_file), "fixed": fixed_blobs(), "settings": settings,
                     "constants": dict(constants),
                     "evaluations": [], "violations": [], "reason": None, "summary": None}
        self.evaluating, self.noted = False, []  # the metric has begun; what the fixed code saw against the rules
        self.save()

    @property
    def run_id(self):
        return self.data["run_id"]

    def save(self):
        """Write the record atomically; when it cannot be written, say so on stderr and go on."""
        try:
            write_atomically(self.path, json.dumps(self.data, indent=1).encode("utf-8"))
        except OSError as e:
            print(f"note: cannot write the run's record {self.path} ({e.strerror or e})", file=sys.stderr)

    def finish(self, summary, violations, **details):
        """The run ended in its summary: status finished, the summary's values, the violations and details."""
        self.data.update(status="finished", summary=summary, violations=list(violations), **details)
        self.save()

    def fail(self, reason):
        """The run stopped before its summary: status failed, and why in one line (a finished run stays so)."""
        if self.data["status"] == "running":
            self.data.update(status="failed", reason=reason)
            self.save()


_current = None  # this process's run record, once runtime.main started it


def start(train_file, settings, constants, folder=None):
    global _current
    _current = RunRecord(train_file, settings, constants, folder)
    return _current


def current():
    return _current


def stop():
    global _current
    _current = None


def evaluation_starts():
    """The metric (prepare.evaluate_bpb) starts scoring: training is over."""
    if _current is not None:
        _current.evaluating = True


def note_violation(what):
    """What the fixed code saw train.py do against the rules: the run compares with no other."""
    if _current is not None:
        _current.noted.append(what)


def note_evaluation(evaluation):
    """Called by the metric (prepare.evaluate_bpb) with what it scored; kept for the run's summary and record."""
    if _current is not None:
        _current.data["evaluations"].append(dict(evaluation))
