"""Several experiments at once, each on a GPU of its own: the runs of a wave, scheduled by Ray.

    uv sync --extra fleet                                        # once: installs Ray
    uv run -m autoresearch.fleet run <commit> [<commit> ...]     # one run per commit; prints run ids, returns
    uv run -m autoresearch.fleet status                          # each run: state, where, progress
    uv run -m autoresearch.fleet wait [<run id> ...]             # until they end: each one's val_bpb or error
    uv run -m autoresearch.results record --run <run id> keep|discard|crash "<what>"

On one machine a local Ray starts by itself with the machine's GPUs (AUTORESEARCH_FLEET_GPUS declares a number of
slots instead, e.g. on a CPU). Across machines, start a Ray cluster from the project's environment (`uv run ray
start --head` on one host, `uv run ray start --address=<head>:6379` on each GPU host) and set RAY_ADDRESS here.

Each run executes its commit's tree (`git archive`, shipped by Ray), never the working copy, with `train.py` run
by the Python its node's Ray runs (the project's environment), under this shell's AUTORESEARCH_* settings, on one
GPU (Ray sets CUDA_VISIBLE_DEVICES). A node reads its own data cache (AUTORESEARCH_CACHE_DIR, or the default one);
a node without one ends the run in one line that says so. The runs' state, and each run's tree until it starts,
live in a detached Ray actor on the head node (the book), so a run outlives the command that started it; `wait`
brings each ended run's log and record into fleet/<run id>/ here, for `record --run`.
A run whose process or node dies, or whose start an interrupted `fleet run` cut short, ends as a crash to record.
Standard library and Ray only; the one-GPU path never imports this module.
"""
import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

from autoresearch import record as run_record
from autoresearch.errors import UserError

NAMESPACE = "autoresearch"
BOOK = "autoresearch-fleet-book"  # the detached actor that holds every run's state
FOLDER = "fleet"  # fleet/<run id>/: run.log, run.json and fleet.json of each ended run, here
ENDED = ("finished", "failed", "lost")
POLL_SECONDS = 1.0  # how often a run's progress reaches the book
WAIT_POLL_SECONDS = 0.2  # how often `wait` asks the book (a few small calls)


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("the fleet needs Ray: `uv sync --extra fleet` (then run this again)") from None
    return ray


def declared_gpus():
    """The GPU slots a local Ray starts with: AUTORESEARCH_FLEET_GPUS, else the NVIDIA GPUs nvidia-smi lists."""
    raw = os.environ.get("AUTORESEARCH_FLEET_GPUS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise UserError(f"AUTORESEARCH_FLEET_GPUS={raw!r} is not allowed: it must be a whole number of GPU "
                            "slots, at least 1 (unset it to use the GPUs nvidia-smi lists)")
        return int(raw)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    gpus = len(re.findall(r"^GPU \d+", out, flags=re.M))
    if not gpus:
        raise UserError("no NVIDIA GPU here for a local Ray (nvidia-smi lists none): start a Ray cluster and set "
                        "RAY_ADDRESS, or declare slots with AUTORESEARCH_FLEET_GPUS")
    return gpus


