"""The research loop as program.md tells an agent to live it: its commands, run exactly as written (a `uv` on the
PATH that stands for the project's environment runs them with this Python), on the small settings: the setup,
the standard run refused off CUDA, the baseline (its second run as program.md says to run it again), a
change, a typo crash; results.tsv, the summary and the notes."""
import os
import re
import subprocess
import sys

from autoresearch import results
from conftest import ROOT, TEST_ENV, agent_repo, edit_train, git


def program_commands():
    """The command lines of program.md's "Commands" section, in order: the standard run, the small-preset run,
    the grep, the tail, the record, the summary."""
    text = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    section = text.split("\n## Commands\n")[1].split("\n## ")[0]
    return [line for block in re.findall(r"```\n(.*?)```", section, flags=re.S) for line in block.splitlines()]


def shell(repo, bin_dir, command, **env):
    """Run one command line in bash in the agent's checkout, as the agent's shell would."""
    full = {k: v for k, v in {**os.environ, **TEST_ENV, **env}.items() if k != "AUTORESEARCH_PRESET"}
    full.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", "-c", command], cwd=repo, env=full, capture_output=True, text=True, timeout=600)


def test_a_night_of_the_loop_with_program_mds_commands(prepared, tmp_path):
    program = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    run_standard, run_small, grep, tail, record_keep, summary = program_commands()
    assert run_small.startswith("AUTORESEARCH_PRESET=small timeout 3600 uv run train.py")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(f'#!/bin/sh\n[ "$1" = run ] && shift\nexec {sys.executable} "$@"\n')
    os.chmod(bin_dir / "uv", 0o755)
    repo = agent_repo(tmp_path)
    sh = lambda command, **env: shell(repo, bin_dir, command, **env)  # noqa: E731
    record = lambda status, what: sh(record_keep.replace("keep", status).replace("<what you tried>", what))  # noqa
    for step in ("git checkout -b autoresearch/<tag>", 'git commit -am "<short description>"',
                 "git reset --hard <last kept commit>", 'record crash "<idea> (typo)"',
                 "git checkout -q <baseline commit>"):
        assert step in program, f"program.md no longer says {step!r}"
    assert sh("git checkout -b autoresearch/<tag>".replace("<tag>", "test")).returncode == 0

    refused = sh(run_standard)  # the standard settings on a CPU: one line naming the preset
    assert refused.returncode != 0 and "error: no CUDA GPU" in open(os.path.join(repo, "run.log")).read()
    assert sh(run_small).returncode == 0  # the baseline ...
    assert sh(grep).stdout.startswith("val_bpb:")
    assert sh(record_keep.replace("<what you tried>", "baseline")).returncode == 0
    baseline = git(repo, "rev-parse", "--short", "HEAD").strip()
    block = program.split("To run the baseline again:")[1].split("```")[1].strip().splitlines()
    for line in block:  # ... and again, as program.md says to run it again later: the second run joins the first
        line = line.replace("<baseline commit>", baseline).replace("autoresearch/<tag>", "autoresearch/test")
        line = line.replace("<the run command>", run_small)
        assert sh(line).returncode == 0, line
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip() == "autoresearch/test"

    edit_train(repo, "UNEMBEDDING_LR = 0.004 ", "UNEMBEDDING_LR = 0.0 ")  # the head never learns: worse
    assert sh('git commit -am "<short description>"'.replace("<short description>", "frozen head")).returncode == 0
    assert sh(run_small).returncode == 0
    refused = record("keep", "frozen head")  # a loss recorded keep by accident: refused, nothing written
    assert refused.returncode != 0 and "verdict: worse" in refused.stderr and "--overrule" in refused.stderr
    decided = record("discard", "frozen head")
    assert decided.returncode == 0 and "verdict: worse" in decided.stdout
    assert sh("git reset --hard <last kept commit>".replace("<last kept commit>", baseline)).returncode == 0

    edit_train(repo, "DEPTH = 2 if SMALL", "DEPTH = 0 if SMALL", "depth typo")
    sh(run_small)
    assert sh(grep).stdout == ""  # an empty grep: read the tail
    assert "error: DEPTH = 0 in train.py" in sh(tail).stdout
    assert sh('uv run -m autoresearch.results record crash "<idea> (typo)"'.replace("<idea>", "depth")).returncode == 0
    git(repo, "reset", "-q", "--hard", baseline)

    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert [(r["status"], r["description"]) for r in rows] == [
        ("keep", "baseline"), ("keep", "baseline (rerun)"), ("discard", "frozen head"),
        ("crash", "depth (typo) (DEPTH = 0 in train.py: it must be a positive integer)")]
    assert rows[3]["val_bpb"] == "0.000000" and rows[3]["memory_gb"] == "0.0"
    assert all(float(r["val_bpb"]) > 0 and r["memory_gb"] == "0.0" for r in rows[:3])  # no CUDA: no peak memory
    assert len([n for n in os.listdir(os.path.join(repo, "runs")) if n.endswith(".log")]) == 4
    out = sh(summary).stdout
    assert "3 experiments: 1 keep, 1 discard, 1 crash (4 runs" in out and "note:" not in out
    assert "baseline: " in out and "(mean of its latest 2 runs of 2)" in out and "noise floor: " in out
    first = sorted(n for n in os.listdir(os.path.join(repo, "runs")) if n.endswith(".log"))[0]
    log = open(os.path.join(repo, "runs", first)).read()
    assert re.search(r"^note: settings AUTORESEARCH_PRESET=small .*: this run compares only with runs under the same "
                     r"settings$", log, flags=re.M)
