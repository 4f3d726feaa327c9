"""autoresearch.results: recording a run from its record (run.json) and git, re-runs, refusals; reading results
files as editors and spreadsheets leave them; one writer at a time; the summary (noise floor, speed, the tip)
and the plot. Runs here are written by the real record module for a train.py in a temporary git checkout; the
tests that need real training runs are in test_log.py."""
import json
import os
import subprocess
import sys

import pytest

import constants
from autoresearch import record, recording, results
from conftest import ROOT, git
from test_docs import write_results

SUMMARY = """---
val_bpb:          {val}
training_seconds: 300.1
peak_vram_mb:     45060.2
settings:         {settings}
run_id:           {run_id}
"""


H100 = "NVIDIA H100 80GB HBM3"


def finished_run(folder, val="0.997900", settings="standard", speed=1e12, violations=(), where=None, gpu=H100):
    """A finished run of the train.py in folder as the fixed code leaves it: run.json (written by
    record.RunRecord, with the constants and budget its settings give) and a run.log whose `run:` line names it,
    both in `where` (default: folder). Returns the run id."""
    where = where or folder
    fixed = dict(constants.SMALL_DEFAULTS if "PRESET=small" in settings else constants.DEFAULTS)
    kind = fixed["BUDGET"]
    rec = record.RunRecord(str(folder / "train.py"), settings, fixed, folder=str(where))
    rec.finish({"val_bpb": val, "gpu": gpu}, violations, val_bpb=float(val), val_bpb_exact=float(val),
               peak_vram_mb=45060.2,
               model_flops_per_sec=speed, budget_kind=kind,
               budget=fixed["FLOP_BUDGET" if kind == "flops" else "TIME_BUDGET"])
    (where / "run.log").write_text(f"run: {rec.run_id}\ndevice: cuda\nstep 00000 (0.0%) | loss: 9.0\n"
                                   + SUMMARY.format(val=val, settings=settings, run_id=rec.run_id))
    return rec.run_id


def crashed_before_start(folder, line):
    """A run that stopped before its record began (a bad knob, an import error): its log only."""
    (folder / "run.log").write_text(f"step 00000 (0.0%) | loss: 9.0\n{line}\n")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git checkout, as the current folder; commit(msg) writes train.py, commits it and returns the hash."""
    monkeypatch.chdir(tmp_path)

    def commit(message):
        (tmp_path / "train.py").write_text(message)
        git(tmp_path, "add", "train.py")
        git(tmp_path, "commit", "-qm", message)
        return git(tmp_path, "rev-parse", "--short", "HEAD").strip()

    git(tmp_path, "init", "-q")
    return commit


def rows(path="results.tsv"):
    """The rows' reference columns (test_gpu_models_... checks the gpu column)."""
    return [{c: r[c] for c in results.REFERENCE} for r in results.read_rows(path, [])]


def test_record_a_baseline_its_rerun_a_change_and_a_crash(repo, tmp_path, capsys):
    base = repo("baseline")
    finished_run(tmp_path, "0.997900")
    recording.record("keep", "baseline")
    assert "noise floor: not set: one baseline run so far: run the baseline again" in capsys.readouterr().out
    finished_run(tmp_path, "0.995900")
    recording.record("keep", "baseline")  # the same commit again: a re-run
    assert "a re-run of experiment #1 (baseline): 2 runs, mean 0.996900" in capsys.readouterr().out
    change = repo("halve the batch")
    finished_run(tmp_path, "0.990000")
    recording.record("keep", "halve TOTAL_BATCH_SIZE")
    crash = repo("depth 16")
    crashed_before_start(tmp_path, "error: out of GPU memory at DEVICE_BATCH_SIZE=128, DEPTH=16: lower "
                                   "DEVICE_BATCH_SIZE")
    recording.record("keep", "depth 16")  # no finished run: a crash whatever the agent said
    assert [list(r.values()) for r in rows()] == [
        [base, "0.997900", "44.0", "keep", "baseline"],
        [base, "0.995900", "44.0", "keep", "baseline (rerun)"],
        [change, "0.990000", "44.0", "keep", "halve TOTAL_BATCH_SIZE"],
        [crash, "0.000000", "0.0", "crash", "depth 16 (error: out of GPU memory at DEVICE_BATCH_SIZE=128, DEPTH=16: "
                                            "lower DEVICE_BATCH_SIZE)"]]
    assert open("results.tsv").readline().rstrip("\n").split("\t") == results.COLUMNS
    kept = {json.load(open(os.path.join("runs", n)))["recorded"]["number"]: n[:-len(".json")]
            for n in os.listdir("runs") if n.endswith(".json")}  # runs/<run id>.json and .log, one pair per row
    assert sorted(kept) == [1, 2, 3, 4] and all(os.path.exists(f"runs/{kept[n]}.log") for n in kept)
    assert kept[4].startswith("log-")
    assert all(record.read(f"runs/{kept[n]}.json")["run_id"] == kept[n] for n in (1, 2, 3))
    exps = results.experiments(rows())
    assert [e["number"] for e in exps] == [1, 2, 3] and exps[0]["value"] == pytest.approx(0.9969)
    assert results.noise_floor(exps) == (pytest.approx(0.002), "from the baseline's latest 2 runs of 2")


