"""The experiment log: record each run as a row of results.tsv, and summarize every agent's results.

    uv run -m autoresearch.results record keep "halve TOTAL_BATCH_SIZE"  # after a run: appends its row
    uv run -m autoresearch.results record discard "GELU"                 # crash: for a run that did not finish
    uv run -m autoresearch.results                                       # the summary of every agent's results
    uv run -m autoresearch.results verify 4                              # the 4 best kept commits run again

A row is the reference's five columns, then the GPU model. `record` (recording.py) keeps the run's log and record
as runs/<run id>.* and appends the row as one whole line; the summary and the verdicts read each row as its run in
runs/ says it was (docs/RUN.md, 'The results log'). Standard library only.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import sys

from autoresearch import record as run_record
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
    """The rows of one results file as dicts of COLUMNS; what it made of an editor's leavings goes to `problems`."""
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


def run_speed(data):
    """The model FLOP/s of a run under the time budget, where its verdict follows speed; else None."""
    speed = data.get("model_flops_per_sec") if data and data.get("budget_kind", "time") == "time" else None
    return speed if isinstance(speed, (int, float)) and speed > 0 else None


def prove(rows, records, path, problems):
    """Each row as the run in runs/ it was recorded from says it was; rows that differ or no run proves are said."""
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
                said_both = ", ".join(f"{c} {row[c]!r}, its run {said[c]!r}" for c in changed)
                differ.append(f"#{n} {row['commit']} ({said_both})")
                row["differs"] = True
            row.update({c: printable(said.get(c, row[c])) for c in ("val_bpb", "memory_gb", "status", "gpu")})
        row["speed"] = run_speed(data)
    if differ:
        problems.append(f"{path}: row(s) {'; '.join(differ)} differ from the runs in runs/ they were recorded from "
                        "(edited by hand?): the runs' values are used")
    if unproven:
        problems.append(f"{path}: row(s) {', '.join(unproven)} match no run in runs/ (added by hand?): not counted")
    return rows


def experiments(rows, agent="", problems=None):
    """One agent's experiments: a ` (rerun)` row joins its commit's latest; each worth its finished runs' mean."""
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
            joined["members"].append(row)
            if status != "crash":
                joined["status"] = status
        else:
            exp = dict(number=len(out) + 1, commit=row["commit"], description=row["description"], status=status,
                       runs=run, speeds=speed, members=[row])
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
    """The baseline's latest two runs at the same speed (the floor's), or None until two such runs exist."""
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
    """An experiment's median model FLOP/s over its runs of known speed, or None."""
    speeds = [s for s in (exp["speeds"] if exp else []) if s]
    return _median(speeds) if speeds else None


def best_experiment(exps, leave_out=None):
    """The finished `keep` experiment with the lowest value (leaving out `leave_out`), or None."""
    kept = [e for e in exps if e["status"] == "keep" and e["finished"] and e is not leave_out]
    return min(kept, key=lambda e: e["value"]) if kept else None


def speed_ratio(speed, reference):
    return speed / reference if speed and reference else None


def off_speed(ratio):
    """True when a speed ratio says the run ran on what was, in effect, another machine."""
    return ratio is not None and abs(ratio - 1) > SPEED_TOLERANCE


def noise_floor(exps):
    """(floor, why): the spread of the baseline's pair, at least MIN_FLOOR; None (why says why) until then."""
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
    """better (v < B - 2F), marginal (v < B - F), equal (v <= B + F), worse; None without a best and a floor."""
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
    """(paths, {agent: experiments}, problems) of every results file found: one group per file and GPU model."""
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
    """The GPU model each row is judged with: its own; a crash's without one, its neighbour's; else unknown."""
    known = [r["gpu"] for r in rows if r["gpu"]]
    current, out = (known[0] if known else ""), []
    for r in rows:
        current = r["gpu"] or current
        out.append(current if r["gpu"] or r["status"].lower() == "crash" else "")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The summary

def agent_lines(exps):
    """(lines, table row parts) of one agent's summary."""
    counts = {s: sum(e["status"] == s for e in exps) for s in STATUSES}
    decided = counts["keep"] + counts["discard"]
    runs = sum(len(e["members"]) for e in exps)
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
    """The summary: each agent's counts, floor, baseline, best, tip and ranked gains; then a table of bests."""
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
            from autoresearch.recording import record
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
