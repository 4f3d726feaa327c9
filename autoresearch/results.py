"""The experiment log: record each run as a row of results.tsv, and summarize every agent's results.

    uv run -m autoresearch.results record keep "halve TOTAL_BATCH_SIZE"  # after a run: appends its row
    uv run -m autoresearch.results record discard "GELU"                 # crash: for a run that did not finish
    uv run -m autoresearch.results                                       # the summary of every agent's results
    uv run -m autoresearch.results verify 4                              # the 4 best kept commits run again

A row is the reference's five columns (commit, val_bpb, memory_gb, status, description), then the GPU model,
tab-separated. `record` takes it from the run's record (run.json, written by the fixed code; record.py) and git,
never from text the agent's code printed; it keeps the run's log and record as runs/<run id>.log/.json and then
appends the row as one whole line: no byte already in results.tsv is ever rewritten. The rows are the runs':
the summary and the verdicts read each row as its run's record in runs/ says it was, and name the rows that say
otherwise (edited by hand) or that no run proves. `record` refuses, in one line and writing nothing, a run recorded
already, a run still going, a log and a record of different runs, a train.py that is not the commit's, fixed files
that are not the baseline's, constants that are not the settings', and a status the verdict contradicts. A run
without a finished record is a crash, whatever was asked. Standard library only.
"""
import argparse
import contextlib
import errno
import functools
import glob
import hashlib
import json
import math
import os
import re
import stat
import subprocess
import sys
import tempfile

from autoresearch import fleet
from autoresearch import record as run_record
from autoresearch.errors import UserError
from autoresearch.record import printable

# The reference's five columns, then the GPU model the run ran on: runs on different GPU models never compare (each
# model has its own baseline, floor and verdicts). A file without the gpu column reads as one unknown model.
COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description", "gpu"]
REFERENCE = COLUMNS[:5]
STATUSES = ("keep", "discard", "crash")
MIN_FLOOR = 0.001  # program.md: the noise floor is the spread of the baseline's runs, at least this
SPEED_TOLERANCE = 0.10  # a run whose model FLOP/s is more than 10% off the baseline's ran on another machine, in effect
RESULTS = ["results.tsv", "results/*.tsv"]  # this folder's, and those gathered from other machines
RERUN = " (rerun)"


# ---------------------------------------------------------------------------------------------------------------
# Reading

def _is_header(fields):
    names = {f.strip().lower() for f in fields}
    return "commit" in names and "val_bpb" in names


def _lines(numbers):
    shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"


def read_rows(path, problems):
    """The rows of one results file as dicts of COLUMNS (missing values ""), in order. Takes what editors leave (a
    byte-order mark, CRLF, no header line, a 5-column header over 6-column rows, a tab inside a description, a short
    row) and says in one line of `problems` what it made of them; a path that is not a regular file is skipped."""
    try:
        text = run_record.read_regular(path).decode("utf-8", "replace").lstrip("\ufeff")
    except OSError as e:
        problems.append(f"{path} cannot be read ({e.strerror or e}): skipped")
        return []
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        problems.append(f"{path} is empty (not even the header line): skipped")
        return []
    odd, first = [], lines[0].split("\t")
    if _is_header(first):
        header, body, start = [h.strip().lower() for h in first], lines[1:], 2
    else:
        header, body, start = list(COLUMNS if len(first) > len(REFERENCE) else REFERENCE), lines, 1
        odd.append(f"has no header line: read as the columns {', '.join(header)}")
    missing = [c for c in REFERENCE if c not in header]
    extra = [h for h in header if h not in COLUMNS]
    if missing:
        odd.append(f"no {', '.join(missing)} column in the header: left blank")
    if extra:
        odd.append(f"column(s) {', '.join(extra)} are not results.tsv's: ignored")
    rows, tabs, short = [], [], []
    for n, line in enumerate(body, start):
        if not line.strip():
            continue
        fields, names = line.split("\t"), header
        if "gpu" not in header and len(fields) == len(header) + 1:
            names = header + ["gpu"]  # (a row record wrote under a header without the gpu column)
        elif len(fields) > len(names) and "description" in names:
            tabs.append(n)
            d, glued = names.index("description"), len(fields) - len(names) + 1
            fields = fields[:d] + [" ".join(fields[d:d + glued])] + fields[d + glued:]
        elif len(fields) < len(names) - (names[-1] == "gpu"):
            short.append(n)
        row = dict(zip(names, fields))
        rows.append({c: printable(row.get(c, "").strip()) for c in COLUMNS})
    if tabs:
        odd.append(f"a tab inside the description on {_lines(tabs)}: read as part of it")
    if short:
        odd.append(f"fewer fields than the header's {len(header)} on {_lines(short)}: missing ones left blank")
    if odd:
        problems.append(f"{path}: " + "; ".join(odd))
    return rows


