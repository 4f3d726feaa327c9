"""The research log cannot lie: the slips an agent makes, each tried for real (the tiny model on the CPU; a real
git checkout where git matters), and what the run and `record` make of it. Each test names the case it
covers."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import train
from autoresearch import record, recording, results, runtime
from conftest import ROOT, TEST_ENV, agent_repo, edit_train, git, record_cli, run_train
from test_train import TINY_KNOBS


def rows(repo):
    return results.read_rows(os.path.join(repo, "results.tsv"), [])


# ---------------------------------------------------------------------------------------------------------------
# In git: the code that ran, and a run recorded once

def test_uncommitted_or_reset_code_is_refused_and_a_run_is_recorded_once(prepared, tmp_path):
    repo = agent_repo(tmp_path)
    edit_train(repo, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ")  # (1) an edit the agent forgot to commit
    status, log = run_train(repo)
    assert status == 0 and "note: train.py differs from the commit it is on" in log
    with open(os.path.join(repo, "run.log"), "a") as log:  # an extra block after the real summary
        log.write("---\nnote_from_the_agent: 1\n")
    forgot = record_cli(repo, "keep", "matrix lr 0.05")
    assert forgot.returncode == 1 and "commit the code that ran first" in forgot.stderr
    git(repo, "stash", "-q")  # ... or the edit reset away before recording
    reset = record_cli(repo, "keep", "matrix lr 0.05")
    assert reset.returncode == 1 and "commit the code that ran first" in reset.stderr
    git(repo, "stash", "pop", "-q")
    git(repo, "commit", "-qam", "matrix lr 0.05")
    assert record_cli(repo, "keep", "matrix lr 0.05").returncode == 0
    twice = record_cli(repo, "keep", "matrix lr 0.05")  # (2) the agent forgot to run: the same run again
    assert twice.returncode == 1 and "is already recorded, as row 1" in twice.stderr
    assert [(r["status"], r["description"]) for r in rows(repo)] == [("keep", "matrix lr 0.05")]
    assert rows(repo)[0]["commit"] == git(repo, "rev-parse", "--short", "HEAD").strip()
    run_id = record.read(os.path.join(repo, "run.json"))["run_id"]
    assert sorted(os.listdir(os.path.join(repo, "runs"))) == [f"{run_id}.json", f"{run_id}.log"]


def test_a_summary_the_agents_code_printed_before_the_run_was_killed_is_a_crash(prepared, tmp_path):
    repo = agent_repo(tmp_path)  # (5) train.py prints a block of its own, then hangs until `timeout` kills it
    edit_train(repo, "    while not run.done:\n", "    print('---\\nval_bpb:          0.100000', flush=True)\n"
                                                  "    time.sleep(600)\n    while not run.done:\n", "a fake summary")
    log = open(os.path.join(repo, "run.log"), "w")
    proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **TEST_ENV})
    try:
        deadline = time.time() + 120
        while "val_bpb:" not in open(os.path.join(repo, "run.log")).read() and time.time() < deadline:
            time.sleep(0.2)
        going = record_cli(repo, "keep", "a fake summary")
        assert going.returncode == 1 and "is still going" in going.stderr
    finally:
        proc.send_signal(signal.SIGKILL)  # (killed outright: no `failed` record)
        proc.wait()
        log.close()
    recorded = record_cli(repo, "keep", "a fake summary")
    assert recorded.returncode == 0 and "recorded as a crash" in recorded.stdout
    assert rows(repo)[0]["status"] == "crash" and "killed before its summary" in rows(repo)[0]["description"]


# ---------------------------------------------------------------------------------------------------------------
# In process: what train.py may do to the fixed rules, and what the run then says

def run_in_process(monkeypatch, capsys):
    """train.main() on the tiny settings and the tests' compute budget, in the current folder: returns (the
    `error:` line or None, stdout, the run's record)."""
    for name, value in TINY_KNOBS:
        monkeypatch.setattr(train, name, value)
    try:
        train.main()
        error = None
    except SystemExit as e:
        error = str(e.code)
    out = capsys.readouterr().out
    with open("run.log", "w", encoding="utf-8") as f:
        f.write(out + (error or "") + "\n")
    return error, out, record.read("run.json")


def test_weights_that_turn_nan_after_the_last_step_end_in_an_error_and_a_crash(prepared, monkeypatch, capsys):
    evaluate = train.evaluate_bpb

    def poisoned(model, tokenizer, batch_size):  # the last update overflowed
        for p in model.parameters():
            p.data.fill_(float("nan"))
        return evaluate(model, tokenizer, batch_size)

    monkeypatch.setattr(train, "evaluate_bpb", poisoned)
    error, out, run = run_in_process(monkeypatch, capsys)
    assert error.startswith("error: val_bpb is nan") and "\n---\n" not in out
    assert run["status"] == "failed" and run["reason"].startswith("val_bpb is nan")
    identity, _, kind, reason = recording.identify(open("run.log").read(), ".")
    assert (identity, kind) == (run["run_id"], "crash") and reason.startswith("val_bpb is nan")


