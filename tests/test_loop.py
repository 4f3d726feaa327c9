"""The research loop as program.md tells an agent to live it, scripted on the small settings: two baselines, a
kept change and its re-run, a typo crash, a run under other settings; results.tsv, the summary and the notes."""
import os
import re
import shutil
import subprocess
import sys

from autoresearch import results
from conftest import ROOT, TEST_ENV, git

FILES = ["train.py", "prepare.py", "constants.py", "autoresearch"]


def edit(repo, old, new, message):
    path = os.path.join(repo, "train.py")
    text = open(path, encoding="utf-8").read()
    assert old in text
    open(path, "w", encoding="utf-8").write(text.replace(old, new))
    git(repo, "commit", "-qam", message)


def run(repo, **env):
    """`timeout 600 uv run train.py > run.log 2>&1`, then the grep of step 4; returns what the agent reads."""
    with open(os.path.join(repo, "run.log"), "w") as log:
        subprocess.run([sys.executable, "train.py"], cwd=repo, stdout=log, stderr=subprocess.STDOUT, timeout=600,
                       env={**os.environ, **TEST_ENV, "AUTORESEARCH_TIME_BUDGET": "1", **env})
    return "".join(line for line in open(os.path.join(repo, "run.log"))
                   if line.startswith(("val_bpb:", "peak_vram_mb:")))


def record(repo, status, description):
    return subprocess.run([sys.executable, "-m", "autoresearch.results", "record", status, description], cwd=repo,
                          capture_output=True, text=True, timeout=60)


def test_a_night_of_the_loop(prepared, tmp_path):
    repo = str(tmp_path / "repo")
    os.makedirs(repo)
    for name in FILES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(repo, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(ROOT, name), repo)
    git(repo, "init", "-q")
    git(repo, "add", *FILES)
    git(repo, "commit", "-qm", "baseline")

    assert run(repo).startswith("val_bpb:")                       # the baseline, twice
    assert record(repo, "keep", "baseline").returncode == 0
    run(repo)
    assert record(repo, "keep", "baseline").returncode == 0
    edit(repo, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ", "matrix lr 0.05")
    run(repo)
    assert record(repo, "keep", "matrix lr 0.05").returncode == 0  # a marginal win: run it again
    run(repo)
    assert record(repo, "discard", "matrix lr 0.05").returncode == 0
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    edit(repo, "DEPTH = 2 if SMALL", "DEPTH = 0 if SMALL", "depth typo")
    assert run(repo) == ""                                         # an empty grep: a crash
    assert "error: DEPTH = 0 in train.py" in open(os.path.join(repo, "run.log")).read()
    assert record(repo, "crash", "depth typo").returncode == 0
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    run(repo, AUTORESEARCH_EVAL_TOKENS="2048")                     # not the night's settings: refused
    refused = record(repo, "keep", "baseline under other settings")
    assert refused.returncode != 0 and "differ from the baseline's" in refused.stderr

    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert [(r["status"], r["description"]) for r in rows] == [
        ("keep", "baseline"), ("keep", "baseline (rerun)"), ("keep", "matrix lr 0.05"),
        ("discard", "matrix lr 0.05 (rerun)"),
        ("crash", "depth typo (error: DEPTH = 0 in train.py: it must be a positive integer)")]
    assert rows[4]["val_bpb"] == "0.000000" and rows[4]["memory_gb"] == "0.0"
    assert all(float(r["val_bpb"]) > 0 and r["memory_gb"] == "0.0" for r in rows[:4])  # no CUDA: no peak memory
    assert len([n for n in os.listdir(os.path.join(repo, "runs")) if n.endswith(".log")]) == 5
    for log in sorted(n for n in os.listdir(os.path.join(repo, "runs")) if n.endswith(".log"))[:4]:
        text = open(os.path.join(repo, "runs", log)).read()
        assert re.search(r"^note: settings AUTORESEARCH_PRESET=small .*: this run compares only with runs under "
                         r"the same settings$", text, flags=re.M)
    paths, agents, problems = results.load([os.path.join(repo, "results.tsv")], worktrees=False)
    summary = "\n".join(results.summary_lines(paths, agents, problems))
    assert "3 experiments: 1 keep, 1 discard, 1 crash (5 runs" in summary and problems == []
    assert "baseline: " in summary and "(mean of 2 runs)" in summary