def to_float(text):
    """The number in a results cell, or nan for anything else (N/A, empty, inf)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def runs_folder(path):
    """The runs/ folder that belongs to a results file: beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), "runs")


def archived_records(runs_dir):
    """The records of the runs kept in runs_dir (runs/*.json) that say which row they were recorded as."""
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(runs_dir), "*.json"))):
        try:
            data = json.loads(run_record.read_regular(path))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("recorded"), dict):
            out.append(data)
    return out


def prove(rows, records, path, problems):
    """Each row as the run it was recorded from says it was: the rows of a commit take, in order, the records in
    runs/ of that commit (those recorded into this file first), and their values, status and GPU come from the
    record. A row whose own text differs is named in `problems`; where runs/ holds records, a finished row that none
    proves (added by hand) is named and not counted. Each row gets `record` (or None) and `speed` (model FLOP/s of
    a run under the time budget, else None)."""
    real, queues = os.path.realpath(path), {}
    for data in sorted(records, key=lambda d: (d["recorded"].get("file") != real, d["recorded"].get("number", 0))):
        recorded = data["recorded"].get("row")
        if isinstance(recorded, list) and len(recorded) >= len(REFERENCE):
            queues.setdefault(str(recorded[0]), []).append(data)
    differ, unproven = [], []
    for n, row in enumerate(rows, 1):
        queue = queues.get(row["commit"])
        data = row["record"] = queue.pop(0) if queue else None
        if data is None:
            if records and row["status"].lower() != "crash":
                row["unproven"] = True
                unproven.append(f"#{n} {row['commit']}")
        else:
            said = dict(zip(COLUMNS, map(str, data["recorded"]["row"])))
            changed = [c for c in ("val_bpb", "status") if row[c] != said[c]]
            if changed:
                differ.append(f"#{n} {row['commit']} ({', '.join(f'{c} {row[c]!r}, its run {said[c]!r}' for c in changed)})")
                row["differs"] = True
            row.update({c: printable(said.get(c, row[c])) for c in ("val_bpb", "memory_gb", "status", "gpu")})
        speed = data.get("model_flops_per_sec") if data and data.get("budget_kind", "time") == "time" else None
        row["speed"] = speed if isinstance(speed, (int, float)) and speed > 0 else None
    if differ:
        problems.append(f"{path}: row(s) {'; '.join(differ)} differ from the runs in runs/ they were recorded from "
                        "(edited by hand?): the runs' values are used")
    if unproven:
        problems.append(f"{path}: row(s) {', '.join(unproven)} match no run in runs/ (added by hand?): not counted")
    return rows


def experiments(rows, agent="", problems=None):
    """One agent's experiments from its rows. A row whose description ends in " (rerun)" joins the latest
    experiment of its commit (the rows of one experiment need not be adjacent: the baseline may be run again
    later); every other row starts an experiment. An experiment is worth the mean val_bpb of its finished runs.
    Each experiment is a dict: number (1, 2, ...), commit, description, status (its last row's), rows, runs
    (val_bpb of each finished run), speeds (model FLOP/s of each, None where unknown), value (their mean, nan if
    none finished), finished (a value and not a crash)."""
    problems = [] if problems is None else problems
    out, latest = [], {}
    for row in rows:
        value, status = to_float(row["val_bpb"]), row["status"].lower()
        if status not in STATUSES:
            problems.append(f"{agent}: a row of {row['commit'] or '?'} has status {row['status']!r}, not one of "
                            f"{', '.join(STATUSES)}: counted as a crash")
            status = "crash"
        finished = status != "crash" and value > 0 and not row.get("unproven")
        if status != "crash" and not finished and not row.get("unproven"):
            problems.append(f"{agent}: {row['commit'] or '?'} is `{status}` without a val_bpb "
                            f"({row['val_bpb']!r}): counted as not finished")
        run, speed = ([value], [row.get("speed")]) if finished else ([], [])
        joined = latest.get(row["commit"]) if row["description"].endswith(RERUN) else None
        if joined is not None:
            joined["runs"] += run
            joined["speeds"] += speed
            joined["rows"] += 1
            if status != "crash":
                joined["status"] = status
        else:
            exp = dict(number=len(out) + 1, commit=row["commit"], description=row["description"], status=status,
                       runs=run, speeds=speed, rows=1)
            out.append(exp)
            if status != "crash":
                latest[row["commit"]] = exp
    for e in out:
        e["value"] = sum(e["runs"]) / len(e["runs"]) if e["runs"] else math.nan
        e["finished"] = e["status"] != "crash" and bool(e["runs"])
        e["pair"] = None
    base = next((e for e in out if e["finished"]), None)
    if base is not None:  # the baseline is worth its latest pair of runs: the same runs as the noise floor
        base["pair"] = baseline_pair(base)
        if base["pair"]:
            base["value"] = sum(base["pair"]) / 2
    return out