@pytest.mark.parametrize("where", ["runtime", "train"])
def test_a_metric_constant_reassigned_before_the_start_stops_the_run_at_once(prepared, monkeypatch, capsys, where):
    # `runtime.TIME_BUDGET = 20` in train.py; MAX_SEQ_LEN reassigned in train.py
    if where == "runtime":
        monkeypatch.setattr(runtime, "TIME_BUDGET", 20.0, raising=False)
        says = "TIME_BUDGET = 20.0 set in autoresearch/runtime.py"
    else:
        monkeypatch.setattr(train, "MAX_SEQ_LEN", 64)
        says = "MAX_SEQ_LEN = 64 set in train.py"
    error, out, run = run_in_process(monkeypatch, capsys)
    assert error.startswith("error: the metric's constants are fixed: ") and says in error, error
    assert "step 00000" not in out and run["status"] == "failed"


def refused_keep(run):
    """What `record keep` says of a finished run (it refuses before it looks at git)."""
    with open("run.json", "w", encoding="utf-8") as f:  # (as the run left it)
        import json
        json.dump(run, f)
    with pytest.raises(SystemExit) as refusal:
        recording.record("keep", "an idea")
    return str(refusal.value.code)


def test_the_uncounted_steps_cannot_be_set(prepared, monkeypatch, capsys):
    init = runtime.Run.__init__

    def warm_up_three(self, *args, **kwargs):  # `run.warmup = 3`
        init(self, *args, **kwargs)
        self.warmup = 3

    monkeypatch.setattr(runtime.Run, "__init__", warm_up_three)
    with pytest.raises(AttributeError):
        run_in_process(monkeypatch, capsys)
    run = record.read("run.json")
    assert run["status"] == "failed" and run["reason"].startswith("AttributeError") and run["summary"] is None


def test_a_step_begun_after_the_budget_ran_out_is_said(prepared, monkeypatch, capsys):
    end_step = runtime.Run.end_step

    def one_more(self, loss, lrm, epoch):  # a loop that does not stop at run.done
        end_step(self, loss, lrm, epoch)
        if self.done and not getattr(self, "_one_more", False):
            self._one_more = True
            self.begin_step()
            end_step(self, loss, lrm, epoch)

    monkeypatch.setattr(runtime.Run, "end_step", one_more)
    error, out, run = run_in_process(monkeypatch, capsys)
    assert error is None and "1 step(s) begun after the budget ran out" in out
    assert run["late_steps"] == 1 and "compares with no other" in refused_keep(run)


def test_a_forward_that_ignores_reduction_none_is_one_line(prepared, monkeypatch, capsys):
    forward = train.GPT.forward

    def mean_only(self, idx, targets=None, reduction="mean"):  # a forward that drops the argument
        return forward(self, idx, targets)

    monkeypatch.setattr(train.GPT, "forward", mean_only)
    error, out, run = run_in_process(monkeypatch, capsys)
    assert error.startswith("error: the model returned a loss of shape () for reduction='none'")
    assert run["status"] == "failed" and "\n---\n" not in out


def test_a_val_bpb_that_is_not_the_metrics_is_said(prepared, monkeypatch, capsys):
    monkeypatch.setattr(train, "evaluate_bpb", lambda model, tokenizer, batch_size: 0.5)  # (no metric ran)
    error, out, run = run_in_process(monkeypatch, capsys)
    assert error is None and "val_bpb did not come from prepare.evaluate_bpb" in out
    assert "compares with no other" in refused_keep(run)


def test_a_run_that_counted_no_step_ends_in_one_line(prepared):
    import torch
    no_step = lambda: runtime.Run(torch.device("cpu"), 1.0, 1024, time.perf_counter(), {}).summary(1.0, 10, 2)  # noqa
    with pytest.raises(SystemExit, match="error: no step counted toward the"):
        runtime.main(no_step, "DEPTH=2")


def test_a_run_outside_runtime_main_is_one_line():
    import torch  # (train() called directly: the compute before its Run would count for nothing)
    with pytest.raises(SystemExit, match=r"^error: train\(\) ran outside runtime.main: keep train.py's main\(\)"):
        runtime.Run(torch.device("cpu"), 1.0, 1024, time.perf_counter(), {})


# ---------------------------------------------------------------------------------------------------------------
# Code in train.py that bends the run: what the fixed code sees of it

def test_a_training_loader_of_the_validation_split_makes_the_run_comparable_with_none(prepared, monkeypatch, capsys):
    make = train.make_dataloader
    monkeypatch.setattr(train, "make_dataloader", lambda tok, B, T, split, device: make(tok, B, T, "val", device))
    error, out, run = run_in_process(monkeypatch, capsys)
    assert error is None and "train.py made a loader of the validation split" in out
    assert "compares with no other" in refused_keep(run)