def test_a_marginal_win_and_its_rerun_keep_their_own_rows(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path, "0.997900")
    recording.record("keep", "baseline")
    repo("a small change")
    finished_run(tmp_path, "0.996000")
    recording.record("keep", "a small change")
    finished_run(tmp_path, "0.998500")
    recording.record("discard", "a small change")
    # no row is ever rewritten: the experiment takes the status given last
    assert [(r["status"], r["description"]) for r in rows()] == [
        ("keep", "baseline"), ("keep", "a small change"), ("discard", "a small change (rerun)")]
    exps = results.experiments(rows())
    assert [e["status"] for e in exps] == ["keep", "discard"] and exps[1]["value"] == pytest.approx(0.99725)


def test_the_baseline_run_again_later_joins_the_baseline(repo, tmp_path):
    base = repo("baseline")
    for val in ("0.9979", "0.9981"):
        finished_run(tmp_path, val)
        recording.record("keep", "baseline")
    repo("idea")
    finished_run(tmp_path, "0.9990")
    recording.record("discard", "idea")
    git(tmp_path, "checkout", "-q", base)  # the baseline's code again, mid-night
    finished_run(tmp_path, "0.9989")
    recording.record("keep", "baseline")
    exps = results.experiments(rows())
    assert len(exps) == 2 and exps[0]["runs"] == [0.9979, 0.9981, 0.9989] and exps[0]["status"] == "keep"
    # the latest pair renews both the floor and the baseline's value: the same two runs
    assert exps[0]["pair"] == (0.9981, 0.9989) and exps[0]["value"] == pytest.approx(0.9985)
    assert results.noise_floor(exps)[0] == pytest.approx(0.001)
    finished_run(tmp_path, "0.9959")
    recording.record("keep", "baseline")
    exps = results.experiments(rows())
    assert exps[0]["value"] == pytest.approx(0.9974) and results.noise_floor(exps)[0] == pytest.approx(0.003)


@pytest.mark.parametrize("value, verdict", [("0.9900", "better"), ("0.9955", "marginal"), ("0.9975", "equal"),
                                            ("0.9995", "worse")])
def test_record_prints_the_verdict_and_refuses_a_status_that_contradicts_it(repo, tmp_path, capsys, value,
                                                                            verdict):
    repo("baseline")
    for val in ("0.9979", "0.9969"):  # B = 0.9974, F = 0.001
        finished_run(tmp_path, val)
        recording.record("keep", "baseline")
    repo("idea")
    capsys.readouterr()
    finished_run(tmp_path, value)
    wrong = {"better": "discard", "worse": "keep"}.get(verdict)
    if wrong:  # a clear win discarded, or a loss kept, by accident: refused, nothing written
        with pytest.raises(SystemExit, match=f"verdict: {verdict} .*`{wrong}` contradicts it.*--overrule"):
            recording.record(wrong, "idea")
        assert len(rows()) == 2 and len(os.listdir("runs")) == 4
        assert recording.record(wrong, "idea", overrule=True)["status"] == wrong  # said explicitly: recorded
        assert "(overruled)" in capsys.readouterr().out
    else:  # both statuses are the agent's call
        recording.record("keep", "idea")
        assert f"verdict: {verdict} (0.99" in capsys.readouterr().out


def test_a_confirmed_marginal_win_is_a_keep(repo, tmp_path, capsys):
    repo("baseline")
    for val in ("0.9979", "0.9969"):  # B = 0.9974, F = 0.001
        finished_run(tmp_path, val)
        recording.record("keep", "baseline")
    repo("idea")
    finished_run(tmp_path, "0.9955")  # marginal: keep for now, run again
    recording.record("keep", "idea")
    assert "keep it for now and run it again" in capsys.readouterr().out
    finished_run(tmp_path, "0.9957")  # the mean, 0.9956, beats B by more than F: a confirmed win
    with pytest.raises(SystemExit, match="its mean beats the best by more than the floor: keep.*contradicts"):
        recording.record("discard", "idea")
    recording.record("keep", "idea")
    assert results.experiments(rows())[1]["status"] == "keep"