def baseline_pair(base):
    """The baseline's latest two runs that ran at the same speed (within SPEED_TOLERANCE; runs of unknown speed,
    and runs under the compute budget, agree with any): the runs its value and the noise floor come from, so that
    a baseline run again later (the machine changed) renews both. None until two such runs exist."""
    runs = list(zip(base["runs"], base["speeds"]))
    for i in range(len(runs) - 1, 0, -1):
        value, speed = runs[i]
        for earlier, earlier_speed in reversed(runs[:i]):
            if not (speed and earlier_speed and off_speed(earlier_speed / speed)):
                return (earlier, value)
    return None


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def experiment_speed(exp):
    """An experiment's model FLOP/s (median over its runs with a known speed), or None (none known, or the compute
    budget)."""
    speeds = [s for s in (exp["speeds"] if exp else []) if s]
    return _median(speeds) if speeds else None


def best_experiment(exps, leave_out=None):
    """The finished `keep` experiment with the lowest value (leaving out `leave_out`), or None."""
    kept = [e for e in exps if e["status"] == "keep" and e["finished"] and e is not leave_out]
    return min(kept, key=lambda e: e["value"]) if kept else None


def speed_ratio(speed, reference):
    """speed / reference, or None where either is unknown."""
    return speed / reference if speed and reference else None


def off_speed(ratio):
    """True when a speed ratio says the run ran on what was, in effect, another machine."""
    return ratio is not None and abs(ratio - 1) > SPEED_TOLERANCE


def noise_floor(exps):
    """(floor, why): the spread of the baseline's latest pair of same-speed runs (baseline_pair), at least
    MIN_FLOOR. floor is None, and why says what to do, until such a pair exists."""
    base = next((e for e in exps if e["finished"]), None)
    if base is None:
        return None, "no finished baseline run yet"
    if len(base["runs"]) < 2:
        return None, "one baseline run so far: run the baseline again"
    if not base["pair"]:
        shown = ", ".join(f"{s:.3g}" if s else "?" for s in base["speeds"])
        return None, (f"the baseline's runs ran at different speeds (model FLOP/s {shown}; more than "
                      f"{SPEED_TOLERANCE:.0%} apart: a busy or throttled machine): run the baseline again")
    a, b = base["pair"]
    if a == b:
        return MIN_FLOOR, (f"the minimum: the baseline's latest 2 runs of {len(base['runs'])} are identical (a "
                           "deterministic machine: a re-run repeats its value)")
    return max(abs(a - b), MIN_FLOOR), f"from the baseline's latest 2 runs of {len(base['runs'])}"


def verdict(value, best, floor):
    """What the rules make of a value against the best B and the floor F: better (v < B - 2F), marginal
    (B - 2F <= v < B - F: run it again), equal (within F), worse (v > B + F); None without a best and a floor."""
    if best is None or floor is None or math.isnan(value):
        return None
    if value < best - 2 * floor:
        return "better"
    if value < best - floor:
        return "marginal"
    return "equal" if value <= best + floor else "worse"


def agent_name(path):
    """An agent's name: the folder of a results.tsv, else the file's own name (results/host2.tsv: host2)."""
    if os.path.basename(path) == "results.tsv":
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.path.splitext(os.path.basename(path))[0]


