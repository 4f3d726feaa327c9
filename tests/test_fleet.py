"""autoresearch.fleet on a local Ray with two declared GPU slots, running tiny CPU runs of an agent's commits:
program.md's wave commands as written, two runs at once and the others waiting for a slot, each run its commit's
tree whatever the working copy holds, a killed run and a lost one recorded as crashes. Skipped without Ray
(`uv sync --extra fleet`)."""
import json
import os
import re
import signal
import subprocess
import sys
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


def test_a_wave_of_four_on_two_slots_runs_each_commit_once_two_at_a_time(agent):
    repo, sh = agent
    run, wait, record = wave_commands()
    base = git(repo, "rev-parse", "--short", "HEAD").strip()
    edit_train(repo, "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 ", "matrix lr 0.05")
    change = git(repo, "rev-parse", "--short", "HEAD").strip()
    started = sh(run.replace("<commit> [<commit> ...]", f"{base} {base} {change} {change}"))
    assert started.returncode == 0, started.stderr
    ids = [line.split()[0] for line in started.stdout.splitlines()]
    assert [line.split()[1] for line in started.stdout.splitlines()] == [base, base, change, change]
    edit_train(repo, "DEPTH = 2 if SMALL", "DEPTH = 0 if SMALL")  # the working copy moves on (a typo): no run sees it
    status = sh("uv run -m autoresearch.fleet status")
    assert status.returncode == 0 and all(i in status.stdout for i in ids)
    waited = sh(wait)
    assert waited.returncode == 0, waited.stderr
    assert sorted(line.split()[0] for line in waited.stdout.splitlines()) == sorted(ids)
    assert waited.stdout.count(" val_bpb ") == 4 and "crash" not in waited.stdout
    metas = [json.load(open(os.path.join(repo, "fleet", i, "fleet.json"))) for i in ids]
    for m in metas:  # never more than two at once, and two at once on different GPU hosts
        overlapping = [o for o in metas if o["started"] < m["ended"] and m["started"] < o["ended"]]
        assert len(overlapping) <= 2 and len({o["node"] for o in overlapping}) == len(overlapping)
    assert sum(m["started"] < metas[0]["ended"] for m in metas) == 2  # two ran at once; the others waited
    status = sh("uv run -m autoresearch.fleet status").stdout
    assert all(re.search(rf"^{i} .* finished .* val_bpb \d\.\d{{6}}$", status, flags=re.M) for i in ids), status
    git(repo, "checkout", "-q", "train.py")
    described = ["baseline", "baseline", "matrix lr 0.05", "matrix lr 0.05"]
    for run_id, what in zip(ids, described):
        done = sh(record.replace("<run id>", run_id).replace("<what you tried>", what))
        assert done.returncode == 0, done.stderr
    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert [(r["commit"], r["status"], r["description"], r["gpu"]) for r in rows] == [
        (base, "keep", "baseline", "cpu"), (base, "keep", "baseline (rerun)", "cpu"),
        (change, "keep", "matrix lr 0.05", "cpu"), (change, "keep", "matrix lr 0.05 (rerun)", "cpu")]
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
    time.sleep(2)  # (train.py has started its record)
    os.kill(book()[killed]["pid"], signal.SIGKILL)  # train.py killed outright (the OOM killer)
    host = next(n for n in cluster.worker_nodes if n.node_id.startswith(book()[lost]["node"]))
    cluster.remove_node(host)  # a GPU host disappears, its run with it
    cut = "20261203-000000-0123456789ab"  # `fleet run` interrupted between its book entry and its actor
    ray.get(ray.get_actor(fleet.BOOK, namespace=fleet.NAMESPACE).add.remote(cut, dict(
        commit=git(repo, "rev-parse", "HEAD").strip(), short="cut", state="queued", submitted=time.time())))
    waited = sh(f"uv run -m autoresearch.fleet wait {killed} {lost} {cut}")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.count("crash:") == 3 and waited.stdout.count("its process or node died") == 2
    for run_id in (killed, lost):
        done = sh(f'uv run -m autoresearch.results record --run {run_id} keep "slow start"')
        assert done.returncode == 0 and "recorded as a crash" in done.stdout, done.stderr
    rows = results.read_rows(os.path.join(repo, "results.tsv"), [])
    assert [r["status"] for r in rows] == ["crash", "crash"]
    assert "killed before its summary" in rows[0]["description"] and "was lost" in rows[1]["description"]
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


def test_without_ray_installed_the_fleet_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # (what `import ray` meets where the extra is not installed)
    with pytest.raises(SystemExit, match=r"the fleet needs Ray: `uv sync --extra fleet`"):
        fleet.connect()
