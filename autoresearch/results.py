"""The experiment log: record one run as a row of results.tsv, and summarize every agent's results.

    uv run -m autoresearch.results record keep "halve TOTAL_BATCH_SIZE"  # after a run: reads run.log and git, appends the row
    uv run -m autoresearch.results record crash "depth 16"               # a run with no summary is always recorded as a crash
    uv run -m autoresearch.results                                       # the summary: counts, noise floor, best, kept changes

A row is the reference's: commit, val_bpb, memory_gb, status, description, tab-separated. A run of the same commit
as the row before it is a re-run: its description gets " (rerun)", every row of that commit takes the status
given last, and the summary counts the rows as one experiment worth the mean of their val_bpb. Each recorded run's
log is kept as runs/<row>-<commit>.log. A run whose settings (the `settings:` summary line) differ from the first
recorded run's is refused: its val_bpb would not compare. analysis.ipynb draws its plot from the same functions.
"""
import argparse
import glob
import math
import os
import re
import shutil
import subprocess
import sys

from autoresearch.errors import UserError

COLUMNS = ["commit", "val_bpb", "memory_gb", "status", "description"]
STATUSES = ("keep", "discard", "crash")
MIN_FLOOR = 0.001  # program.md: the noise floor is the gap between the two baseline runs, at least this
RESULTS = ["results.tsv", "results/*.tsv"]  # this folder's and gathered ones; load() adds the other worktrees'
RERUN = " (rerun)"


# ---------------------------------------------------------------------------------------------------------------
# Reading

def read_rows(path, problems):
    """The rows of one results file as dicts of the five columns (missing values ""), in order. Every oddity
    (an empty file, a missing column, a tab inside a description, a row with too few fields) adds one line to
    `problems` and the rest still reads."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if not lines or not lines[0].strip():
        problems.append(f"{path} is empty (not even the header line): skipped")
        return []
    header = [h.strip() for h in lines[0].split("\t")]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        problems.append(f"{path}: no {', '.join(missing)} column in the header: left blank")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) > len(header) and header[-1] == "description":
            problems.append(f"{path}:{n}: a tab inside the description: read as part of it")
            fields = fields[:len(header) - 1] + [" ".join(fields[len(header) - 1:])]
        elif len(fields) != len(header):
            problems.append(f"{path}:{n}: {len(fields)} fields where the header has {len(header)}: missing ones "
                            "left blank")
        row = dict(zip(header, fields))
        rows.append({c: row.get(c, "").strip() for c in COLUMNS})
    return rows


def to_float(text):
    """The number in a results cell, or nan for anything else (N/A, empty, inf)."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) else math.nan


def experiments(rows, agent="", problems=None):
    """One agent's experiments from its rows: consecutive rows of one commit whose later descriptions end in
    " (rerun)" are one experiment, worth the mean val_bpb of its finished runs. Each experiment is a dict:
    number (1, 2, ...), commit, description, status (the last row's), rows, runs (val_bpb of each finished run),
    value (their mean, nan if none finished), finished (a value and not a crash)."""
    problems = [] if problems is None else problems
    out = []
    for row in rows:
        value, status = to_float(row["val_bpb"]), row["status"].lower()
        if status not in STATUSES:
            problems.append(f"{agent}: a row of {row['commit'] or '?'} has status {row['status']!r}, not one of "
                            f"{', '.join(STATUSES)}: counted as a crash")
            status = "crash"
        run = [value] if status != "crash" and value > 0 else []
        if status != "crash" and not run:
            problems.append(f"{agent}: {row['commit'] or '?'} is `{status}` without a val_bpb "
                            f"({row['val_bpb']!r}): counted as not finished")
        if out and row["description"].endswith(RERUN) and out[-1]["commit"] == row["commit"]:
            out[-1]["runs"] += run
            out[-1]["status"] = status
            out[-1]["rows"] += 1
        else:
            out.append(dict(number=len(out) + 1, commit=row["commit"], description=row["description"],
                            status=status, runs=run, rows=1))
    for e in out:
        e["value"] = sum(e["runs"]) / len(e["runs"]) if e["runs"] else math.nan
        e["finished"] = e["status"] != "crash" and bool(e["runs"])
    return out