def load(patterns=RESULTS):
    """(paths, {agent: experiments}, problems) for every results file the patterns find, each row as its run in
    runs/ proves it (prove); a file's runs on several GPU models are one group each ("<file> on <model>")."""
    paths = sorted({os.path.abspath(p) for pattern in patterns for p in glob.glob(pattern)})
    agents, problems = {}, []
    for path in paths:
        name = agent_name(path)
        rows = prove(read_rows(path, problems), archived_records(runs_folder(path)), path, problems)
        groups = gpu_groups(rows)
        for gpu in sorted(set(groups)):  # (one group per GPU model: their numbers never mix)
            group = name if len(set(groups)) == 1 else f"{name} on {gpu or 'an unknown GPU'}"
            agents[group] = experiments([r for r, g in zip(rows, groups) if g == gpu], group, problems)
    return paths, agents, problems


def gpu_groups(rows):
    """The GPU model each row is judged with: its own; a crash without one (it stopped before it saw its device)
    takes the latest model above it, else the first below; a finished row without one (a file from before the gpu
    column) is an unknown model's, never compared with a known one."""
    known = [r["gpu"] for r in rows if r["gpu"]]
    current, out = (known[0] if known else ""), []
    for r in rows:
        current = r["gpu"] or current
        out.append(current if r["gpu"] or r["status"].lower() == "crash" else "")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The summary

def agent_lines(exps):
    """(lines, table row parts) of one agent's summary: counts, the noise floor, the kept changes, the baseline,
    the best, the tip the next experiment starts from, gains, and the runs whose speed makes their verdict
    unreliable."""
    counts = {s: sum(e["status"] == s for e in exps) for s in STATUSES}
    decided = counts["keep"] + counts["discard"]
    runs = sum(e["rows"] for e in exps)
    floor, why = noise_floor(exps)
    lines = [f"{len(exps)} experiments: {counts['keep']} keep, {counts['discard']} discard, {counts['crash']} crash"
             + (f" ({runs} runs: the re-runs of a commit are one experiment)" if runs != len(exps) else ""),
             f"keep rate: {counts['keep'] / decided:.1%} of the experiments that finished" if decided
             else "keep rate: no experiment finished",
             f"noise floor: {floor:.6f} ({why})" if floor is not None else f"noise floor: not set: {why}"]
    speed = experiment_speed(best_experiment(exps))
    flag = {e["number"]: speed_ratio(experiment_speed(e), speed) for e in exps}
    mark = lambda e: f"  [{flag[e['number']]:.2f}x the best's speed]" if off_speed(flag[e["number"]]) else ""  # noqa
    kept = [e for e in exps if e["status"] == "keep" and e["finished"]]
    if not kept:
        return lines + ["No kept result yet: nothing to compare."], (0, None, None, "")
    lines.append("kept changes, in order:")
    lines += [f"  #{e['number']:<4} {e['value']:.6f}  {e['commit']}  {e['description']}{mark(e)}" for e in kept]
    baseline, top, tip = kept[0]["value"], min(kept, key=lambda e: e["value"]), kept[-1]
    best = top["value"]
    lines += [f"baseline: {baseline:.6f}" + (f" (mean of its latest 2 runs of {len(kept[0]['runs'])})"
                                             if kept[0]["pair"] else ""),
              f"best:     {best:.6f} (#{top['number']} {top['commit']}: the bar a change must beat by the floor)"]
    if tip is not top:
        within = floor is not None and tip["value"] - best <= floor
        lines.append(f"tip:      {tip['value']:.6f} (#{tip['number']} {tip['commit']}, the last kept commit: the next "
                     "experiment starts here; " + ("equal to the best within the floor, kept as the simpler code)"
                                                   if within else "worse than the best by more than the floor!)"))
    lines += [f"total improvement: {baseline - best:.6f} ({(baseline - best) / baseline:.2%})",
              "Kept changes ranked by gain over the best result before them:"]
    gains, best_before = [], baseline
    for e in kept[1:]:
        gains.append((best_before - e["value"], e))
        best_before = min(best_before, e["value"])
    for gain, e in sorted(gains, key=lambda ge: -ge[0]):
        reruns = f" (mean of {len(e['runs'])} runs)" if len(e["runs"]) > 1 else ""
        lines.append(f"  {gain:+.6f}  #{e['number']:<4} {e['description']}{reruns}")
    if not gains:
        lines.append("  (only the baseline so far)")
    odd = [e for e in exps if off_speed(flag[e["number"]])]
    if odd:
        lines.append(f"Ran more than {SPEED_TOLERANCE:.0%} away from the best's speed (model FLOP/s, time budget: a "
                     "busy machine, or a change that costs speed): their verdicts are unreliable, re-run to tell")
        lines += [f"  #{e['number']:<4} {flag[e['number']]:.2f}x  {e['status']:<7} {e['description']}" for e in odd]
    return lines, (len(kept), baseline, best, f"#{top['number']} {top['commit']} {top['description']}")


