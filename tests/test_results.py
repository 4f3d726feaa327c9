"""results.py: recording a run from its log and git, re-runs, refused settings; reading bad results files; the
summary and the plot."""
import os

import pytest

from autoresearch import results
from conftest import git
from test_docs import write_results

SUMMARY = """---
val_bpb:          {val}
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
settings:         {settings}
"""


def log_text(val="0.997900", settings="standard"):
    return "step 00000 (0.0%) | loss: 9.0\n" + SUMMARY.format(val=val, settings=settings)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git checkout with one commit, as the current folder; commit(msg) adds another and returns its hash."""
    monkeypatch.chdir(tmp_path)

    def commit(message):
        (tmp_path / "train.py").write_text(message)
        git(tmp_path, "add", "train.py")
        git(tmp_path, "commit", "-qm", message)
        return git(tmp_path, "rev-parse", "--short", "HEAD").strip()

    git(tmp_path, "init", "-q")
    return commit


def rows():
    return results.read_rows("results.tsv", [])


def test_record_a_baseline_its_rerun_a_change_and_a_crash(repo, tmp_path):
    base = repo("baseline")
    (tmp_path / "run.log").write_text(log_text("0.997900"))
    results.record("keep", "baseline")
    (tmp_path / "run.log").write_text(log_text("0.995900"))
    results.record("keep", "baseline")  # the same commit again: a re-run
    change = repo("halve the batch")
    (tmp_path / "run.log").write_text(log_text("0.990000"))
    results.record("keep", "halve TOTAL_BATCH_SIZE")
    crash = repo("depth 16")
    (tmp_path / "run.log").write_text("step 00000 (0.0%) | loss: 9.0\nerror: out of GPU memory at "
                                      "DEVICE_BATCH_SIZE=128, DEPTH=16: lower DEVICE_BATCH_SIZE\n")
    results.record("keep", "depth 16")  # no summary: a crash whatever the agent said
    assert [list(r.values()) for r in rows()] == [
        [base, "0.997900", "44.0", "keep", "baseline"],
        [base, "0.995900", "44.0", "keep", "baseline (rerun)"],
        [change, "0.990000", "44.0", "keep", "halve TOTAL_BATCH_SIZE"],
        [crash, "0.000000", "0.0", "crash", "depth 16 (error: out of GPU memory at DEVICE_BATCH_SIZE=128, DEPTH=16: "
                                            "lower DEVICE_BATCH_SIZE)"]]
    assert (open("results.tsv").readline().rstrip("\n").split("\t") == results.COLUMNS)
    assert sorted(os.listdir("runs")) == [f"001-{base}.log", f"002-{base}.log", f"003-{change}.log",
                                          f"004-{crash}.log"]
    exps = results.experiments(rows())
    assert [e["number"] for e in exps] == [1, 2, 3] and exps[0]["value"] == pytest.approx(0.9969)
    assert results.noise_floor(exps) == pytest.approx(0.002)


def test_a_marginal_win_and_its_rerun_share_the_status_given_last(repo, tmp_path):
    repo("baseline")
    (tmp_path / "run.log").write_text(log_text("0.997900"))
    results.record("keep", "baseline")
    repo("a small change")
    (tmp_path / "run.log").write_text(log_text("0.996000"))
    results.record("keep", "a small change")
    (tmp_path / "run.log").write_text(log_text("0.998500"))
    results.record("discard", "a small change")
    assert [(r["status"], r["description"]) for r in rows()] == [
        ("keep", "baseline"), ("discard", "a small change"), ("discard", "a small change (rerun)")]


def test_a_timeout_is_a_crash_and_a_finished_run_is_not(repo, tmp_path):
    repo("slow")
    (tmp_path / "run.log").write_text("step 00000 (0.0%) | loss: 9.0\nstep 00100 (40.0%) | loss: 4.0\n")
    row = results.record("discard", "slow idea")
    assert row["status"] == "crash" and row["description"] == "slow idea (no summary: stopped or timed out)"
    (tmp_path / "run.log").write_text(log_text())
    with pytest.raises(SystemExit, match="a finished run is keep or discard"):
        results.record("crash", "finished")


def test_a_run_under_other_settings_is_refused(repo, tmp_path):
    repo("baseline")
    (tmp_path / "run.log").write_text(log_text(settings="AUTORESEARCH_PRESET=small"))
    results.record("keep", "baseline")
    repo("change")
    (tmp_path / "run.log").write_text(log_text(val="0.5"))  # standard settings: not the baseline's
    with pytest.raises(SystemExit, match=r"settings \(standard\) differ from the baseline's "
                                         r"\(AUTORESEARCH_PRESET=small"):
        results.record("keep", "change")
    assert len(rows()) == 1


def test_the_baseline_settings_are_the_first_finished_runs(repo, tmp_path):
    repo("typo")
    (tmp_path / "run.log").write_text("Traceback (most recent call last):\nNameError: name 'x' is not defined\n")
    results.record("crash", "a first run that crashed")
    repo("baseline")
    (tmp_path / "run.log").write_text(log_text(settings="AUTORESEARCH_PRESET=small"))
    results.record("keep", "baseline")  # the crash's log has no settings: it does not set the baseline's
    assert [r["status"] for r in rows()] == ["crash", "keep"]


def test_record_outside_git_and_without_a_log_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="cannot read the run's log run.log"):
        results.record("keep", "x")
    (tmp_path / "run.log").write_text(log_text())
    with pytest.raises(SystemExit, match="cannot read the commit"):
        results.record("keep", "x")


@pytest.mark.parametrize("content, says", [
    ("", "is empty (not even the header line)"),
    ("commit\tval_bpb\tstatus\tdescription\na1\t0.99\tkeep\tbaseline\n", "no memory_gb column"),
    ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\na1\t0.99\t1.0\tkeep\tbase\tline with a tab\n",
     "a tab inside the description"),
])
def test_bad_results_files_say_what_is_wrong_and_the_rest_reads(tmp_path, content, says):
    (tmp_path / "results.tsv").write_text(content)
    problems = []
    got = results.read_rows(str(tmp_path / "results.tsv"), problems)
    assert len(problems) == 1 and says in problems[0]
    if content:
        assert got[0]["commit"] == "a1" and got[0]["val_bpb"] == "0.99"
    if "tab" in says:
        assert got[0]["description"] == "base line with a tab"


def test_a_keep_without_a_value_is_not_a_finished_keep(tmp_path):
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "baseline"),
                                                  ("b2", "N/A", "44.0", "keep", "lost its value")])
    problems = []
    exps = results.experiments(results.read_rows(str(tmp_path / "results.tsv"), problems), "repo", problems)
    assert not exps[1]["finished"] and "without a val_bpb ('N/A')" in problems[0]
    text = "\n".join(results.summary_lines([str(tmp_path / "results.tsv")], {"repo": exps}, problems))
    assert "nan" not in text.lower() and "best:     0.997900" in text


def test_crash_marks_are_drawn_inside_the_axes(tmp_path):
    exps = results.experiments([dict(commit="a", val_bpb="0.99", memory_gb="1", status="keep", description="b"),
                                dict(commit="b", val_bpb="0", memory_gb="0", status="crash", description="c")])
    fig = results.plot({"repo": exps}, str(tmp_path / "p.png"))
    ax = fig.axes[0]
    (y_low, y_high), (x_low, x_high) = ax.get_ylim(), ax.get_xlim()
    crashes = [c for c in ax.collections if c.get_label() == "repo: crash"][0].get_offsets()
    assert all(x_low < x < x_high and y_low < y < y_high for x, y in crashes)


def test_the_command_prints_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "baseline"),
                                                  ("b2", "0.990000", "44.0", "keep", "halve the batch")])
    results.main([])
    out = capsys.readouterr().out
    assert "2 experiments: 2 keep, 0 discard, 0 crash" in out and "+0.007900  #2" in out
    assert "Each agent's best:" in out
