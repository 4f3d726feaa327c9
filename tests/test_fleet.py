"""autoresearch.fleet on a local Ray with two declared GPU slots, running tiny CPU runs of an agent's commits:
program.md's wave commands as written, two runs at once and the others waiting for a slot, each run its commit's
tree whatever the working copy holds, a killed run and a lost one recorded as crashes. Skipped without Ray
(`uv sync --extra fleet`)."""
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from autoresearch import fleet, results
from conftest import ROOT, TEST_ENV, agent_repo, edit_train, git

ray = pytest.importorskip("ray", reason="the fleet needs Ray: uv sync --extra fleet")


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of three nodes on this machine (Ray's own test utility): a head without GPUs and two GPU hosts
    of one declared GPU slot each (these are CPUs). The commands reach it by RAY_ADDRESS, without token
    authentication (a local Ray would otherwise write a token into ~/.ray, which changes the user's clusters).
    Shut down, with every actor, at the end."""
    from ray.cluster_utils import Cluster
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    nodes = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, num_gpus=0))
    for _ in range(2):
        nodes.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=nodes.address, namespace=fleet.NAMESPACE, logging_level="ERROR", log_to_driver=False,
             configure_logging=False)
    nodes.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = nodes.address
    yield nodes
    ray.shutdown()
    nodes.shutdown()
    fleet.sweep_trees()  # (the tree of the run whose node was removed: the next run here would remove it)
    for name, value in saved.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def shell(repo, bin_dir, command):
    """One command line in bash in the agent's checkout, `uv` standing for the project's environment."""
    env = {**os.environ, **TEST_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": repo}
    return subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def agent(prepared, tmp_path, cluster):
    """An agent's checkout with a `uv` on the PATH; returns (repo, sh)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text(f'#!/bin/sh\n[ "$1" = run ] && shift\nexec {sys.executable} "$@"\n')
    os.chmod(bin_dir / "uv", 0o755)
    repo = agent_repo(tmp_path)
    return repo, lambda command: shell(repo, bin_dir, command)


def wave_commands():
    """The command lines of program.md's wave block: run, wait, record --run."""
    text = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    section = text.split("\n## Several GPUs\n")[1].split("\n## ")[0]
    return [line for block in re.findall(r"```\n(.*?)```", section, flags=re.S) for line in block.splitlines()]


def book():
    return ray.get(ray.get_actor(fleet.BOOK, namespace=fleet.NAMESPACE).get.remote())


def test_a_wave_of_three_on_two_slots_runs_each_commit_once_two_at_a_time(agent):
    repo, sh = agent
    run, wait, record = wave_commands()
    base = git(repo, "rev-parse", "--short", "HEAD").strip()
    edit_train(repo, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ", "matrix lr 0.05")
    change = git(repo, "rev-parse", "--short", "HEAD").strip()
    started = sh(run.replace("<commit> [<commit> ...]", f"{base} {base} {change}"))
    assert started.returncode == 0, started.stderr
    ids = [line.split()[0] for line in started.stdout.splitlines()]
    assert [line.split()[1] for line in started.stdout.splitlines()] == [base, base, change]
    edit_train(repo, "DEPTH = 2 if SMALL", "DEPTH = 0 if SMALL")  # the working copy moves on (a typo): no run sees it
    status = sh("uv run -m autoresearch.fleet status")
    assert status.returncode == 0 and all(i in status.stdout for i in ids)
    waited = sh(wait)
    assert waited.returncode == 0, waited.stderr
    assert sorted(line.split()[0] for line in waited.stdout.splitlines()) == sorted(ids)
    assert waited.stdout.count(" val_bpb ") == 3 and "crash" not in waited.stdout
    metas = [json.load(open(os.path.join(repo, "fleet", i, "fleet.json"))) for i in ids]
    at_once = []
    for m in metas:  # never more than two at once (at any run's start), and two at once on different GPU hosts
        running = [o for o in metas if o["started"] <= m["started"] < o["ended"]]
        assert len(running) <= 2 and len({o["node"] for o in running}) == len(running)
        at_once.append(len(running))
    assert max(at_once) == 2  # two ran at once; the others waited for a slot
    status = sh("uv run -m autoresearch.fleet status").stdout
    assert all(re.search(rf"^{i} .* finished .* val_bpb \d\.\d{{6}}$", status, flags=re.M) for i in ids), status
    git(repo, "checkout", "-q", "train.py")
    described = ["baseline", "baseline", "matrix lr 0.05"]
    for run_id, what in zip(ids, described):
        done = sh(record.replace("<run id>", run_id).replace("<what you tried>", what))
        assert done.returncode == 0, done.stderr
    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert [(r["commit"], r["status"], r["description"], r["gpu"]) for r in rows] == [
        (base, "keep", "baseline", "cpu"), (base, "keep", "baseline (rerun)", "cpu"),
        (change, "keep", "matrix lr 0.05", "cpu")]
    assert rows[0]["val_bpb"] == rows[1]["val_bpb"]  # the same commit, the same steps: the same value
    again = sh(record.replace("<run id>", ids[0]).replace("<what you tried>", "baseline"))
    assert again.returncode == 1 and "already recorded" in again.stderr


def test_a_killed_run_a_lost_node_and_a_cut_short_start_are_crashes_to_record(agent, cluster):
    repo, sh = agent
    edit_train(repo, "    while not run.done:\n", "    time.sleep(60)\n    while not run.done:\n", "slow start")
    started = sh("uv run -m autoresearch.fleet run HEAD HEAD")
    assert started.returncode == 0, started.stderr
    killed, lost = [line.split()[0] for line in started.stdout.splitlines()]
    deadline = time.time() + 60
    while not all(book()[i].get("pid") for i in (killed, lost)) and time.time() < deadline:
        time.sleep(0.2)
    pid = book()[killed]["pid"]
    while not os.path.exists(f"/proc/{pid}/cwd/run.json") and time.time() < deadline + 60:
        time.sleep(0.2)  # (train.py has started its record: a busy machine takes seconds to import torch)
    os.kill(book()[killed]["pid"], signal.SIGKILL)  # train.py killed outright (the OOM killer)
    host = next(n for n in cluster.worker_nodes if n.node_id.startswith(book()[lost]["node"]))
    cluster.remove_node(host)  # a GPU host disappears, its run with it
    cut = "20261203-000000-0123456789ab"  # `fleet run` interrupted between its book entry and its actor
    ray.get(ray.get_actor(fleet.BOOK, namespace=fleet.NAMESPACE).add.remote(cut, dict(
        commit=git(repo, "rev-parse", "HEAD").strip(), short="cut", state="queued", submitted=time.time(),
        origin=f"{socket.gethostname()}:{os.path.realpath(repo)}")))
    waited = sh(f"uv run -m autoresearch.fleet wait {killed} {lost} {cut}")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.count("crash:") == 3 and waited.stdout.count("its process or node died") == 2
    for run_id in (killed, lost):
        done = sh(f'uv run -m autoresearch.results record --run {run_id} keep "slow start"')
        assert done.returncode == 0 and "recorded as a crash" in done.stdout, done.stderr
    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert [r["status"] for r in rows] == ["crash", "crash"]
    assert "killed before its summary" in rows[0]["description"] and "node died" in rows[1]["description"]
    cluster.add_node(num_cpus=1, num_gpus=1)  # (a new host for the tests after this one)
    cluster.wait_for_nodes()
    deadline = time.time() + 30  # every slot is free again: the killed run's actor ended, the lost one's went
    while ray.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 2


def test_a_run_not_brought_here_or_not_a_commit_is_one_line(agent):
    repo, sh = agent
    missing = sh('uv run -m autoresearch.results record --run 20261203-000000-000000000000 keep "x"')
    assert missing.returncode == 1 and missing.stderr.startswith("error: run 20261203-000000-000000000000 is not here")
    bad = sh("uv run -m autoresearch.fleet run no-such-commit")
    assert bad.returncode == 1 and bad.stderr.strip() == (
        "error: 'no-such-commit' is not a commit of this checkout: commit the experiment, then run it")
    nodata = sh(f"AUTORESEARCH_CACHE_DIR={repo}/no-cache uv run -m autoresearch.fleet run HEAD")
    run_id = nodata.stdout.split()[0]
    waited = sh(f"uv run -m autoresearch.fleet wait {run_id}")
    assert f"crash: node {os.uname().nodename} has no data cache at {repo}/no-cache: run `uv run prepare.py` there" \
        in waited.stdout


def test_the_declared_slots_are_checked(monkeypatch):
    monkeypatch.setenv("AUTORESEARCH_FLEET_GPUS", "3")
    assert fleet.declared_gpus() == 3
    monkeypatch.setenv("AUTORESEARCH_FLEET_GPUS", "two")
    with pytest.raises(SystemExit, match="AUTORESEARCH_FLEET_GPUS='two' is not allowed"):
        fleet.declared_gpus()


def test_a_run_tree_whose_actor_died_is_swept_and_no_other(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # (a pid whose process is gone: an actor killed with its Ray)
    names = [f"autoresearch-run-{ended.pid}-20261206-000000-0123456789ab-x1", f"autoresearch-run-{os.getpid()}-y",
             "autoresearch-run-notapid-z", "autoresearch-test-cache-w"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "train.py").write_text("")
    fleet.sweep_trees()
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])


def test_without_ray_installed_the_fleet_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # (what `import ray` meets where the extra is not installed)
    with pytest.raises(SystemExit, match=r"the fleet needs Ray: `uv sync --extra fleet`"):
        fleet.connect()


# ---------------------------------------------------------------------------------------------------------------
# The fleet as users start it: a fresh copy of the project, `uv run`, a Ray cluster started by hand

def user_env(**extra):
    """The user's shell: this test run's settings, no virtual environment of the test runner's own, no Ray exports,
    and Python caching the bytecode it compiles (a CI machine's PYTHONDONTWRITEBYTECODE would have every process
    compile torch's sources again, ~4 s each, in the fresh environment)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "RAY_ADDRESS", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    return {**env, **TEST_ENV, "RAY_AUTH_MODE": "disabled", **extra}


def fresh_copy(folder):
    """The project's tracked files as they are here, committed in a new repository: what a fresh clone holds."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), os.path.join(folder, name))
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "baseline")
    return folder


@pytest.fixture
def short_tmp():
    """A short temporary folder (Ray's socket paths must fit in 107 bytes); every Ray run from it stopped after."""
    folder = tempfile.mkdtemp(prefix="arf-", dir="/tmp")
    yield folder
    fleet.stop_ray(folder, grace=0)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv on the PATH, as users run the fleet")
def test_the_fleet_as_readme_starts_it_from_a_fresh_copy(prepared, tmp_path, short_tmp):
    """`uv sync --extra fleet`, `uv run ray start --head`, RAY_ADDRESS, then program.md's commands through `uv run`:
    a cluster without GPU slots is one line; with one, a run ends with the same val_bpb as the same commit run
    directly, and is recorded."""
    repo = fresh_copy(str(tmp_path / "clone"))
    port = fleet.free_port()
    env = user_env(RAY_ADDRESS=f"127.0.0.1:{port}")
    uv = lambda *args, **kw: subprocess.run(["uv", *args], cwd=repo, env=env, capture_output=True, text=True,  # noqa
                                            timeout=300, **kw)
    assert uv("sync", "--extra", "fleet", "--quiet").returncode == 0
    head = ["run", "ray", "start", "--head", f"--port={port}", f"--temp-dir={short_tmp}", "--include-dashboard=false",
            "--disable-usage-stats"]
    assert uv(*head).returncode == 0
    none = uv("run", "-m", "autoresearch.fleet", "run", "HEAD")
    assert none.returncode == 1 and none.stderr.strip().endswith("--num-gpus=N` (on a CPU, N slots of its own)")
    assert "has no GPU slots" in none.stderr and len(none.stderr.strip().splitlines()) == 1
    fleet.stop_ray(short_tmp, grace=0)
    assert uv(*head, "--num-gpus=1").returncode == 0
    started = uv("run", "-m", "autoresearch.fleet", "run", "HEAD")
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[0]
    waited = uv("run", "-m", "autoresearch.fleet", "wait")
    assert waited.returncode == 0 and f"{run_id} " in waited.stdout and " val_bpb " in waited.stdout, waited.stderr
    with open(os.path.join(repo, "run.log"), "w") as log:
        assert subprocess.run(["uv", "run", "train.py"], cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=300).returncode == 0
    direct = re.search(r"^val_bpb: +(\S+)$", open(os.path.join(repo, "run.log")).read(), flags=re.M).group(1)
    assert f"val_bpb {direct} (cpu" in waited.stdout  # the same commit, the same numbers as a direct run
    recorded = uv("run", "-m", "autoresearch.results", "record", "--run", run_id, "keep", "baseline")
    assert recorded.returncode == 0, recorded.stderr
    assert results.read_rows(os.path.join(repo, "results.tsv"), [])[0]["val_bpb"] == direct
    fleet.stop_ray(short_tmp, grace=0)
    status = uv("run", "-m", "autoresearch.fleet", "status")
    assert status.returncode == 1
    assert status.stderr.startswith(f"error: nothing answers at RAY_ADDRESS=127.0.0.1:{port}")


def test_the_local_ray_of_the_fleet_starts_by_itself_stops_alone_and_comes_back(agent, short_tmp, tmp_path):
    """No RAY_ADDRESS: `fleet run` starts a local Ray of its own (AUTORESEARCH_FLEET_GPUS slots on a CPU); its
    processes killed outright mid-wave, `wait` ends in one line within seconds, the next `status` is one line and
    the next `run` starts a fresh one, which removes the killed run's tree; `fleet stop` stops it and no other Ray
    (the tests' cluster goes on)."""
    repo, sh = agent
    prefix = f"unset RAY_ADDRESS; TMPDIR={short_tmp} AUTORESEARCH_FLEET_GPUS=1 "
    local = lambda command: sh(prefix + command)  # noqa: E731
    edit_train(repo, "    while not run.done:\n", "    time.sleep(600)\n    while not run.done:\n", "stalls")
    started = local("uv run -m autoresearch.fleet run HEAD")
    assert started.returncode == 0, started.stderr
    env = {**os.environ, **TEST_ENV, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": repo}
    waiting = subprocess.Popen(["bash", "-c", prefix + "uv run -m autoresearch.fleet wait"], cwd=repo, env=env,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(5)  # (waiting, connected)
    fleet.stop_ray(os.path.join(short_tmp, f"autoresearch-ray-{os.getuid()}"), grace=0)  # killed: a stale address
    start = time.monotonic()
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 1 and time.monotonic() - start < 30
    assert err.strip().splitlines() == [f"error: the Ray cluster at {err.split()[5]} stopped answering (its head is "
                                        "gone): the runs on it are lost; start it again, then start them again"]
    status = local("uv run -m autoresearch.fleet status")
    assert status.returncode == 1 and status.stderr.startswith("error: no fleet Ray is running here")
    tree = lambda: [p for d in (tempfile.gettempdir(), short_tmp)  # noqa: E731  (where its actor made it)
                    for p in glob.glob(os.path.join(d, f"autoresearch-run-*-{started.stdout.split()[0]}-*"))]
    assert len(tree()) == 1  # (its actor was killed with the Ray: it could not remove its tree)
    again = local("uv run -m autoresearch.fleet run HEAD~1")
    assert again.returncode == 0, again.stderr
    assert " val_bpb " in local("uv run -m autoresearch.fleet wait").stdout
    assert tree() == []
    stopped = local("uv run -m autoresearch.fleet stop")
    assert stopped.returncode == 0 and "stopped the fleet's local Ray" in stopped.stdout
    assert ray.cluster_resources().get("GPU") == 2  # (the tests' own cluster answers still)
    status = local("uv run -m autoresearch.fleet status")
    assert status.returncode == 1 and status.stderr.startswith("error: no fleet Ray is running here")


def test_two_agents_on_one_cluster_see_and_record_only_their_own_runs(agent, tmp_path):
    repo_a, sh_a = agent
    repo_b = agent_repo(tmp_path / "b")
    sh_b = lambda command: shell(repo_b, tmp_path / "bin", command)  # noqa: E731
    run_a = sh_a("uv run -m autoresearch.fleet run HEAD").stdout.split()[0]
    nothing = sh_b("uv run -m autoresearch.fleet wait")
    assert nothing.returncode == 0 and "no run to wait for" in nothing.stdout
    assert run_a not in sh_b("uv run -m autoresearch.fleet status").stdout
    theirs = sh_b(f"uv run -m autoresearch.fleet wait {run_a}")
    assert theirs.returncode == 1 and f"run {run_a} belongs to another checkout" in theirs.stderr
    assert " val_bpb " in sh_a(f"uv run -m autoresearch.fleet wait {run_a}").stdout
    shutil.copytree(os.path.join(repo_a, "fleet"), os.path.join(repo_b, "fleet"))  # A's files, carried over
    refused = sh_b(f'uv run -m autoresearch.results record --run {run_a} keep "baseline"')
    assert refused.returncode == 1 and "belongs to another checkout" in refused.stderr
    assert not os.path.exists(os.path.join(repo_b, "results.tsv"))


def test_a_row_names_the_commit_git_knows_whatever_fleet_json_says(agent):
    repo, sh = agent
    base = git(repo, "rev-parse", "HEAD").strip()
    run_id = sh("uv run -m autoresearch.fleet run HEAD").stdout.split()[0]
    assert " val_bpb " in sh(f"uv run -m autoresearch.fleet wait {run_id}").stdout
    path = os.path.join(repo, "fleet", run_id, "fleet.json")
    meta = json.load(open(path))
    json.dump(dict(meta, short="\x1b[31mevil\tx\ny"), open(path, "w"))  # an escape code, a tab and a newline
    edit_train(repo, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ", "another commit")
    other = dict(meta, commit=git(repo, "rev-parse", "HEAD").strip())
    json.dump(other, open(path + ".other", "w"))
    os.replace(path, path + ".short")
    os.replace(path + ".other", path)  # first: filed under another commit, whose train.py did not run
    refused = sh(f'uv run -m autoresearch.results record --run {run_id} keep "baseline"')
    assert refused.returncode == 1 and "is not the one in" in refused.stderr
    os.replace(path + ".short", path)
    done = sh(f'uv run -m autoresearch.results record --run {run_id} keep "baseline"')
    assert done.returncode == 0, done.stderr
    row = results.read_rows(os.path.join(repo, "results.tsv"), [])[0]
    assert row["commit"] == base[:len(row["commit"])] and "\x1b" not in done.stdout + done.stderr


def test_a_run_that_never_ends_is_stopped_at_its_limit_or_cancelled(agent, monkeypatch):
    """A run that sleeps forever holds its GPU only until its time limit (here 3 s), or until `fleet cancel`: each
    a crash with its reason, and its slot is free again."""
    repo, sh = agent
    edit_train(repo, "    while not run.done:\n", "    time.sleep(600)\n    while not run.done:\n", "never ends")
    monkeypatch.chdir(repo)
    monkeypatch.setattr(fleet, "run_limit", lambda: 3.0)
    monkeypatch.setattr(fleet, "GRACE_SECONDS", 5.0)
    limited = fleet.start_runs(["HEAD"])[0][0]
    monkeypatch.setattr(fleet, "run_limit", lambda: None)
    cancelled = fleet.start_runs(["HEAD"])[0][0]
    deadline = time.time() + 60
    while book()[cancelled].get("state") != "running" and time.time() < deadline:
        time.sleep(0.2)
    said = sh(f"uv run -m autoresearch.fleet cancel {cancelled}")
    assert said.returncode == 0 and f"{cancelled} cancelled" in said.stdout
    waited = sh(f"uv run -m autoresearch.fleet wait {limited} {cancelled}")
    assert f"{limited} " in waited.stdout and "crash: stopped: past its time limit (3 s" in waited.stdout
    assert f"{cancelled} " in waited.stdout and "crash: stopped: cancelled (`fleet cancel`)" in waited.stdout
    for run_id in (limited, cancelled):
        done = sh(f'uv run -m autoresearch.results record --run {run_id} keep "never ends"')
        assert done.returncode == 0 and "recorded as a crash" in done.stdout, done.stderr
    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert "past its time limit" in rows[0]["description"] and "cancelled" in rows[1]["description"]
    deadline = time.time() + 30
    while ray.available_resources().get("GPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == 2


def test_a_commit_without_train_py_is_refused_in_one_line(agent):
    repo, sh = agent
    git(repo, "rm", "-q", "train.py")
    git(repo, "commit", "-qm", "no train.py")
    refused = sh("uv run -m autoresearch.fleet run HEAD")
    short = git(repo, "rev-parse", "--short", "HEAD").strip()
    assert refused.returncode == 1 and refused.stderr.strip() == (
        f"error: commit {short} has no train.py: nothing to run (commit the experiment's train.py)")


def test_ctrl_c_and_sigterm_end_a_command_in_one_line_and_the_runs_go_on(agent, tmp_path):
    repo, sh = agent
    edit_train(repo, "    while not run.done:\n", "    time.sleep(600)\n    while not run.done:\n", "never ends")
    run_id = sh("uv run -m autoresearch.fleet run HEAD").stdout.split()[0]
    env = {**os.environ, **TEST_ENV, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": repo}
    signals = ((signal.SIGINT, "error: interrupted (Ctrl-C): the runs go on in the cluster"),
               (signal.SIGTERM, "error: stopped by SIGTERM: the runs go on in the cluster"))
    waiting = [subprocess.Popen(["uv", "run", "-m", "autoresearch.fleet", "wait"], cwd=repo, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,  # (Ctrl-C reaches a terminal's
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # foreground)
               for _ in signals]
    time.sleep(4)  # (both waiting, connected to the cluster)
    for process, (sig, said) in zip(waiting, signals):
        process.send_signal(sig)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 1 and len(err.strip().splitlines()) == 1 and err.startswith(said), err
    assert book()[run_id]["state"] in ("queued", "running")
    assert sh(f"uv run -m autoresearch.fleet cancel {run_id}").returncode == 0
    assert "cancelled" in sh(f"uv run -m autoresearch.fleet wait {run_id}").stdout