def summary_lines(paths, agents, problems):
    """The summary as text lines: per agent its counts, noise floor, baseline, best, tip, and kept changes ranked
    by what each gained over the best before it; then each agent's best in one table."""
    lines = [f"{len(paths)} results file(s): " + (", ".join(f"{agent_name(p)} ({p})" for p in paths) or "none")]
    lines += [f"note: {p}" for p in problems]
    table = []
    for agent, exps in agents.items():
        body, (n_kept, baseline, best, change) = agent_lines(exps)
        lines += ["", f"== {agent} =="] + body
        table.append((agent, len(exps), n_kept, sum(e["status"] == "crash" for e in exps), baseline, best, change))
    lines += ["", "Each agent's best:", f"{'agent':<24} {'exps':>5} {'kept':>5} {'crash':>5} {'baseline':>9} "
              f"{'best':>9}  best change"]
    for agent, n, k, c, base, best, change in table:
        fmt = (lambda v: f"{v:9.6f}" if v is not None else f"{'-':>9}")  # noqa: E731
        lines.append(f"{agent:<24} {n:>5} {k:>5} {c:>5} {fmt(base)} {fmt(best)}  {change}")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Recording

def summary_blocks(text):
    """[{key: value}] of each block after a `---` line in a run log, in order."""
    return [dict(re.findall(r"^(\w+):[ \t]+(.*?)\s*$", block, flags=re.M))
            for block in ("\n" + text).split("\n---\n")[1:]]


def run_summary(text):
    """{key: value} of a run log's last summary block (after its last `---` line); empty when there is none.
    For people and benchmarks: `record` trusts the run's record, and reads the log only to check it against it."""
    blocks = summary_blocks(text)
    return blocks[-1] if blocks else {}


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


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, OSError):
        return False


def identify(text, log_dir):
    """What run the log is: (run id or None, record or None, kind, reason). kind is 'finished', or 'crash' with a
    reason in a few words; a log without a run (train.py stopped before the fixed code started) has no run id. Refuses, in one line, a log and a record of different runs, a finished-looking log without a
    record, and a run still going."""
    data = run_record.read(os.path.join(log_dir, run_record.RECORD_NAME))
    started = re.findall(r"^run: (\S+)$", text, flags=re.M)
    if data is not None and started and started[-1] == data["run_id"]:
        if data["status"] == "finished":
            return data["run_id"], data, "finished", None
        if data["status"] == "running":
            if data.get("pid") and _pid_alive(data["pid"]) and data["pid"] != os.getpid():
                raise UserError(f"run {data['run_id']} is still going (pid {data['pid']}): record it when it ends")
            said = crash_reason(text)  # (the log's own last error, where it has one)
            return data["run_id"], data, "crash", (said if not said.startswith("no summary") else
                                                   "killed before its summary (SIGKILL? the OOM killer?)")
        return data["run_id"], data, "crash", (data.get("reason") or "failed")[:160]
    if started:
        raise UserError(f"the log is of run {started[-1]}, but {run_record.RECORD_NAME} "
                        + (f"is of run {data['run_id']}" if data else "is missing or unreadable")
                        + ": they do not belong together; run again")
    if run_summary(text).get("val_bpb"):
        raise UserError("the log ends in a summary but names no run (no `run:` line): it did not come from this "
                        "project's train.py, or was cut; run again")
    return None, None, "crash", crash_reason(text)


def check_code(data, short, commit=None):
    """Refuse a run whose train.py is not, by content, the one committed at HEAD now (or at `commit`, a fleet
    run's), saying what to do. A run that stopped before its record began is judged by the train.py here, the best
    witness of what ran (a fleet run's by its commit alone: its tree was the commit's)."""
    if commit is not None:
        blob = data["code"]["blob"] if data is not None else None
        if blob and run_record.head_blob("train.py", commit) != blob:
            raise UserError(f"the train.py that ran is not the one in {short}: not recorded")
        return
    code = data["code"] if data is not None and data["code"]["blob"] else run_record.code_identity("train.py")
    if code["blob"] is not None and run_record.head_blob(code["path"]) != code["blob"]:
        raise UserError(f"the train.py that ran is not the one in HEAD ({short}): commit the code that ran first "
                        "(`git commit -am \"<idea>\"`), then record; if you reset or edited since, run again")