def test_where_identical_runs_repeat_their_value_a_marginal_result_asks_for_no_rerun(repo, tmp_path, capsys):
    """Under the compute budget on a CPU runs are bit-identical: the baseline's two runs agree, F is its minimum,
    and a re-run would repeat a marginal value: the verdict says so and asks for simplicity instead."""
    repo("baseline")
    for _ in range(2):
        finished_run(tmp_path, "1.7590", settings="AUTORESEARCH_PRESET=small")
        recording.record("keep", "baseline")
    assert "noise floor: 0.001000 (the minimum: the baseline's latest 2 runs of 2 are identical" in \
        capsys.readouterr().out
    repo("idea")
    finished_run(tmp_path, "1.7575", settings="AUTORESEARCH_PRESET=small")
    recording.record("discard", "idea")
    out = capsys.readouterr().out
    assert "verdict: marginal" in out and "a re-run would tell nothing: keep it only if it makes train.py simpler" \
        in out and "run it again" not in out


def test_a_marginal_rerun_is_judged_on_the_mean_of_its_runs(repo, tmp_path, capsys):
    repo("baseline")
    for val in ("0.9979", "0.9969"):
        finished_run(tmp_path, val)
        recording.record("keep", "baseline")
    repo("idea")
    finished_run(tmp_path, "0.9955")  # marginal: keep for now, run again
    recording.record("keep", "idea")
    finished_run(tmp_path, "0.9995")  # the mean, 0.9975, is equal to the best
    capsys.readouterr()
    recording.record("discard", "idea")
    assert "verdict: equal (mean 0.997500 against the best 0.997400" in capsys.readouterr().out


def test_under_the_compute_budget_speed_sets_no_note_and_no_pair(repo, tmp_path, capsys):
    repo("baseline")
    for val, speed in (("1.9086", 2.5e10), ("1.9100", 1.0e10)):  # a busy machine: it moved no verdict
        finished_run(tmp_path, val, speed=speed, settings="AUTORESEARCH_PRESET=small")
        recording.record("keep", "baseline")
    assert "noise floor: 0.001400" in capsys.readouterr().out
    repo("idea")
    finished_run(tmp_path, "1.9200", speed=0.5e10, settings="AUTORESEARCH_PRESET=small")
    recording.record("discard", "idea")
    out = capsys.readouterr().out
    assert "verdict: worse" in out and "FLOP/s" not in out


def test_a_timeout_is_a_crash_and_a_finished_run_is_not(repo, tmp_path):
    repo("slow")
    crashed_before_start(tmp_path, "step 00100 (40.0%) | loss: 4.0")
    row = recording.record("discard", "slow idea")
    assert row["status"] == "crash" and row["description"] == "slow idea (no summary: stopped or timed out)"
    finished_run(tmp_path)
    with pytest.raises(SystemExit, match="a finished run is keep or discard"):
        recording.record("crash", "finished")


def test_a_run_under_other_settings_is_refused(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path, settings="AUTORESEARCH_PRESET=small")
    recording.record("keep", "baseline")
    repo("change")
    finished_run(tmp_path, val="0.5")  # standard settings: not the baseline's
    with pytest.raises(SystemExit, match=r"settings \(standard\) differ from the baseline's "
                                         r"\(AUTORESEARCH_PRESET=small"):
        recording.record("keep", "change")
    assert len(rows()) == 1


def test_the_baseline_settings_are_the_first_finished_runs(repo, tmp_path):
    repo("typo")
    crashed_before_start(tmp_path, "NameError: name 'x' is not defined")
    recording.record("crash", "a first run that crashed")
    repo("baseline")
    finished_run(tmp_path, settings="AUTORESEARCH_PRESET=small")
    recording.record("keep", "baseline")  # the crash has no settings: it does not set the baseline's
    assert [r["status"] for r in rows()] == ["crash", "keep"]


def test_record_outside_git_and_without_a_log_are_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="cannot read the run's log run.log"):
        recording.record("keep", "x")
    crashed_before_start(tmp_path, "error: DEPTH = 0")
    with pytest.raises(SystemExit, match="cannot read the commit"):
        recording.record("crash", "x")


