"""Recording a run in the results log: `uv run -m autoresearch.results record STATUS DESCRIPTION`.

Which run a log is, whether it may be recorded (each refusal one `error:` line that writes nothing), and its row.
Standard library only.
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import stat

from autoresearch import fleet
from autoresearch import record as run_record
from autoresearch.errors import UserError
from autoresearch.record import printable
from autoresearch.results import (COLUMNS, RERUN, STATUSES, archived_records, best_experiment, experiment_speed,
                                  experiments, gpu_groups, noise_floor, off_speed, prove, read_rows, run_speed,
                                  runs_folder, speed_ratio, verdict)


def crash_reason(text):
    """What ended a run without a record of its own, in a few words, from the last lines of its log."""
    for line in reversed(text.strip().splitlines()[-50:]):
        line = line.strip()
        if line.startswith(("error:", "FAIL")) or re.match(r"^\w+(Error|Exception)\b", line):
            return line[:100]
    return "no summary: stopped or timed out"


def head_commit():
    """The short hash of HEAD in the current folder; one `error:` line outside a git checkout."""
    short = run_record.git(".", "rev-parse", "--short", "HEAD")
    if not short:
        raise UserError("cannot read the commit (`git rev-parse HEAD` failed): run this in the experiment's git "
                        "checkout, after its first commit")
    return short


def identify(text, log_dir):
    """(run id or None, record or None, 'finished' or 'crash', reason) of a log; refuses a mismatch or a live run."""
    data = run_record.read(os.path.join(log_dir, run_record.RECORD_NAME))
    started = re.findall(r"^run: (\S+)$", text, flags=re.M)
    if data is not None and started and started[-1] == data["run_id"]:
        if data["status"] == "finished":
            return data["run_id"], data, "finished", None
        if data["status"] == "running":
            if data.get("pid") and run_record.pid_alive(data["pid"]) and data["pid"] != os.getpid():
                raise UserError(f"run {data['run_id']} is still going (pid {data['pid']}): record it when it ends")
            said = crash_reason(text)  # (the log's own last error, where it has one)
            return data["run_id"], data, "crash", (said if not said.startswith("no summary") else
                                                   "killed before its summary (SIGKILL? the OOM killer?)")
        return data["run_id"], data, "crash", (data.get("reason") or "failed")[:160]
    if started:
        raise UserError(f"the log is of run {started[-1]}, but {run_record.RECORD_NAME} "
                        + (f"is of run {data['run_id']}" if data else "is missing or unreadable")
                        + ": they do not belong together; run again")
    return None, None, "crash", crash_reason(text)


def check_code(data, short, commit=None):
    """Refuse a run whose train.py is not the one committed at HEAD (a fleet run's: at its `commit`)."""
    if commit is not None:
        blob = data["code"]["blob"] if data is not None else None
        if blob and run_record.head_blob("train.py", commit) != blob:
            raise UserError(f"the train.py that ran is not the one in {short}: not recorded")
        return
    code = data["code"] if data is not None and data["code"]["blob"] else run_record.code_identity("train.py")
    if code["blob"] is not None and run_record.head_blob(code["path"]) != code["blob"]:
        raise UserError(f"the train.py that ran is not the one in HEAD ({short}): commit the code that ran first "
                        "(`git commit -am \"<idea>\"`), then record; if you reset or edited since, run again")


def check_checkout(data):
    """Refuse, in one line, a run from another checkout: it belongs to that checkout's results."""
    where = data["code"].get("path") if data is not None else None
    if where:
        here = run_record.git(".", "rev-parse", "--show-toplevel")
        there = run_record.git(os.path.dirname(where), "rev-parse", "--show-toplevel")
        if here and there and os.path.realpath(here) != os.path.realpath(there):
            raise UserError(f"this run ran in another checkout ({there}): record it there (`cd {there}`), under the "
                            "commit it ran on")


def branch_start():
    """The commit this branch left main (or master) at, or None: the fixed files before a baseline exists."""
    for name in ("main", "master"):
        if run_record.git(".", "rev-parse", "--verify", "-q", f"refs/heads/{name}"):
            return run_record.git(".", "merge-base", "HEAD", name)
    return None


def committed_fixed(commit):
    """{path: blob id} of the fixed files' Python sources in a commit (as record.fixed_blobs lists them)."""
    out = run_record.git(".", "ls-tree", "-r", commit, "--", *run_record.FIXED_FILES) or ""
    blobs = {}
    for line in out.splitlines():
        meta, _, path = line.partition("\t")
        if path.endswith(".py") and path.count("/") <= 1:
            blobs[path] = meta.split()[2]
    return blobs


def check_fixed(data, base):
    """Refuse, naming the file, a run whose prepare.py, constants.py or autoresearch/ are not commit `base`'s."""
    expected = committed_fixed(base) if base else {}
    if not expected:
        return
    ran = data.get("fixed") or committed_fixed(data["code"].get("commit") or "HEAD")  # (records before the hashes)
    changed = sorted(p for p in set(ran) | set(expected) if ran.get(p) != expected.get(p))
    if changed:
        raise UserError(f"{changed[0]} is not the baseline's (commit {base[:7]})"
                        + (f", nor are {', '.join(changed[1:])}" if changed[1:] else "")
                        + ": the fixed files never change, so this run's val_bpb is another metric; not recorded. "
                        f"Put them back (`git checkout {base[:7]} -- {' '.join(run_record.FIXED_FILES)}`), commit, "
                        "run again")


# ---------------------------------------------------------------------------------------------------------------
# The row

@contextlib.contextmanager
def locked(path):
    """Hold results.tsv's lock (filelock's, beside it): one `record` at a time, agents and fleet waves included."""
    import filelock
    lock = filelock.FileLock(path + ".lock", is_singleton=False)
    try:
        lock.acquire()
    except OSError as e:
        raise UserError(f"cannot write in {os.path.dirname(path) or '.'} ({e.strerror or e}): record needs a "
                        "writable folder for results.tsv and runs/") from None
    try:
        yield
    finally:
        lock.release(force=True)


def append_row(path, row):
    """Append the row to the results file as one whole-line write (a new file gets the header first)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        old = run_record.read_regular(path)
        end = b"\r\n" if b"\r\n" in old else b"\n"
        line = "\t".join(row[c] for c in COLUMNS).encode("utf-8") + end
        if not old.strip():
            line = "\t".join(COLUMNS).encode("utf-8") + end + line
        elif not old.endswith((b"\n", b"\r")):
            line = end + line
        f.write(line)


def record(status, description, log="run.log", path="results.tsv", runs_dir=None, overrule=False, run=None):
    """Append the run's row (of `log`, or the fleet's run `run`) to `path` and print it with its verdict and notes."""
    meta = fleet.brought(run) if run is not None else None
    if meta is not None:
        log = os.path.join(fleet.local_folder(run), "run.log")
    if status not in STATUSES:
        raise UserError(f"status {status!r}: use one of {', '.join(STATUSES)}")
    description = printable(" ".join(description.split()))
    if not description:
        raise UserError("give a short description of what the run tried")
    try:
        text = run_record.read_regular(log).decode("utf-8", "replace")
    except OSError as e:
        raise UserError(f"cannot read the run's log {log} ({e.strerror or e}): run "
                        "`timeout 600 uv run train.py > run.log 2>&1` first")
    log_dir = os.path.dirname(os.path.abspath(log))
    run_id, data, kind, reason = identify(text, log_dir)
    if meta is not None and data is None:  # (a fleet run that stopped before its record: the fleet's run id)
        run_id = f"fleet-{run}"
    if meta is not None and kind != "finished" and meta.get("error"):  # (the fleet's word on why it ended)
        reason = str(meta["error"])
    check_checkout(data)
    notes = []
    if kind == "finished":
        if status == "crash":
            raise UserError(f"{log} is a finished run (val_bpb {data['val_bpb']:.6f}): a finished run is keep or "
                            "discard")
        if data["violations"] and status == "keep":
            raise UserError(f"this run compares with no other ({'; '.join(data['violations'])}): it cannot be kept; "
                            "record it as discard and undo the cause")
        val_bpb, memory = f"{data['val_bpb']:.6f}", f"{data['peak_vram_mb'] / 1024:.1f}"
    else:
        if status != "crash":
            notes.append(f"{log} has no finished run ({reason}): recorded as a crash")
        status, val_bpb, memory = "crash", "0.000000", "0.0"
        description = printable(f"{description} ({' '.join(reason.split())})" if reason not in description
                                else description)
    short = meta["short"] if meta else head_commit()
    check_code(data, short, meta and meta["commit"])
    # A run's files are runs/<its id>.*, so a run is recorded once by construction; a log without a run (train.py
    # stopped before the fixed code started) is named by its commit and text: once per commit.
    log_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    run_id = run_id or f"log-{short}-{log_digest[:16]}"
    gpu = printable(run_record.gpu_of(data))
    real = os.path.realpath(path)
    runs_dir = runs_dir or runs_folder(path)
    with locked(real):
        problems = []
        stem = os.path.join(runs_dir, run_id)
        archived = archived_records(runs_dir)
        if os.path.lexists(stem + ".json"):
            said = next((d["recorded"] for d in archived if d.get("run_id") == run_id), {})
            raise UserError(f"this run ({run_id}) is already recorded, as row {said.get('number', '?')} of "
                            f"{said.get('file', runs_dir)}: run the next experiment first")
        rows = prove(read_rows(real, problems), archived, real, problems) if os.path.lexists(real) else []
        notes += [f"reading {path}: {p}" for p in problems]
        groups = gpu_groups(rows + [dict(gpu=gpu, status=status)])  # (this run's model is the last)
        same = [r for r, g in zip(rows, groups) if g == groups[-1]]
        baseline = next((r["record"] for r in same if r.get("record") and r["record"].get("status") == "finished"),
                        None)
        if kind == "finished":  # the fixed files of the baseline's commit (or the branch's start)
            check_fixed(data, (baseline or {}).get("code", {}).get("commit") or branch_start())
        if kind == "finished" and baseline is not None and baseline.get("settings") != data["settings"]:
            raise UserError(f"this run's settings ({data['settings']}) differ from the baseline's "
                            f"({baseline.get('settings')}): its val_bpb does not compare; not recorded. Run it again "
                            "with the baseline's settings")
        if kind == "finished" and any(r["commit"] == short and r["status"].lower() != "crash" for r in same):
            if not description.endswith(RERUN):
                description += RERUN
        row = dict(commit=short, val_bpb=val_bpb, memory_gb=memory, status=status, description=description, gpu=gpu)
        judged = judge(same, dict(row, speed=run_speed(data)))
        if judged["contradiction"] and not overrule:
            raise UserError(f"{judged['line']}: `{status}` contradicts it; not recorded. Record "
                            f"{'keep' if status == 'discard' else 'discard'}, or add --overrule if you mean it")
        number = len(rows) + 1
        saved = dict(data or {"run_id": run_id, "status": "crashed before its record began"})
        saved["recorded"] = dict(number=number, row=[row[c] for c in COLUMNS], file=real)
        where = runs_dir  # (what an OSError is said of: runs/ first, then the results file)
        try:  # the run's files first, then the row: both or neither, whatever stops them
            os.makedirs(runs_dir, exist_ok=True)
            run_record.write_atomically(stem + ".log", text.encode("utf-8"))
            run_record.write_atomically(stem + ".json", json.dumps(saved, indent=1).encode("utf-8"))
            where = path
            append_row(real, row)
        except BaseException as e:
            for suffix in (".log", ".json"):
                with contextlib.suppress(OSError):
                    os.remove(stem + suffix)
            if isinstance(e, OSError):
                raise UserError(f"cannot write {where} ({e.strerror or e}): nothing recorded") from None
            raise
    print("\t".join(row[c] for c in COLUMNS).rstrip("\t"))
    if judged["line"]:
        print(judged["line"] + (" (overruled)" if judged["contradiction"] else ""))
    for note in notes + judged["notes"]:
        print(printable(f"note: {note}"))
    return row


def judge(rows, row):
    """{line: the verdict or None, contradiction: the status goes against it, notes} of `row` against `rows`."""
    speed = row["speed"]
    exps = experiments([dict(r) for r in rows] + [row])
    floor, why = noise_floor(exps)
    exp = next(e for e in reversed(exps) if e["commit"] == row["commit"])
    out = dict(line=None, contradiction=False, notes=[])
    if len(exp["members"]) > 1 and row["status"] != "crash":
        out["notes"].append(f"a re-run of experiment #{exp['number']} ({exp['description']}): {len(exp['runs'])} "
                            f"runs, mean {exp['value']:.6f}")
    out["notes"].append(f"noise floor: {floor:.6f} ({why})" if floor is not None else f"noise floor: not set: {why}")
    best = best_experiment(exps, leave_out=exp)
    base = next((e for e in exps if e["finished"]), None)
    if row["status"] == "crash" or exp is base or best is None:
        return out
    said = verdict(exp["value"], best["value"], floor)
    if said is not None:
        rerun = len(exp["runs"]) > 1  # (a marginal win confirmed: its mean beats the best by more than F)
        value = f"{'mean ' if rerun else ''}{exp['value']:.6f}"
        deterministic = base["pair"] and base["pair"][0] == base["pair"][1]
        advice = {"better": "", "marginal": ": its mean beats the best by more than the floor: keep" if rerun else
                  ": identical runs repeat their value, so a re-run would tell nothing: keep it only if it makes "
                  "train.py simpler" if deterministic else ": keep it for now and run it again",
                  "equal": ": keep only if it makes train.py simpler", "worse": ""}[said]
        out["line"] = (f"verdict: {said} ({value} against the best {best['value']:.6f}, #{best['number']}; floor "
                       f"{floor:.6f}){advice}")
        wins = ("better", "marginal") if rerun and not deterministic else ("better",)
        out["contradiction"] = ((said in wins and row["status"] == "discard")
                                or (said == "worse" and row["status"] == "keep"))
    ratio = speed_ratio(speed, experiment_speed(best))
    if off_speed(ratio):
        out["notes"].append(f"this run trained at {ratio:.2f}x the model FLOP/s of the best's runs: under a time "
                            "budget val_bpb follows speed, so if the change was not meant to change speed the machine "
                            "did: run it again before trusting the verdict (or use AUTORESEARCH_BUDGET=flops)")
    return out