def branch_start():
    """The commit this branch left main (or master) at: where a night's fixed files come from before its baseline
    is recorded; None where neither branch exists."""
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
    """Refuse, in one line naming the file, a run whose fixed files (prepare.py, constants.py, autoresearch/) are not
    those of commit `base` (the baseline's, or the branch's start): its val_bpb would not be the same metric."""
    ran = data.get("fixed") or committed_fixed(data["code"].get("commit") or "HEAD")  # (records before the hashes)
    expected = committed_fixed(base)
    if not expected:
        return
    changed = sorted(p for p in set(ran) | set(expected) if ran.get(p) != expected.get(p))
    if changed:
        raise UserError(f"{changed[0]} is not the baseline's (commit {base[:7]})"
                        + (f", nor are {', '.join(changed[1:])}" if changed[1:] else "")
                        + ": the fixed files never change, so this run's val_bpb is another metric; not recorded. "
                        f"Put them back (`git checkout {base[:7]} -- {' '.join(run_record.FIXED_FILES)}`), commit, "
                        "run again")


def settings_env(settings, keep=()):
    """This shell's environment with the metric's settings of a record (`standard`, or the preset and overrides,
    NAME=value) in place of its own AUTORESEARCH_* variables (those in `keep` stay); None where they do not parse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_") or k in keep}
    if settings != "standard":
        for item in str(settings).split():
            name, sep, value = item.partition("=")
            if not (sep and name.startswith("AUTORESEARCH_")):
                return None
            env[name] = value
    return env


@functools.lru_cache(maxsize=None)
def expected_constants(settings, commit=None):
    """The metric's constants (constants.RESOLVED) that a run under `settings` (the `settings:` line: `standard`, or
    the preset and overrides, NAME=value) reads at start, computed afresh in a clean process from the constants.py
    of `commit` (the baseline's; else this checkout's); None if they cannot be (settings that do not parse, or that
    constants.py refuses)."""
    env = settings_env(settings)
    if env is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="autoresearch-constants-") as tmp:
        if commit is not None:  # the commit's constants.py and what it imports, not this checkout's
            archive = run_record.git_archive(commit, "constants.py", "autoresearch/__init__.py",
                                             "autoresearch/errors.py")
            if archive is not None:  # (a commit without them: this project's)
                run_record.untar(archive, tmp)
                root = tmp
        env["PYTHONPATH"] = root
        try:
            out = subprocess.run([sys.executable, "-c",
                                  "import json, constants; print(json.dumps(constants.RESOLVED))"],
                                 cwd=root, env=env, capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout) if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, ValueError):
            return None


def check_run(data, text):
    """Refuse, in one line, a run whose record the rules cannot trust: one from another checkout (it belongs to
    that checkout's results), one recorded already (in any results file), and for a finished run, a record whose
    values differ from its log's summary (rewritten after the run?) or whose constants and budget are not the ones
    its settings give (changed by train.py while it ran)."""
    if data is None:
        return
    where = data["code"].get("path")
    if where:
        here = run_record.git(".", "rev-parse", "--show-toplevel")
        there = run_record.git(os.path.dirname(where), "rev-parse", "--show-toplevel")
        if here and there and os.path.realpath(here) != os.path.realpath(there):
            raise UserError(f"this run ran in another checkout ({there}): record it there (`cd {there}`), under the "
                            "commit it ran on")
    done = data.get("recorded_in")
    if isinstance(done, dict):
        raise UserError(f"this run ({data['run_id']}) is already recorded, as row {done.get('row')} of "
                        f"{done.get('file')}: run the next experiment first")
    if data["status"] != "finished":
        return
    shown = next((to_float(b.get("val_bpb")) for b in summary_blocks(text) if b.get("run_id") == data["run_id"]),
                 math.nan)  # (the summary block of this run, by its run_id)
    if not abs(shown - data["val_bpb"]) <= 5e-7:
        raise UserError(f"the log's summary says val_bpb {shown} but the run's record says {data['val_bpb']}: the "
                        "record or the log was changed after the run; not recorded. Run again")


def check_rules(data, base):
    """Refuse a finished run whose fixed files are not those of commit `base` (check_fixed), or whose constants and
    budget are not the ones its settings give under base's constants.py (changed by train.py while it ran)."""
    if base is not None:
        check_fixed(data, base)
    expected = expected_constants(data["settings"], base)
    kind = data.get("budget_kind", "time")
    if expected is not None:
        active = "FLOP_BUDGET" if expected["BUDGET"] == "flops" else "TIME_BUDGET"  # (the other is no setting)
        changed = [f"{k} {data['constants'].get(k)!r} (its settings give {expected[k]!r})"
                   for k in ("MAX_SEQ_LEN", "EVAL_TOKENS", "BUDGET", active) if data["constants"].get(k) != expected[k]]
        if kind != expected["BUDGET"] or data.get("budget") != expected[active]:
            changed.append(f"the budget {kind} {data.get('budget')!r} (its settings give {expected['BUDGET']} "
                           f"{expected[active]!r})")
        if changed:
            raise UserError(f"this run did not run under the fixed rules of its settings ({data['settings']}): "
                            f"{'; '.join(changed)}: train.py changed them; it compares with no run; not recorded")


def mark_recorded(log_dir, data, real, number):
    """Say in the run's own record (run.json beside its log) which results file and row hold it, so that no other
    results file takes it too. A record that cannot be written is said, and the row stands."""
    marked = dict(data, recorded_in={"file": real, "row": number})
    path = os.path.join(log_dir, run_record.RECORD_NAME)
    try:
        run_record.write_atomically(path, json.dumps(marked, indent=1).encode("utf-8"))
    except OSError as e:
        return [f"cannot mark {path} as recorded ({e.strerror or e})"]
    return []


@contextlib.contextmanager
def locked(path):
    """Hold results.tsv's lock (results.tsv.lock beside the file, filelock's, as the cache's): one `record` at a
    time, agents and fleet waves included. A folder where the lock cannot be made is one `error:` line."""
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
    """Append the row to the results file at path (through a link, to its target) as one whole-line write; a new
    file gets the header first. Line ends follow the file's own; every byte already there stays."""
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
    """Append the row of the run in `log` (or of the fleet's run `run`, filed under its own commit) to the results
    file at `path` (see the module's docstring); prints the row, the verdict the rules give it and what it needs
    to be read with; returns the row. A status that contradicts the verdict (discard for a clear win, keep for a
    loss) is refused unless `overrule`."""
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
    check_run(data, text)
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
    log_digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    gpu = printable(run_record.gpu_of(data))
    real = os.path.realpath(path)
    runs_dir = runs_dir or runs_folder(path)
    with locked(real):
        problems = []
        archived = archived_records(runs_dir)
        rows = prove(read_rows(real, problems), archived, real, problems) if os.path.lexists(real) else []
        notes += [f"reading {path}: {p}" for p in problems]
        for earlier in archived:  # a run is recorded once; a log without a run, once per commit
            said = earlier["recorded"]
            if (run_id and said.get("identity") == run_id) or (not run_id and said.get("log") == log_digest
                                                               and said.get("row", [""])[0] == short):
                raise UserError(f"this run ({run_id or 'its log'}) is already recorded, as row {said.get('number')} "
                                f"({' '.join(map(str, said.get('row', [])[:1] + said.get('row', [])[3:]))}): run "
                                "the next experiment first")
        groups = gpu_groups(rows + [dict(gpu=gpu, status=status)])  # (this run's model is the last)
        same = [r for r, g in zip(rows, groups) if g == groups[-1]]
        baseline = next((r["record"] for r in same if r.get("record") and r["record"].get("status") == "finished"),
                        None)
        if kind == "finished":  # the fixed files and constants of the baseline's commit (or the branch's start)
            check_rules(data, (baseline or {}).get("code", {}).get("commit") or branch_start())
        if kind == "finished" and baseline is not None and baseline.get("settings") != data["settings"]:
            raise UserError(f"this run's settings ({data['settings']}) differ from the baseline's "
                            f"({baseline.get('settings')}): its val_bpb does not compare; not recorded. Run it again "
                            "with the baseline's settings")
        if kind == "finished" and any(r["commit"] == short and r["status"].lower() != "crash" for r in same):
            if not description.endswith(RERUN):
                description += RERUN
        row = dict(commit=short, val_bpb=val_bpb, memory_gb=memory, status=status, description=description, gpu=gpu)
        speed = data.get("model_flops_per_sec") if data and data.get("budget_kind", "time") == "time" else None
        judged = judge(same, dict(row, speed=speed))
        if judged["contradiction"] and not overrule:
            raise UserError(f"{judged['line']}: `{status}` contradicts it; not recorded. Record "
                            f"{'keep' if status == 'discard' else 'discard'}, or add --overrule if you mean it")
        number = len(rows) + 1
        run_id = run_id or f"log-{run_record.new_run_id()}"
        stem = os.path.join(runs_dir, run_id)
        saved = dict(data or {"run_id": run_id, "status": "crashed before its record began"})
        saved["recorded"] = dict(identity=run_id, number=number, row=[row[c] for c in COLUMNS], file=real,
                                 log=log_digest)
        try:
            os.makedirs(runs_dir, exist_ok=True)
            run_record.write_atomically(stem + ".log", text.encode("utf-8"))
            run_record.write_atomically(stem + ".json", json.dumps(saved, indent=1).encode("utf-8"))
        except OSError as e:
            for suffix in (".log", ".json"):
                with contextlib.suppress(OSError):
                    os.remove(stem + suffix)
            raise UserError(f"cannot keep the run's log in {runs_dir} ({e.strerror or e}): nothing recorded")
        try:
            append_row(real, row)
        except BaseException as e:  # (whatever stopped the row, the run's files go too: both or neither)
            for suffix in (".log", ".json"):
                with contextlib.suppress(OSError):
                    os.remove(stem + suffix)
            if isinstance(e, OSError):
                raise UserError(f"cannot write {path} ({e.strerror or e}): nothing recorded")
            raise
        if data is not None:
            notes += mark_recorded(log_dir, data, real, number)
    print("\t".join(row[c] for c in COLUMNS).rstrip("\t"))
    if judged["line"]:
        print(judged["line"] + (" (overruled)" if judged["contradiction"] else ""))
    for note in notes + judged["notes"]:
        print(printable(f"note: {note}"))
    return row


def judge(rows, row):
    """The verdict on `row` before it is written (rows: those already there, proven; row with its `speed`):
    {line: the verdict in words or None, contradiction: True when row's status is discard for a clear win or keep
    for a loss, notes: the experiment's runs, the noise floor, its speed}. A re-run is judged on its experiment's
    mean, against the best of the other experiments."""
    speed = row["speed"]
    exps = experiments([dict(r) for r in rows] + [row])
    floor, why = noise_floor(exps)
    exp = next(e for e in reversed(exps) if e["commit"] == row["commit"])
    out = dict(line=None, contradiction=False, notes=[])
    if exp["rows"] > 1 and row["status"] != "crash":
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
        out["contradiction"] = (said in wins and row["status"] == "discard") or (said == "worse" and
                                                                               row["status"] == "keep")
    ratio = speed_ratio(speed, experiment_speed(best))
    if off_speed(ratio):
        out["notes"].append(f"this run trained at {ratio:.2f}x the model FLOP/s of the best's runs: under a time "
                            "budget val_bpb follows speed, so if the change was not meant to change speed the machine "
                            "did: run it again before trusting the verdict (or use AUTORESEARCH_BUDGET=flops)")
    return out


def main(argv=None):
    """The command: `record STATUS DESCRIPTION`, or the summary."""
    ap = argparse.ArgumentParser(prog="uv run -m autoresearch.results",
                                 description="Record a run in results.tsv, or summarize the results.")
    sub = ap.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="append the row of the run in run.log (its record: run.json beside it)")
    rec.add_argument("status", choices=STATUSES)
    rec.add_argument("description")
    rec.add_argument("--log", default="run.log")
    rec.add_argument("--run", help="a fleet run's id: record it from fleet/<run id>/, under its own commit")
    rec.add_argument("--file", default="results.tsv")
    rec.add_argument("--overrule", action="store_true",
                     help="record a status that contradicts the verdict (discard a clear win, keep a loss)")
    ver = sub.add_parser("verify", help="run the best kept experiments again from a clean tree, in a fresh process")
    ver.add_argument("count", nargs="?", type=int, default=3, help="how many (the best first; default 3)")
    ver.add_argument("--file", default="results.tsv")
    sub.add_parser("show", help="the summary (the default)")
    args = ap.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # (a terminal that cannot show a character gets it escaped)
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        if args.command == "record":
            record(args.status, args.description, args.log, args.file, overrule=args.overrule, run=args.run)
        elif args.command == "verify":
            from autoresearch.verify import verify
            verify(args.count, args.file)
        else:
            print("\n".join(printable(line) for line in summary_lines(*load())))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    main(sys.argv[1:])