def test_a_log_and_a_record_of_different_runs_are_refused(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path)
    log = (tmp_path / "run.log").read_text()
    finished_run(tmp_path)  # a newer run.json beside the older run.log
    (tmp_path / "run.log").write_text(log)
    with pytest.raises(SystemExit, match="they do not belong together"):
        recording.record("keep", "baseline")
    assert not os.path.exists("results.tsv") and not os.path.exists("runs")
    (tmp_path / "run.log").write_text("step 00000\n" + SUMMARY.format(val="0.9", settings="standard", run_id="x"))
    row = recording.record("keep", "baseline")  # a summary no run of ours printed: no run.json names it
    assert (row["status"], row["val_bpb"]) == ("crash", "0.000000")


# ---------------------------------------------------------------------------------------------------------------
# Speed: a run on a busier (or quieter) machine says so; a baseline pair at different speeds sets no floor

def test_a_run_at_another_speed_is_said_and_its_baseline_pair_sets_no_floor(repo, tmp_path, capsys):
    repo("baseline")
    finished_run(tmp_path, "1.9086", speed=2.5e10)
    recording.record("keep", "baseline")
    finished_run(tmp_path, "2.2376", speed=1.0e10)  # the machine was busy: 0.4x the speed
    recording.record("keep", "baseline")
    out = capsys.readouterr().out
    assert "noise floor: not set: the baseline's runs ran at different speeds" in out
    assert "run the baseline again" in out
    finished_run(tmp_path, "1.9100", speed=2.45e10)
    recording.record("keep", "baseline")
    out = capsys.readouterr().out
    assert "noise floor: 0.001400 (from the baseline's latest 2 runs of 3)" in out  # the two at the same speed
    repo("double lrs")
    finished_run(tmp_path, "2.0670", speed=1.1e10)
    recording.record("discard", "double lrs")
    out = capsys.readouterr().out
    assert "this run trained at 0.45x the model FLOP/s of the best's runs" in out and "run it again" in out
    summary = "\n".join(results.summary_lines(*results.load(["results.tsv"])))
    assert "Ran more than 10% away from the best's speed" in summary and "#2    0.45x  discard" in summary


# ---------------------------------------------------------------------------------------------------------------
# Reading what editors, spreadsheets and people leave

@pytest.mark.parametrize("content, says", [
    ("", "is empty (not even the header line)"),
    ("commit\tval_bpb\tstatus\tdescription\na1\t0.99\tkeep\tbaseline\n", "no memory_gb column"),
    ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tgpu\na1\t0.99\t1.0\tkeep\tbase\tline with a tab\tcpu\n",
     "a tab inside the description on line 2"),
    ("a1\t0.99\t1.0\tkeep\tbaseline\nb2\t0.98\t1.0\tkeep\tsecond\n", "has no header line"),
    ("commit\tval_bpb\tmemory_gb\tstatus\tdescription\tnotes\na1\t0.99\t1.0\tkeep\tbaseline\tmine\n",
     "column(s) notes are not results.tsv's: ignored"),
])
def test_bad_results_files_say_what_is_wrong_and_the_rest_reads(tmp_path, content, says):
    (tmp_path / "results.tsv").write_text(content)
    problems = []
    got = results.read_rows(str(tmp_path / "results.tsv"), problems)
    assert len(problems) == 1 and says in problems[0], problems
    if content:
        assert got[0]["commit"] == "a1" and got[0]["val_bpb"] == "0.99"
    if "tab" in says:
        assert got[0]["description"] == "base line with a tab"
    if says == "has no header line":
        assert [r["commit"] for r in got] == ["a1", "b2"]


def test_a_spreadsheets_bom_and_crlf_keep_every_earlier_row(repo, tmp_path, capsys):
    base = repo("baseline")
    saved = ("\ufeffcommit\tval_bpb\tmemory_gb\tstatus\tdescription\r\n"
             f"{base}\t0.997900\t44.0\tkeep\tbaseline\r\n").encode("utf-8")
    (tmp_path / "results.tsv").write_bytes(saved)
    finished_run(tmp_path, "0.998100")
    recording.record("keep", "baseline")
    data = (tmp_path / "results.tsv").read_bytes()
    assert data.startswith(saved) and data.endswith(b"\r\n")  # the earlier bytes, then the row, in the file's style
    assert [r["commit"] for r in rows()] == [base, base]


def test_record_prints_what_it_found_odd_in_the_file(repo, tmp_path, capsys):
    repo("baseline")
    (tmp_path / "results.tsv").write_text("a1\t0.99\t1.0\tkeep\tbaseline\n")
    finished_run(tmp_path, "0.98")
    recording.record("keep", "change")
    out = capsys.readouterr().out
    assert "note: reading results.tsv: " in out and "has no header line" in out
    assert [r["commit"] for r in rows()][0] == "a1" and len(rows()) == 2


