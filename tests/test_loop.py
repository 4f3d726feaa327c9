"""The research loop as program.md tells an agent to live it, scripted on the small settings: two baselines, a
kept change and its re-run, a typo crash, a run under other settings; results.tsv, the summary and the notes."""
import os
import re

from autoresearch import results
from conftest import agent_repo, edit_train, git, record_cli, run_train

def edit(repo, old, new, message):
    edit_train(repo, old, new, message)


def run(repo, **env):
    """`timeout 600 uv run train.py > run.log 2>&1`, then the grep of step 4; returns what the agent reads."""
    _, log = run_train(repo, **env)
    return "".join(line + "\n" for line in log.splitlines() if line.startswith(("val_bpb:", "peak_vram_mb:")))


def record(repo, status, description):
    return record_cli(repo, status, description)


def test_a_night_of_the_loop(prepared, tmp_path):
    repo = agent_repo(tmp_path)

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