def start_local(gpus, port=None, temp_dir=None):
    """Start a local Ray head with `gpus` GPU slots (the `ray` beside this Python); returns its address."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [ray_cli if os.path.exists(ray_cli) else "ray", "start", "--head", f"--num-gpus={gpus}",
               "--include-dashboard=false", "--disable-usage-stats"]
    command += [f"--port={port}"] if port else []
    command += [f"--temp-dir={temp_dir}"] if temp_dir else []
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot start a local Ray ({e}): start one with `uv run ray start --head`") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"cannot start a local Ray ({last[0][:200]}): start one with `uv run ray start --head`")
    return f"127.0.0.1:{port or 6379}"


def connect(start=False):
    """Connect to Ray: RAY_ADDRESS when set, else the local cluster, started (with start) when there is none."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS", "").strip()
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.exists(
        os.path.join(os.path.expanduser("~"), ".ray", "auth_token"))
    if token and not os.environ.get("RAY_AUTH_MODE"):  # (as `ray start` does: a token there means the cluster
        os.environ["RAY_AUTH_MODE"] = "token"         # uses it; Ray 2.60's client would connect without it)
    options = dict(namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    try:
        ray.init(address=address or "auto", **options)
    except ConnectionError as e:
        if address:
            raise UserError(f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({e}): start it, or unset "
                            "RAY_ADDRESS for a local one") from None
        if not start:
            raise UserError("no Ray is running here: start runs with `uv run -m autoresearch.fleet run <commit>`") \
                from None
        ray.init(address=start_local(declared_gpus()), **options)
    return ray


# ---------------------------------------------------------------------------------------------------------------
# In the cluster: the book of runs, and one actor per run


class Book:
    """Every run's state, by run id: commit, state (queued, running, finished, failed, lost), where it runs, its
    progress, and once it ended its log and record. One detached actor per cluster."""

    def __init__(self):
        self.runs, self.trees = {}, {}

    def add(self, run_id, info, tree=None):
        """A new run, with its tree (the commit's files) until its actor takes it: the book outlives the command
        that started the run, and so does what the run needs (an argument would die with that command)."""
        self.runs[run_id] = dict(info)
        if tree is not None:
            self.trees[run_id] = tree

    def take_tree(self, run_id):
        return self.trees.pop(run_id, None)

    def update(self, run_id, fields):
        self.runs.setdefault(run_id, {}).update(fields)

    def get(self, run_ids=None, files=False):
        """{run id: info}; the log and record (files) only when asked."""
        chosen = self.runs if run_ids is None else {i: self.runs[i] for i in run_ids if i in self.runs}
        return {i: (info if files else {k: v for k, v in info.items() if k not in ("log", "record")})
                for i, info in chosen.items()}


def _die_with_parent():
    """In the child, on Linux: SIGKILL it when the actor's process dies (a killed actor leaves no run behind)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def last_step(text):
    """The progress of the last step line in a log ("step 00041 (37.5%)"), or ""."""
    found = re.findall(r"^step (\d+) \(([\d.]+)%\)", text.replace("\r", "\n"), flags=re.M)
    return f"step {int(found[-1][0])} ({found[-1][1]}%)" if found else ""


def run_in_tree(ray, book, run_id, env):
    """In the run's actor: train.py from the commit's tree (tar bytes, from the book), its log and record sent to the
    book, then the actor ends (its GPU is free for the next run)."""
    context = ray.get_runtime_context()
    where = dict(node=context.get_node_id()[:12], host=os.uname().nodename, slot=",".join(
        str(g) for g in ray.get_gpu_ids()), started=time.time(), state="running")
    folder = tempfile.mkdtemp(prefix=f"autoresearch-{run_id}-")
    log_path = os.path.join(folder, "run.log")
    try:
        tree = ray.get(book.take_tree.remote(run_id))
        if tree is None:
            raise UserError(f"run {run_id} has no tree in the book (started twice?)")
        with tarfile.open(fileobj=io.BytesIO(tree)) as tar:
            try:
                tar.extractall(folder, filter="data")
            except TypeError:  # (Python before 3.10.12 has no filters; the archive is git's own)
                tar.extractall(folder)
        full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_")}, **env}
        from constants import DEFAULT_CACHE_DIR  # (here, on the node: its own home)
        cache = os.path.expanduser(full_env.get("AUTORESEARCH_CACHE_DIR") or DEFAULT_CACHE_DIR)
        if not os.path.exists(os.path.join(cache, "manifest.json")):
            raise UserError(f"node {where['host']} has no data cache at {cache}: run `uv run prepare.py` there, or "
                            "set AUTORESEARCH_CACHE_DIR to a cache every node reads")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "train.py"], cwd=folder, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        book.update.remote(run_id, dict(where, pid=proc.pid))
        while True:  # (the progress every POLL_SECONDS; the end at once)
            try:
                proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    book.update.remote(run_id, {"progress": last_step(f.read())})
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        data = run_record.read(os.path.join(folder, run_record.RECORD_NAME))
        state = "finished" if data and data["status"] == "finished" else "failed"
        result = dict(state=state, returncode=proc.returncode, log=text, record=data, progress=last_step(text),
                      ended=time.time(), val_bpb=data["val_bpb"] if state == "finished" else None)
    except BaseException as e:  # (whatever stopped it, the book learns that it ended, and why)
        reason = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        result = dict(where, state="failed", error=reason, log=f"error: {reason}\n", record=None, ended=time.time())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ray.get(book.update.remote(run_id, result))


class Runner:
    """One run, in an actor holding one GPU: starts at once in a thread (a run outlives the command that started
    it), and ends the actor when the run ends."""

    def __init__(self, run_id, env):
        import ray
        book = ray.get_actor(BOOK, namespace=NAMESPACE)

        def work():
            run_in_tree(ray, book, run_id, env)
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)  # (frees its GPU)

        threading.Thread(target=work, daemon=True).start()


def _book(ray):
    """The cluster's book, on its head node (a GPU host that goes takes no run's state with it)."""
    return ray.remote(num_cpus=0)(Book).options(name=BOOK, namespace=NAMESPACE, lifetime="detached",
                                                get_if_exists=True,
                                                resources={"node:__internal_head__": 0.001}).remote()


# ---------------------------------------------------------------------------------------------------------------
# Here: the commands


def resolve(commit):
    """(full hash, short hash) of a commit of the checkout here; one line when it is none."""
    full = run_record.git(".", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    short = run_record.git(".", "rev-parse", "--short", f"{commit}^{{commit}}")
    if not full or not short:
        raise UserError(f"{commit!r} is not a commit of this checkout: commit the experiment, then run it")
    return full, short


def tree_of(full):
    """The commit's files as a tar archive (git archive): what the run executes."""
    proc = subprocess.run(["git", "archive", "--format=tar", full], capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise UserError(f"git archive {full[:12]} failed: {proc.stderr.decode(errors='replace').strip()[:200]}")
    return proc.stdout


def start_runs(commits):
    """Start one run per commit, each waiting for a free GPU; returns [(run id, short commit)]."""
    resolved = [resolve(c) for c in commits]  # (every commit checked before any run starts)
    trees = {full: tree_of(full) for full, _ in resolved}  # (a commit run several times is archived once)
    ray = connect(start=True)
    book = _book(ray)
    env = {k: v for k, v in os.environ.items() if k.startswith("AUTORESEARCH_") and k != "AUTORESEARCH_FLEET_GPUS"}
    runner = ray.remote(num_gpus=1, num_cpus=0, max_restarts=0)(Runner)
    started = []
    for full, short in resolved:
        run_id = run_record.new_run_id()
        ray.get(book.add.remote(run_id, dict(commit=full, short=short, state="queued", submitted=time.time(),
                                             settings=" ".join(f"{k}={v}" for k, v in sorted(env.items()))),
                                trees[full]))
        runner.options(name=run_id, namespace=NAMESPACE, lifetime="detached").remote(run_id, env)
        started.append((run_id, short))
    return started


def check_alive(ray, book, runs):
    """Runs the book says are queued or running whose actor is gone (its process or node died, or `fleet run` was
    cut short before starting it) are marked lost: a crash to record."""
    for run_id, info in runs.items():
        if info.get("state") not in ("queued", "running"):
            continue
        try:
            ray.get_actor(run_id, namespace=NAMESPACE)
            continue
        except ValueError:
            pass
        latest = ray.get(book.get.remote([run_id]))[run_id]  # (it may have ended since)
        if latest.get("state") in ("queued", "running"):
            where = f" on {info['host']}" if info.get("host") else ""
            lost = dict(state="lost", error=f"its process or node died{where}", ended=time.time(), record=None,
                        log=f"error: run {run_id} was lost: its process or node died{where}\n")
            ray.get(book.update.remote(run_id, lost))
            info.update(lost)


def local_folder(run_id):
    """Where `wait` brings an ended run: fleet/<run id>/ here."""
    return os.path.join(FOLDER, run_id)


def brought(run_id):
    """What `wait` brought here of run `run_id` (its fleet.json: commit, host, slot, times); one line when it has
    not (yet)."""
    path = os.path.join(local_folder(run_id), "fleet.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        assert isinstance(meta, dict) and meta.get("commit") and meta.get("short")
    except (OSError, ValueError, AssertionError):
        raise UserError(f"run {run_id} is not here yet ({path}): `uv run -m autoresearch.fleet wait {run_id}` brings "
                        "it when it ends") from None
    return meta


def fetch(ray, book, run_id):
    """Write an ended run's log, record and fleet.json into fleet/<run id>/ here (each file atomically; once)."""
    folder = local_folder(run_id)
    if os.path.exists(os.path.join(folder, "fleet.json")):
        return
    info = ray.get(book.get.remote([run_id], files=True))[run_id]
    os.makedirs(folder, exist_ok=True)
    run_record.write_atomically(os.path.join(folder, "run.log"), (info.get("log") or "").encode("utf-8"))
    if info.get("record"):
        run_record.write_atomically(os.path.join(folder, run_record.RECORD_NAME),
                                    json.dumps(info["record"], indent=1).encode("utf-8"))
    meta = {k: v for k, v in info.items() if k not in ("log", "record")}
    run_record.write_atomically(os.path.join(folder, "fleet.json"), json.dumps(meta, indent=1).encode("utf-8"))


def outcome(run_id):
    """One line on an ended run, from its files here: val_bpb and GPU, or why it did not finish."""
    meta = brought(run_id)
    data = run_record.read(os.path.join(local_folder(run_id), run_record.RECORD_NAME))
    where = f"{meta.get('host', '?')} slot {meta.get('slot', '?')}"
    if data and data["status"] == "finished":
        return f"{run_id} {meta['short']} val_bpb {data['val_bpb']:.6f} ({run_record.gpu_of(data) or '?'}, {where})"
    why = (meta.get("error") or (data or {}).get("reason")
           or f"stopped before its summary (exit {meta.get('returncode')})")
    return f"{run_id} {meta['short']} crash: {why} ({where})"


def status_lines():
    ray = connect()
    book = _book(ray)
    runs = ray.get(book.get.remote())
    check_alive(ray, book, runs)
    lines = [f"{'run':<29} {'commit':<9} {'state':<9} {'where':<24} progress or result"]
    for run_id, info in sorted(runs.items(), key=lambda kv: kv[1].get("submitted", 0)):
        where = f"{info.get('host', '-')} slot {info['slot']}" if info.get("slot") is not None else "-"
        said = f"val_bpb {info['val_bpb']:.6f}" if info.get("val_bpb") else info.get("error") or info.get("progress")
        lines.append(f"{run_id:<29} {info.get('short', '?'):<9} {info.get('state', '?'):<9} {where:<24} {said or ''}")
    return lines


def wait(run_ids=None, timeout=None):
    """Block until the runs (all the book's not yet brought here, when none are named) end; bring each one's files
    here and print its outcome as it ends. Returns the outcome lines."""
    ray = connect()
    book = _book(ray)
    runs = ray.get(book.get.remote(run_ids))
    missing = sorted(set(run_ids or []) - set(runs))
    if missing:
        raise UserError(f"no run {', '.join(missing)} in this cluster's book: see `uv run -m autoresearch.fleet "
                        "status`")
    pending = [i for i in runs if run_ids or not os.path.exists(os.path.join(local_folder(i), "fleet.json"))]
    deadline = None if timeout is None else time.monotonic() + timeout
    lines, checked = [], 0.0
    if not pending:
        print("no run to wait for: every run in the book is here already (`fleet status` lists them)")
    while pending:
        runs = ray.get(book.get.remote(pending))
        if time.monotonic() - checked >= POLL_SECONDS:  # (a lookup per run: once a second, not every poll)
            check_alive(ray, book, runs)
            checked = time.monotonic()
        for run_id in [i for i in pending if runs[i].get("state") in ENDED]:
            fetch(ray, book, run_id)
            lines.append(outcome(run_id))
            print(lines[-1], flush=True)
            pending.remove(run_id)
        if pending and deadline is not None and time.monotonic() > deadline:
            raise UserError(f"{len(pending)} run(s) still going after {timeout:g}s: wait again")
        if pending:
            time.sleep(WAIT_POLL_SECONDS)
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(prog="uv run -m autoresearch.fleet",
                                 description="Run experiments at once, one per GPU, on a local Ray or a cluster.")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start one run per commit, each on a free GPU; prints the run ids")
    run.add_argument("commits", nargs="+")
    sub.add_parser("status", help="each run: state, where, progress")
    w = sub.add_parser("wait", help="until the runs end (default: every run not yet brought here)")
    w.add_argument("runs", nargs="*")
    w.add_argument("--timeout", type=float, default=None)
    args = ap.parse_args(argv)
    if args.command == "run":
        for run_id, short in start_runs(args.commits):
            print(f"{run_id} {short}", flush=True)
    elif args.command == "status":
        print("\n".join(status_lines()))
    else:
        wait(args.runs or None, args.timeout)


if __name__ == "__main__":
    main(sys.argv[1:])