def test_a_keep_without_a_value_is_not_a_finished_keep(tmp_path):
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "baseline"),
                                                  ("b2", "N/A", "44.0", "keep", "lost its value")])
    problems = []
    exps = results.experiments(results.read_rows(str(tmp_path / "results.tsv"), problems), "repo", problems)
    assert not exps[1]["finished"] and "without a val_bpb ('N/A')" in problems[0]
    text = "\n".join(results.summary_lines([str(tmp_path / "results.tsv")], {"repo": exps}, problems))
    assert "nan" not in text.lower() and "best:     0.997900" in text


def test_a_results_file_that_is_a_folder_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results" / "x.tsv").mkdir(parents=True)
    paths, agents, problems = results.load()
    assert any("cannot be read (a folder, not a file): skipped" in p for p in problems)


# ---------------------------------------------------------------------------------------------------------------
# Nothing lost: one writer at a time, names that never collide, links written through, both files or neither

def test_sixteen_records_at_once_keep_sixteen_rows(repo, tmp_path):
    repo("baseline")
    for i in range(16):  # sixteen finished runs, each with its log and record in a folder of its own
        (tmp_path / "logs" / f"r{i}").mkdir(parents=True)
        finished_run(tmp_path, f"0.99{i:02d}", where=tmp_path / "logs" / f"r{i}")
    procs = [subprocess.Popen([sys.executable, "-m", "autoresearch.results", "record", "discard", f"run {i}",
                               "--log", f"logs/r{i}/run.log"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(16)]
    assert all(p.wait(timeout=120) == 0 for p in procs), [p.stderr.read() for p in procs if p.returncode]
    assert len(rows()) == 16 and len(os.listdir("runs")) == 32


def test_a_new_results_file_beside_old_runs_overwrites_nothing(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path)
    recording.record("keep", "baseline")
    before = {n: (tmp_path / "runs" / n).read_bytes() for n in os.listdir("runs")}
    os.rename("results.tsv", "results-last-night.tsv")
    finished_run(tmp_path)
    recording.record("keep", "baseline")
    after = os.listdir("runs")
    assert len(after) == 4 and all((tmp_path / "runs" / n).read_bytes() == data for n, data in before.items())


def test_a_symlinked_results_file_is_written_through(repo, tmp_path):
    repo("baseline")
    (tmp_path / "elsewhere").mkdir()
    write_results(str(tmp_path / "elsewhere" / "results.tsv"), [])
    os.symlink(tmp_path / "elsewhere" / "results.tsv", tmp_path / "results.tsv")
    finished_run(tmp_path)
    recording.record("keep", "baseline")
    assert os.path.islink("results.tsv") and len(rows("elsewhere/results.tsv")) == 1


def test_runs_that_cannot_be_written_record_nothing_and_a_retry_adds_no_duplicate(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs/ folder belongs")  # (unwritable even for root)
    with pytest.raises(SystemExit, match="cannot write .*runs \\(.*\\): nothing recorded"):
        recording.record("keep", "baseline")
    assert not os.path.exists("results.tsv")
    os.remove(tmp_path / "runs")
    recording.record("keep", "baseline")
    assert [r["description"] for r in rows()] == ["baseline"]


def test_a_results_file_in_a_folder_that_cannot_be_written_is_one_line(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path)
    (tmp_path / "not-a-folder").write_text("")
    with pytest.raises(SystemExit, match="cannot write in .*not-a-folder .*: record needs a writable folder"):
        recording.record("keep", "baseline", path=str(tmp_path / "not-a-folder" / "results.tsv"))


def test_the_row_and_the_log_are_written_together_or_neither(repo, tmp_path, monkeypatch):
    repo("baseline")
    finished_run(tmp_path)

    def full_disk(path, row):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recording, "append_row", full_disk)
    with pytest.raises(SystemExit, match="cannot write results.tsv \\(No space left on device\\): nothing recorded"):
        recording.record("keep", "baseline")
    assert os.listdir("runs") == [] and not os.path.exists("results.tsv")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    recording.record("keep", "baseline")  # the retry: one row, not a duplicate re-run
    assert [r["description"] for r in rows()] == ["baseline"] and len(os.listdir("runs")) == 2


def test_a_summary_piped_into_head_ends_quietly(tmp_path):
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", f"change {i}")
                                                  for i in range(3000)])
    proc = subprocess.run(f"{sys.executable} -m autoresearch.results | head -n 3", shell=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=60)
    assert len(proc.stdout.splitlines()) == 3 and "Traceback" not in proc.stderr and "Error" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# The summary and the plot