def test_a_second_sigterm_during_the_cleanup_of_the_first_is_ignored():
    """`timeout 600 uv run train.py` signals uv and its whole process group, and uv passes the signal on: train.py
    can get SIGTERM twice. The second, arriving while the first's cleanup writes the failed record, must not kill
    the process there (leaving a `running` record and a run.json.*.tmp)."""
    script = ("import os, signal, time\n"
              "from autoresearch.errors import UserError, sigterm_as_error\n"
              "try:\n"
              "    with sigterm_as_error('stopped'):\n"
              "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
              "except UserError as e:\n"
              "    print(e.message)\n"
              "os.kill(os.getpid(), signal.SIGTERM)  # the second, during the cleanup\n"
              "print('cleanup done')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["stopped", "cleanup", "done"], proc


def edit_file(repo, name, old, new, message):
    path = os.path.join(repo, name)
    text = open(path, encoding="utf-8").read()
    assert old in text, old
    open(path, "w", encoding="utf-8").write(text.replace(old, new))
    git(repo, "commit", "-qam", message)


def test_fixed_files_that_are_not_the_baselines_are_refused(prepared, tmp_path):
    """A committed edit of the metric (val_bpb x 0.9 in prepare.py) and of the budget (FLOP_BUDGET doubled in
    constants.py) makes another metric: record refuses it in one line naming both files, against the baseline's."""
    repo = agent_repo(tmp_path)
    assert run_train(repo)[0] == 0 and record_cli(repo, "keep", "baseline").returncode == 0
    base = git(repo, "rev-parse", "--short", "HEAD").strip()
    path = os.path.join(repo, "prepare.py")
    text = open(path, encoding="utf-8").read()
    old = "val_bpb, val_bpb_exact = (total_nats / (math.log(2) * n) for n in total_bytes)"
    assert old in text
    open(path, "w", encoding="utf-8").write(text.replace(old, old.replace("(total_nats", "(0.9 * total_nats")))
    edit_file(repo, "constants.py", '"FLOP_BUDGET": 4e12}', '"FLOP_BUDGET": 8e12}', "a better metric, a bigger budget")
    assert run_train(repo)[0] == 0
    refused = record_cli(repo, "keep", "a better metric")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert refused.stderr.startswith(f"error: constants.py is not the baseline's (commit {base}), nor are prepare.py")
    assert f"git checkout {base} -- prepare.py constants.py autoresearch" in refused.stderr


def test_a_run_in_which_no_step_ends_stops_itself_as_a_hang(prepared, monkeypatch):
    """A train.py that never ends its steps (a sleep, a deadlock) stops by itself, however long its `timeout`: one
    line and a failed record, not a slot held all night."""
    monkeypatch.setattr(runtime, "STALL_SECONDS", 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(SystemExit, match=r"^error: no training step ended in 0.5 s: train.py hangs"):
            runtime.main(lambda: time.sleep(60), "DEPTH=2")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (the stop leaves SIGTERM ignored, as a stopping process may)
    assert time.monotonic() - start < 30
    data = record.read("run.json")
    assert data["status"] == "failed" and data["reason"].startswith("no training step ended in 0.5 s")


def test_verify_runs_the_best_kept_commits_again_and_says_which_reproduce(prepared, tmp_path):
    """Two kept commits on the CPU under the compute budget: `verify 2` runs each again from a clean tree in a
    fresh process; each run repeats exactly, and the one whose row was changed by hand is said not to reproduce."""
    repo = agent_repo(tmp_path)
    assert run_train(repo)[0] == 0 and record_cli(repo, "keep", "baseline").returncode == 0
    edit_train(repo, "EMBEDDING_LR = 0.6 ", "EMBEDDING_LR = 0.7 ", "embedding lr")
    assert run_train(repo)[0] == 0
    done = subprocess.run([sys.executable, "-m", "autoresearch.results", "record", "keep", "embedding lr",
                           "--overrule"], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    edit_train(repo, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.06 ")  # (the working copy moves on: verify never uses it)
    path = os.path.join(repo, "results.tsv")
    rows = open(path).read().splitlines()
    n = next(i for i, row in enumerate(rows) if "\tembedding lr\t" in row)  # its value changed by hand
    fields = rows[n].split("\t")
    fields[1] = f"{float(fields[1]) - 0.5:.6f}"
    rows[n] = "\t".join(fields)
    open(path, "w").write("\n".join(rows) + "\n")
    verify = subprocess.run([sys.executable, "-m", "autoresearch.results", "verify", "2"], cwd=repo,
                            capture_output=True, text=True, timeout=600)
    said = [line for line in verify.stdout.splitlines() if "reproduce" in line]
    assert verify.returncode == 1 and verify.stderr.startswith("error: 1 of 2 kept result(s) did not reproduce")
    assert len(said) == 2 and sum(": reproduces: " in line and "(exact)" in line for line in said) == 1, said
    wrong = [line for line in said if "does NOT reproduce" in line]
    assert len(wrong) == 1 and "embedding lr" in wrong[0] and "differ from their runs in runs/" in wrong[0], said
    # (its run repeats too, to the step and the digit: only the row, edited by hand, does not)
    assert re.search(r"val_bpb (\S+), (\d+) steps; recorded \1, \2 steps \(exact\)", wrong[0]), wrong[0]
    assert len(os.listdir(os.path.join(repo, "runs", "verify"))) == 2