def noise_floor(exps):
    """The gap between the baseline's runs (the first finished experiment), at least MIN_FLOOR."""
    base = next((e for e in exps if e["finished"]), None)
    if base is None or len(base["runs"]) < 2:
        return MIN_FLOOR
    return max(max(base["runs"]) - min(base["runs"]), MIN_FLOOR)


def agent_name(path):
    """An agent's name: the folder of a results.tsv (its worktree), else the file's own name."""
    if os.path.basename(path) == "results.tsv":
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return os.path.splitext(os.path.basename(path))[0]


def worktree_results():
    """The results.tsv of every git worktree of the repository here (one agent each, e.g. ../autoresearch-gpu1),
    as glob patterns; none outside a git checkout. (Other folders beside it are not this repository's.)"""
    try:
        out = subprocess.run(["git", "worktree", "list", "--porcelain"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [os.path.join(glob.escape(line[len("worktree "):]), "results.tsv")
            for line in out.stdout.splitlines() if line.startswith("worktree ")]


def load(patterns=RESULTS, worktrees=True):
    """{agent: experiments} for every results file the patterns find (and, with worktrees, every git worktree's
    results.tsv), and the problems met reading them."""
    patterns = list(patterns) + (worktree_results() if worktrees else [])
    paths = sorted({os.path.abspath(p) for pattern in patterns for p in glob.glob(pattern)})
    agents, problems = {}, []
    for path in paths:
        name = agent_name(path)
        agents[name] = experiments(read_rows(path, problems), name, problems)
    return paths, agents, problems


# ---------------------------------------------------------------------------------------------------------------
# The summary and the plot

def summary_lines(paths, agents, problems):
    """The summary as text lines: per agent its counts, noise floor, baseline, best, and kept changes ranked by
    what each gained over the best before it; then each agent's best in one table."""
    lines = [f"{len(paths)} results file(s): " + (", ".join(f"{agent_name(p)} ({p})" for p in paths) or "none")]
    lines += [f"note: {p}" for p in problems]
    table = []
    for agent, exps in agents.items():
        counts = {s: sum(e["status"] == s for e in exps) for s in STATUSES}
        decided = counts["keep"] + counts["discard"]
        runs = sum(e["rows"] for e in exps)
        lines += ["", f"== {agent} ==",
                  f"{len(exps)} experiments: {counts['keep']} keep, {counts['discard']} discard, "
                  f"{counts['crash']} crash" + (f" ({runs} runs: the re-runs of a commit are one experiment)"
                                                if runs != len(exps) else ""),
                  f"keep rate: {counts['keep'] / decided:.1%} of the experiments that finished" if decided
                  else "keep rate: no experiment finished",
                  f"noise floor: {noise_floor(exps):.6f}"]
        kept = [e for e in exps if e["status"] == "keep" and e["finished"]]
        if not kept:
            lines.append("No kept result yet: nothing to compare.")
            table.append((agent, len(exps), 0, counts["crash"], None, None, ""))
            continue
        lines.append("kept changes, in order:")
        lines += [f"  #{e['number']:<4} {e['value']:.6f}  {e['commit']}  {e['description']}" for e in kept]
        baseline, best = kept[0]["value"], min(e["value"] for e in kept)
        lines += [f"baseline: {baseline:.6f}" + (f" (mean of {len(kept[0]['runs'])} runs)"
                                                 if len(kept[0]["runs"]) > 1 else ""),
                  f"best:     {best:.6f}",
                  f"total improvement: {baseline - best:.6f} ({(baseline - best) / baseline:.2%})",
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
        top = min(kept, key=lambda e: e["value"])
        table.append((agent, len(exps), len(kept), counts["crash"], baseline, best,
                      f"#{top['number']} {top['commit']} {top['description']}"))
    lines += ["", "Each agent's best:", f"{'agent':<24} {'exps':>5} {'kept':>5} {'crash':>5} {'baseline':>9} "
              f"{'best':>9}  best change"]
    for agent, n, k, c, base, best, change in table:
        fmt = (lambda v: f"{v:9.6f}" if v is not None else f"{'-':>9}")
        lines.append(f"{agent:<24} {n:>5} {k:>5} {c:>5} {fmt(base)} {fmt(best)}  {change}")
    return lines


def plot(agents, path="progress.png"):
    """val_bpb per experiment, one colour per agent: discarded runs faint, kept ones with their description,
    crashes as x marks along the top inside the axes, the running best with the noise floor as a band."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    import warnings
    warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # a description in another script
    fig, ax = plt.subplots(figsize=(12, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    values = [e["value"] for exps in agents.values() for e in exps if e["finished"]]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max((high - low) * 0.1, 1e-3)
    top = high + pad  # crashes are drawn here, inside the axes
    last = max((len(exps) for exps in agents.values()), default=1)
    for i, (agent, exps) in enumerate(agents.items()):
        color = colors[i % len(colors)]
        done = [e for e in exps if e["finished"]]
        kept = [e for e in done if e["status"] == "keep"]
        crashed = [e for e in exps if not e["finished"]]
        ax.scatter([e["number"] for e in done if e["status"] != "keep"],
                   [e["value"] for e in done if e["status"] != "keep"], color=color, alpha=0.25, s=18)
        ax.scatter([e["number"] for e in kept], [e["value"] for e in kept], color=color, s=40, zorder=3,
                   label=f"{agent}: kept" if kept else None)
        ax.scatter([e["number"] for e in crashed], [top] * len(crashed), marker="x", color=color, s=30,
                   label=f"{agent}: crash" if crashed else None)
        for e in kept:
            ax.annotate(e["description"][:40], (e["number"], e["value"]), textcoords="offset points",
                        xytext=(4, 6), fontsize=7, rotation=20, color=color)
        if kept:
            xs = [e["number"] for e in kept] + [len(exps)]
            best = [min(e["value"] for e in kept[:j + 1]) for j in range(len(kept))]
            best.append(best[-1])
            floor = noise_floor(exps)
            ax.step(xs, best, where="post", color=color, alpha=0.8)
            ax.fill_between(xs, [b - floor for b in best], [b + floor for b in best], step="post", color=color,
                            alpha=0.12, label=f"{agent}: best \u00b1 noise floor ({floor:.4f})")
    if not values:
        ax.text(0.5, 0.5, "no finished experiment yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.5, last + 0.5)
    ax.set_ylim(low - pad, top + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experiment")
    ax.set_ylabel("val_bpb (lower is better)")
    n = sum(len(exps) for exps in agents.values())
    n_kept = sum(e["status"] == "keep" for exps in agents.values() for e in exps)
    ax.set_title(f"autoresearch: {n} experiments by {len(agents)} agent(s), {n_kept} kept")
    if agents:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Recording

def run_summary(text):
    """{key: value} of a run log's summary block (after its `---` line); empty when the run printed none."""
    if "\n---\n" not in "\n" + text:
        return {}
    block = ("\n" + text).rsplit("\n---\n", 1)[1]
    return dict(re.findall(r"^(\w+):[ \t]+(.*?)\s*$", block, flags=re.M))


def crash_reason(text):
    """What ended a run without a summary, in a few words, from the last lines of its log."""
    for line in reversed(text.strip().splitlines()[-50:]):
        line = line.strip()
        if line.startswith(("error:", "FAIL")) or re.match(r"^\w+(Error|Exception)\b", line):
            return line[:100]
    return "no summary: stopped or timed out"


def git_commit():
    """The short hash of HEAD in the current folder, or one line saying this is not a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is None or out.returncode != 0:
        raise UserError("cannot read the commit (`git rev-parse --short HEAD` failed): run this in the "
                         "experiment's git checkout")
    return out.stdout.strip()


def first_finished_run(runs_dir):
    """(path, summary) of the first archived run that ended in a summary (the baseline), or None."""
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.log"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            summary = run_summary(f.read())
        if "val_bpb" in summary:
            return path, summary
    return None


def record(status, description, log="run.log", path="results.tsv", runs_dir="runs"):
    """Append the row of the run in `log` to `path` (see the module's docstring); returns the row."""
    if status not in STATUSES:
        raise UserError(f"status {status!r}: use one of {', '.join(STATUSES)}")
    description = " ".join(description.replace("\t", " ").split())
    if not description:
        raise UserError("give a short description of what the run tried")
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read the run's log {log} ({e.strerror or e}): run "
                         "`timeout 600 uv run train.py > run.log 2>&1` first")
    summary = run_summary(text)
    if "val_bpb" not in summary:
        if status != "crash":
            print(f"note: {log} has no summary (the run crashed or was stopped): recorded as a crash")
        status, val_bpb, memory = "crash", "0.000000", "0.0"
        reason = crash_reason(text)
        description = f"{description} ({reason})" if reason not in description else description
    elif status == "crash":
        raise UserError(f"{log} ends in a summary (val_bpb {summary['val_bpb']}): a finished run is keep or "
                         "discard")
    else:
        val_bpb = f"{to_float(summary['val_bpb']):.6f}"
        memory = f"{to_float(summary.get('peak_vram_mb', '0')) / 1024:.1f}"
    problems = []
    rows = read_rows(path, problems) if os.path.exists(path) else []
    baseline = first_finished_run(runs_dir)
    if "val_bpb" in summary and baseline is not None:
        settings, (baseline_log, baseline_summary) = summary.get("settings", "standard"), baseline
        baseline_settings = baseline_summary.get("settings", "standard")
        if settings != baseline_settings:
            raise UserError(f"this run's settings ({settings}) differ from the baseline's "
                             f"({baseline_settings}, {baseline_log}): its val_bpb does not compare; not recorded. "
                             "Run it again with the baseline's settings")
    commit = git_commit()
    if rows and rows[-1]["commit"] == commit and status != "crash" and rows[-1]["status"] != "crash":
        if not description.endswith(RERUN):
            description += RERUN
        for row in reversed(rows):  # the runs of one experiment share its status
            if row["commit"] != commit:
                break
            row["status"] = status
    row = dict(commit=commit, val_bpb=val_bpb, memory_gb=memory, status=status, description=description)
    rows.append(row)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\t".join(COLUMNS) + "\n" + "".join("\t".join(r[c] for c in COLUMNS) + "\n" for r in rows))
    os.replace(tmp, path)
    os.makedirs(runs_dir, exist_ok=True)
    shutil.copyfile(log, os.path.join(runs_dir, f"{len(rows):03d}-{commit}.log"))
    print("\t".join(row[c] for c in COLUMNS))
    return row


def main(argv=None):
    """The command: `record STATUS DESCRIPTION`, or the summary."""
    ap = argparse.ArgumentParser(description="Record a run in results.tsv, or summarize the results.")
    sub = ap.add_subparsers(dest="command")
    rec = sub.add_parser("record", help="append the row of the run in run.log")
    rec.add_argument("status", choices=STATUSES)
    rec.add_argument("description")
    rec.add_argument("--log", default="run.log")
    rec.add_argument("--file", default="results.tsv")
    sub.add_parser("show", help="the summary (the default)")
    args = ap.parse_args(argv)
    if args.command == "record":
        record(args.status, args.description, args.log, args.file)
    else:
        print("\n".join(summary_lines(*load())))


if __name__ == "__main__":
    main(sys.argv[1:])