def test_the_tip_a_simpler_equal_is_said_beside_the_best(tmp_path):
    write_results(str(tmp_path / "results.tsv"), [
        ("a1", "0.997900", "44.0", "keep", "baseline"), ("a1", "0.998900", "44.0", "keep", "baseline (rerun)"),
        ("b2", "0.990000", "44.0", "keep", "halve the batch"),
        ("c3", "0.990500", "44.0", "keep", "delete the value embeddings gate (simpler, equal)")])
    paths, agents, problems = results.load([str(tmp_path / "results.tsv")])
    text = "\n".join(results.summary_lines(paths, agents, problems))
    assert "best:     0.990000 (#2 b2" in text
    assert "tip:      0.990500 (#3 c3, the last kept commit: the next experiment starts here; equal to the best " \
           "within the floor, kept as the simpler code)" in text


def notebook_figure(folder, monkeypatch):
    """analysis.ipynb's own code cells, run in this process (no kernel) in folder: the figure they draw."""
    import matplotlib
    import nbformat
    matplotlib.use("Agg")
    monkeypatch.chdir(folder)
    namespace = {}
    for cell in nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4).cells:
        if cell.cell_type == "code":
            exec(cell.source, namespace)
    return namespace["fig"]


def test_crash_marks_are_drawn_inside_the_axes(tmp_path, monkeypatch):
    write_results(str(tmp_path / "results.tsv"), [("a", "0.99", "1", "keep", "b"), ("b", "0", "0", "crash", "c")])
    ax = notebook_figure(tmp_path, monkeypatch).axes[0]
    (y_low, y_high), (x_low, x_high) = ax.get_ylim(), ax.get_xlim()
    crashes = [c for c in ax.collections if c.get_label() == f"{tmp_path.name}: crash"][0].get_offsets()
    assert all(x_low < x < x_high and y_low < y < y_high for x, y in crashes)


def test_one_experiment_draws_a_band_and_whole_numbered_ticks(tmp_path, monkeypatch):
    write_results(str(tmp_path / "results.tsv"), [("a", "0.9979", "1", "keep", "baseline"),
                                                  ("a", "0.9969", "1", "keep", "baseline (rerun)")])
    ax = notebook_figure(tmp_path, monkeypatch).axes[0]
    band = [c for c in ax.collections if "noise floor" in str(c.get_label())][0]
    xs = band.get_paths()[0].vertices[:, 0]
    assert xs.max() - xs.min() >= 1.0  # a band one experiment wide, not a line
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [1.0]


def test_the_command_prints_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "baseline"),
                                                  ("b2", "0.990000", "44.0", "keep", "halve the batch")])
    results.main([])
    out = capsys.readouterr().out
    assert "2 experiments: 2 keep, 0 discard, 0 crash" in out and "+0.007900  #2" in out
    assert "Each agent's best:" in out


# ---------------------------------------------------------------------------------------------------------------
# A hostile tester's cases: descriptions in any encoding, runs from elsewhere, records changed after the run

def test_a_failed_row_write_of_any_kind_leaves_no_run_files(repo, tmp_path, monkeypatch):
    repo("baseline")
    finished_run(tmp_path)

    def interrupted(path, row):  # (not an OSError: Ctrl-C, an encoding error)
        raise KeyboardInterrupt

    monkeypatch.setattr(recording, "append_row", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recording.record("keep", "baseline")
    assert os.listdir("runs") == [] and not os.path.exists("results.tsv")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert recording.record("keep", "baseline")["description"] == "baseline"  # the retry is recorded


@pytest.mark.parametrize("argument, env, stored", [
    (b"baseline caf\xe9", {}, "baseline caf\ufffd"),  # a Latin-1 terminal's byte
    ("naïve café".encode(), {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}, "naïve café"),  # ASCII
    (b"x \x1b[2J\x1b[H\x07 y", {}, "x \\x1b[2J\\x1b[H\\x07 y"),  # escape codes: shown, never sent to a terminal
])
def test_a_description_in_any_encoding_is_stored_readable(repo, tmp_path, argument, env, stored):
    repo("baseline")
    finished_run(tmp_path)
    proc = subprocess.run([sys.executable.encode(), b"-m", b"autoresearch.results", b"record", b"keep", argument],
                          cwd=tmp_path, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr, proc.stderr
    assert rows()[0]["description"] == stored
    assert b"\x1b" not in proc.stdout and b"\x07" not in proc.stdout
    summary = subprocess.run([sys.executable, "-m", "autoresearch.results"], cwd=tmp_path, capture_output=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert summary.returncode == 0 and b"\x1b" not in summary.stdout


def test_escape_codes_written_into_results_tsv_by_hand_are_shown_escaped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "base\x1b]0;owned\x07line")])
    results.main([])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "base\\x1b]0;owned\\x07line" in out


def test_a_run_from_another_checkout_is_refused(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        git(folder, "init", "-q")
        (folder / "train.py").write_text("same code")
        git(folder, "add", "train.py")
        git(folder, "commit", "-qm", "baseline")
    finished_run(a)
    monkeypatch.chdir(b)
    with pytest.raises(SystemExit, match=r"this run ran in another checkout \(.*a\): record it there"):
        recording.record("keep", "x", log=str(a / "run.log"))
    assert not os.path.exists(b / "results.tsv")


def test_a_run_goes_into_one_results_file_only(repo, tmp_path):
    repo("baseline")
    finished_run(tmp_path)
    recording.record("keep", "baseline", path="mine.tsv")
    with pytest.raises(SystemExit, match=r"is already recorded, as row 1 of .*mine\.tsv"):
        recording.record("keep", "baseline", path="other.tsv")
    assert not os.path.exists("other.tsv")


def test_gpu_models_never_mix_baseline_floor_or_verdicts(repo, tmp_path, capsys):
    # a wave screened on H200s and a change confirmed on an H100: each model has its own baseline and floor
    H200 = "NVIDIA H200"
    base = repo("baseline")
    for val, gpu in (("0.950000", H200), ("0.952000", H200), ("0.997900", H100), ("0.995900", H100)):
        finished_run(tmp_path, val, gpu=gpu)
        recording.record("keep", "baseline")
    capsys.readouterr()
    change = repo("halve the batch")
    finished_run(tmp_path, "0.990000", gpu=H100)  # against the H100's best, 0.996900: better (the H200's: worse)
    recording.record("keep", "halve TOTAL_BATCH_SIZE")
    out = capsys.readouterr().out
    assert "verdict: better (0.990000 against the best 0.996900" in out and "floor 0.002000" in out
    got = [(r["commit"], r["description"], r["gpu"]) for r in results.read_rows("results.tsv", [])]
    assert got == [(base, "baseline", H200), (base, "baseline (rerun)", H200), (base, "baseline", H100),
                   (base, "baseline (rerun)", H100), (change, "halve TOTAL_BATCH_SIZE", H100)]
    summary = "\n".join(results.summary_lines(*results.load(["results.tsv"])))
    assert f"== {tmp_path.name} on {H100} ==" in summary and f"== {tmp_path.name} on {H200} ==" in summary
    h100 = summary.split(f"== {tmp_path.name} on {H100} ==")[1].split("==")[0]
    assert "2 experiments: 2 keep" in h100 and "baseline: 0.996900" in h100


def test_a_results_file_from_before_the_gpu_column_gets_rows_that_name_their_gpu(repo, tmp_path, capsys):
    """An old five-column file of H100 rows (the reference's header, no runs/): a CPU run appended to it keeps its
    GPU in a sixth field, reads back with it (not glued onto the description), and is judged against CPU runs
    only, never against the H100's best."""
    repo("baseline")
    (tmp_path / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                                          "abc1234\t0.998000\t44.0\tkeep\tbaseline\n"
                                          "abc1234\t0.996000\t44.0\tkeep\tbaseline (rerun)\n"
                                          "def5678\t0.980000\t44.0\tkeep\ta big win\n")
    finished_run(tmp_path, "1.759000", gpu="cpu", settings="AUTORESEARCH_PRESET=small")
    recording.record("keep", "baseline on my laptop")
    out = capsys.readouterr().out
    assert "verdict" not in out and "noise floor: not set: one baseline run so far" in out
    lines = (tmp_path / "results.tsv").read_text().splitlines()
    assert [len(line.split("\t")) for line in lines] == [5, 5, 5, 5, 6]
    last = results.read_rows("results.tsv", [])[-1]
    assert last["description"] == "baseline on my laptop" and last["gpu"] == "cpu"
    summary = "\n".join(results.summary_lines(*results.load(["results.tsv"])))
    assert f"== {tmp_path.name} on cpu ==" in summary and f"== {tmp_path.name} on an unknown GPU ==" in summary


def test_a_value_edited_by_hand_moves_no_floor_and_no_verdict(repo, tmp_path, capsys):
    """The baseline's re-run 2.488 written 24.88 by hand: the summary and the next verdict use what runs/ proves,
    and name the row that says otherwise; a row added by hand that no run proves is named and not counted."""
    repo("baseline")
    for val in ("2.489000", "2.488000"):
        finished_run(tmp_path, val, settings="AUTORESEARCH_PRESET=small")
        recording.record("keep", "baseline")
    text = (tmp_path / "results.tsv").read_text()
    (tmp_path / "results.tsv").write_text(text.replace("\t2.488000\t", "\t24.880000\t")
                                          + "fff0000\t1.000000\t1.0\tkeep\ta miracle\tcpu\n")
    paths, agents, problems = results.load(["results.tsv"])
    summary = "\n".join(results.summary_lines(paths, agents, problems))
    assert "noise floor: 0.001000" in summary and "total improvement: 0.000000" in summary, summary
    assert "#2" in summary and "'24.880000', its run '2.488000'" in summary and "the runs' values are used" in summary
    assert "#3 fff0000" in summary and "match no run in runs/ (added by hand?): not counted" in summary
    repo("idea")
    finished_run(tmp_path, "2.480000", settings="AUTORESEARCH_PRESET=small")
    recording.record("keep", "idea")
    assert "verdict: better (2.480000 against the best 2.488500" in capsys.readouterr().out


def test_a_fifo_or_a_link_to_a_device_in_results_is_skipped_not_waited_on(tmp_path):
    (tmp_path / "results").mkdir()
    os.mkfifo(tmp_path / "results" / "pipe.tsv")
    os.symlink("/dev/zero", tmp_path / "results" / "zero.tsv")
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "baseline")])
    proc = subprocess.run([sys.executable, "-m", "autoresearch.results"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and proc.stdout.count("not a regular file): skipped") == 2, proc.stdout


def test_the_same_crash_log_under_a_new_commit_is_a_new_row(repo, tmp_path):
    """A log without a run (train.py stopped before the fixed code started) has no run id: the same text under
    another commit is another run; recorded twice under one commit, it is refused."""
    for idea in ("idea one", "idea two"):
        repo(idea)
        crashed_before_start(tmp_path, "SyntaxError: invalid syntax")
        recording.record("crash", idea)
    assert [r["description"] for r in rows()] == ["idea one (SyntaxError: invalid syntax)",
                                                  "idea two (SyntaxError: invalid syntax)"]
    with pytest.raises(SystemExit, match="is already recorded, as row 2"):
        recording.record("crash", "idea two")


def test_verify_judges_a_rerun_exactly_on_the_cpu_and_within_twice_the_floor_elsewhere():
    """verify's rules for one re-run: under the compute budget on the CPU the same steps to the same digits; on a GPU
    (or under the time budget) within twice the noise floor, on the GPU model the runs were recorded on."""
    from autoresearch.verify import judge
    exp = {"value": 1.0}

    def run(value, steps=10, gpu="cpu", device="cpu", kind="flops", status="finished"):
        return dict(status=status, val_bpb=value, steps=steps, gpu=gpu, budget_kind=kind, summary=dict(device=device))

    cpu = [run(1.0), run(1.0)]
    assert judge(exp, cpu, 0.001, run(1.0))[0]
    assert not judge(exp, cpu, 0.001, run(1.000001))[0]  # (another digit of the six recorded)
    assert not judge(exp, cpu, 0.001, run(1.0, steps=11))[0]  # (another step count)
    h100 = [run(1.0, gpu="NVIDIA H100 80GB HBM3", device="cuda", kind="time")] * 2
    ok, words = judge(exp, h100, 0.01, run(1.019, gpu="NVIDIA H100 80GB HBM3", device="cuda", kind="time"))
    assert ok and "within 0.020000 (twice the noise floor)" in words
    assert not judge(exp, h100, 0.01, run(1.021, gpu="NVIDIA H100 80GB HBM3", device="cuda", kind="time"))[0]
    assert not judge(exp, h100, None, run(1.0, gpu="NVIDIA H100 80GB HBM3", device="cuda", kind="time"))[0]
    other = judge(exp, h100, 0.01, run(1.0, gpu="NVIDIA A100-SXM4-80GB", device="cuda", kind="time"))
    assert not other[0] and "recorded on NVIDIA H100 80GB HBM3: not comparable" in other[1]
    crashed = judge(exp, cpu, 0.001, dict(status="failed", reason="out of memory"))
    assert not crashed[0] and crashed[1] == "the re-run did not finish (out of memory)"
    assert judge(exp, cpu, 0.001, None) == (False, "the re-run did not finish (no record)")
