"""Several experiments at once, each on a GPU of its own: the runs of a wave, scheduled by Ray.

    uv sync --extra fleet                                        # once: installs Ray
    uv run -m autoresearch.fleet run <commit> [<commit> ...]     # one run per commit; prints run ids, returns
    uv run -m autoresearch.fleet status                          # each run: state, where, progress
    uv run -m autoresearch.fleet wait [<run id> ...]             # until they end: each one's val_bpb or error
    uv run -m autoresearch.fleet cancel <run id> [<run id> ...]  # stop runs (each a crash to record)
    uv run -m autoresearch.fleet stop                            # stop the local Ray `run` started (only it)
    uv run -m autoresearch.results record --run <run id> keep|discard|crash "<what>"

On one machine a local Ray of the fleet's own starts by itself with the machine's GPUs (AUTORESEARCH_FLEET_GPUS
declares a number of slots instead, e.g. on a CPU), in a folder of its own, so that `stop` stops it and nothing
else. Across machines, start a Ray cluster from the project's environment (`uv run ray start --head` on one host,
`uv run ray start --address=<head>:6379` on each GPU host) and set RAY_ADDRESS here.

Each run executes its commit's tree (`git archive`, shipped by Ray), never the working copy, with `train.py` run
by the Python its node's Ray runs (the project's environment), under this shell's AUTORESEARCH_* settings, on one
GPU (Ray sets CUDA_VISIBLE_DEVICES), in the node's temporary folder (a tree whose actor died with it is removed by
the next run there). A node reads its own data cache (AUTORESEARCH_CACHE_DIR, or the default one);
a node without one ends the run in one line that says so. The runs' state, and each run's tree until it starts,
live in a detached Ray actor on the head node (the book), so a run outlives the command that started it; `wait`
brings each ended run's log and record into fleet/<run id>/ here, for `record --run`.
A run whose process or node dies, or whose start an interrupted `fleet run` cut short, ends as a crash to record;
so does one cancelled, one past its time limit (a time-budget run: its budget plus 5 minutes) and one whose log
stops moving for STALL_SECONDS (a hang). Each run belongs to the checkout that started it: `status`, `wait` and
`record --run` see only this checkout's runs, so several agents can share a cluster. A cluster that stops answering,
Ctrl-C and SIGTERM end a command in one line; the runs go on.
Standard library and Ray only; the one-GPU path never imports this module.
"""
import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
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
ANSWER_SECONDS = 10.0  # a cluster that answers no call for this long is checked: gone, it is one `error:` line
# A run whose log has not grown for this long is killed as a hang. The fixed code in train.py stops a run whose steps
# stop ending after 10 minutes by itself; this catches what it cannot (a process stuck outside Python).
STALL_SECONDS = 900.0
GRACE_SECONDS = 30.0  # after SIGTERM, the time a stopped run gets to write its record before SIGKILL


def _ray():
    # Ray's uv integration (on by default since Ray 2.44) would start each worker of a driver launched by `uv run`
    # as `uv run` in a copy of the working folder: a fresh environment without Ray, built per run, from the network.
    # A run here uses the node's project environment, as it is.
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    try:
        import ray
    except ImportError:
        raise UserError("the fleet needs Ray: `uv sync --extra fleet` (then run this again)") from None
    return ray


def local_dir():
    """The folder of the fleet's own local Ray (Ray's --temp-dir), one per user: `stop` stops what runs from it."""
    return os.path.join(tempfile.gettempdir(), f"autoresearch-ray-{os.getuid()}")


def _address_file():
    return os.path.join(local_dir(), "fleet-address")


def reachable(address, seconds=2.0):
    """True when something answers at address (host:port): a cluster's head, alive."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=seconds):
            return True
    except (OSError, ValueError):
        return False


def origin():
    """The checkout that starts runs (host and folder): each run belongs to the checkout that started it."""
    top = run_record.git(".", "rev-parse", "--show-toplevel") or os.getcwd()
    return f"{socket.gethostname()}:{os.path.realpath(top)}"


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(gpus):
    """Start the fleet's local Ray head with `gpus` GPU slots (the `ray` beside this Python) in local_dir(), on a
    free port; returns its address, also kept in local_dir() for the next command."""
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    os.makedirs(local_dir(), exist_ok=True)
    command = [ray_cli if os.path.exists(ray_cli) else "ray", "start", "--head", f"--num-gpus={gpus}",
               f"--port={port}", f"--temp-dir={local_dir()}", "--include-dashboard=false", "--disable-usage-stats"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        raise UserError(f"cannot start a local Ray ({e}): start one with `uv run ray start --head`") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"cannot start a local Ray ({last[0][:200]}): start one with `uv run ray start --head`")
    address = f"127.0.0.1:{port}"
    run_record.write_atomically(_address_file(), address.encode())
    return address


def local_address():
    """The address of the fleet's local Ray while it answers, else None (none started, or its processes gone)."""
    try:
        with open(_address_file(), encoding="utf-8") as f:
            address = f.read().strip()
    except OSError:
        return None
    return address if reachable(address) else None


def connect(start=False):
    """Connect to Ray: RAY_ADDRESS when set (it must answer), else the fleet's local Ray, started (with start) when
    there is none or the last one is gone."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and ":" in address and "://" not in address and not reachable(address):
        raise UserError(f"nothing answers at RAY_ADDRESS={address}: start the cluster's head there (`uv run ray "
                        "start --head`), or unset RAY_ADDRESS for a local Ray")
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.exists(
        os.path.join(os.path.expanduser("~"), ".ray", "auth_token"))
    if token and not os.environ.get("RAY_AUTH_MODE"):  # (as `ray start` does: a token there means the cluster
        os.environ["RAY_AUTH_MODE"] = "token"         # uses it; Ray 2.60's client would connect without it)
    options = dict(namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    if not address:
        address = local_address()
        if address is None and not start:
            raise UserError("no fleet Ray is running here: `uv run -m autoresearch.fleet run <commit>` starts one (or "
                            "set RAY_ADDRESS to a cluster's head)")
        address = address or start_local(declared_gpus())
    try:
        ray.init(address=address, **options)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e}): start it, or unset RAY_ADDRESS for a "
                        "local one") from None
    if _in_command:
        _handle_sigterm()
        threading.Thread(target=_watch_head, args=(_cluster_address(ray),), daemon=True).start()
    return ray


def _watch_head(address):
    """In a command: a head that stops answering ends it in one line within seconds (Ray's driver would retry for a
    minute, print its own errors, and end the process anyway)."""
    missed = 0
    while True:
        time.sleep(1.0)
        missed = 0 if reachable(address, seconds=1.0) else missed + 1
        if missed >= 3:
            print(f"error: the Ray cluster at {address} stopped answering (its head is gone): the runs on it are "
                  "lost; start it again, then start them again", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)


def _cluster_address(ray):
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # (an older Ray)
        return os.environ.get("RAY_ADDRESS", "")


def ask(ray, ref, what="the book"):
    """ray.get(ref), but a cluster that does not answer within ANSWER_SECONDS and whose head is gone is one line."""
    while True:
        try:
            return ray.get(ref, timeout=ANSWER_SECONDS)
        except ray.exceptions.GetTimeoutError:
            pass
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError, ConnectionError) as e:
            if reachable(_cluster_address(ray)):
                raise UserError(f"{what} on the Ray cluster is gone ({type(e).__name__}): start the runs again") \
                    from None
        address = _cluster_address(ray)
        if not reachable(address):
            raise UserError(f"the Ray cluster at {address} stopped answering (its head is gone): the runs on it are "
                            "lost; start it again, then start them again") from None


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

    def cancel(self, run_id):
        """Ask a run to stop; True where it was still queued or running."""
        info = self.runs.get(run_id, {})
        if info.get("state") not in ("queued", "running"):
            return False
        info["cancel"] = True
        return True

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


def stop_process(proc):
    """SIGTERM (the run writes its failed record), then SIGKILL after GRACE_SECONDS."""
    proc.terminate()
    try:
        proc.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_in_tree(ray, book, run_id, env, limit=None):
    """In the run's actor: train.py from the commit's tree (tar bytes, from the book), its log and record sent to the
    book, then the actor ends (its GPU is free for the next run). The run is stopped when cancelled, past `limit`
    seconds, or when its log stops growing for STALL_SECONDS."""
    context = ray.get_runtime_context()
    where = dict(node=context.get_node_id()[:12], host=os.uname().nodename, slot=",".join(
        str(g) for g in ray.get_gpu_ids()), started=time.time(), state="running")
    sweep_trees()
    folder = tempfile.mkdtemp(prefix=f"autoresearch-run-{os.getpid()}-{run_id}-")  # (named by its actor's pid)
    log_path = os.path.join(folder, "run.log")
    try:
        tree = ray.get(book.take_tree.remote(run_id))
        if tree is None:
            raise UserError(f"run {run_id} has no tree in the book (started twice?)")
        run_record.untar(tree, folder)
        # The agent's settings; and the threads a direct run would use: Ray sets OMP_NUM_THREADS to the actor's
        # CPUs (none), which changes a CPU run's numbers, so it stays only where the agent set it.
        full_env = {**{k: v for k, v in os.environ.items()
                       if not k.startswith("AUTORESEARCH_") and k != "OMP_NUM_THREADS"}, **env}
        from constants import DEFAULT_CACHE_DIR  # (here, on the node: its own home)
        cache = os.path.expanduser(full_env.get("AUTORESEARCH_CACHE_DIR") or DEFAULT_CACHE_DIR)
        if not os.path.exists(os.path.join(cache, "current")):
            raise UserError(f"node {where['host']} has no data cache at {cache}: run `uv run prepare.py` there, or "
                            "set AUTORESEARCH_CACHE_DIR to a cache every node reads")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "train.py"], cwd=folder, env=full_env, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        book.update.remote(run_id, dict(where, pid=proc.pid))
        started, size, moved, stopped = time.monotonic(), 0, time.monotonic(), None
        while True:  # (the progress every POLL_SECONDS; the end at once)
            try:
                proc.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            with open(log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            book.update.remote(run_id, {"progress": last_step(text)})
            if len(text) != size:
                size, moved = len(text), time.monotonic()
            if ray.get(book.get.remote([run_id]))[run_id].get("cancel"):
                stopped = "cancelled (`fleet cancel`)"
            elif limit is not None and time.monotonic() - started > limit:
                stopped = f"past its time limit ({limit:g} s: the time budget plus 5 minutes)"
            elif time.monotonic() - moved > STALL_SECONDS:
                stopped = f"its log did not move for {STALL_SECONDS:g} s: a hang"
            if stopped:
                stop_process(proc)
                break
        with open(log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        data = run_record.read(os.path.join(folder, run_record.RECORD_NAME))
        state = "finished" if data and data["status"] == "finished" and not stopped else "failed"
        result = dict(state=state, returncode=proc.returncode, log=text, record=data, progress=last_step(text),
                      ended=time.time(), val_bpb=data["val_bpb"] if state == "finished" else None)
        if stopped:  # (said in the log too: its last line is the reason a row gives)
            result["error"] = f"stopped: {stopped}"
            result["log"] = text + ("" if text.endswith("\n") or not text else "\n") + f"error: stopped: {stopped}\n"
    except BaseException as e:  # (whatever stopped it, the book learns that it ended, and why)
        reason = e.message if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        result = dict(where, state="failed", error=reason, log=f"error: {reason}\n", record=None, ended=time.time())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ray.get(book.update.remote(run_id, result))


def sweep_trees():
    """Remove the run trees in this node's temporary folder whose actor died without removing its own (its node
    lost, its Ray stopped mid-run): each tree's name holds its actor's pid."""
    for name in os.listdir(tempfile.gettempdir()):
        pid = re.fullmatch(r"autoresearch-run-(\d+)-.*", name)
        if pid and not run_record.pid_alive(pid.group(1)):
            shutil.rmtree(os.path.join(tempfile.gettempdir(), name), ignore_errors=True)


class Runner:
    """One run, in an actor holding one GPU: starts at once in a thread (a run outlives the command that started
    it), and ends the actor when the run ends."""

    def __init__(self, run_id, env, limit=None):
        import ray
        book = ray.get_actor(BOOK, namespace=NAMESPACE)

        def work():
            run_in_tree(ray, book, run_id, env, limit)
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
    tree = run_record.git_archive(full)
    if tree is None:
        raise UserError(f"git archive {full[:12]} failed: run this in the experiment's checkout")
    return tree


def run_limit():
    """The seconds a run may take, by this shell's settings: a time-budget run its budget plus 5 minutes (start-up,
    evaluation: the 10 minutes program.md gives the standard one); a compute-budget run has none (a busy machine is
    slow, not wrong), only the hang rule."""
    import constants
    return constants.TIME_BUDGET + 300 if constants.BUDGET == "time" else None


def start_runs(commits):
    """Start one run per commit, each waiting for a free GPU; returns [(run id, short commit)]."""
    resolved = [resolve(c) for c in commits]  # (every commit checked before any run starts)
    for full, short in resolved:
        if run_record.git(".", "cat-file", "-e", f"{full}:train.py") is None:
            raise UserError(f"commit {short} has no train.py: nothing to run (commit the experiment's train.py)")
    trees = {full: tree_of(full) for full, _ in resolved}  # (a commit run several times is archived once)
    limit = run_limit()
    ray = connect(start=True)
    if ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError(f"the Ray cluster at {_cluster_address(ray)} has no GPU slots, so no run could start: start "
                        "its GPU hosts with `ray start ... --num-gpus=N` (on a CPU, N slots of its own)")
    book = _book(ray)
    env = {k: v for k, v in os.environ.items() if k.startswith("AUTORESEARCH_") and k != "AUTORESEARCH_FLEET_GPUS"}
    if os.environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    runner = ray.remote(num_gpus=1, num_cpus=0, max_restarts=0)(Runner)
    started, mine = [], origin()
    for full, short in resolved:
        run_id = run_record.new_run_id()
        ask(ray, book.add.remote(run_id, dict(commit=full, short=short, state="queued", submitted=time.time(),
                                              origin=mine,
                                              settings=" ".join(f"{k}={v}" for k, v in sorted(env.items()))),
                                 trees[full]))
        runner.options(name=run_id, namespace=NAMESPACE, lifetime="detached").remote(run_id, env, limit)
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
        latest = ask(ray, book.get.remote([run_id]))[run_id]  # (it may have ended since)
        if latest.get("state") in ("queued", "running"):
            where = f" on {info['host']}" if info.get("host") else ""
            died = "cancelled before it started" if latest.get("cancel") else f"its process or node died{where}"
            lost = dict(state="lost", error=died, ended=time.time(), record=None,
                        log=f"error: run {run_id} was lost: {died}\n")
            ask(ray, book.update.remote(run_id, lost))
            info.update(lost)


def local_folder(run_id):
    """Where `wait` brings an ended run: fleet/<run id>/ here."""
    return os.path.join(FOLDER, run_id)


def brought(run_id):
    """What `wait` brought here of run `run_id` (its fleet.json: commit, host, slot, times); one line when it has
    not (yet), or when it is not this checkout's. The commit must be one of this checkout's, and its short name is
    git's, never the file's (a file edited by hand names no other commit, and no text of its own)."""
    path = os.path.join(local_folder(run_id), "fleet.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        assert isinstance(meta, dict) and isinstance(meta.get("commit"), str)
    except (OSError, ValueError, AssertionError):
        raise UserError(f"run {run_id} is not here yet ({path}): `uv run -m autoresearch.fleet wait {run_id}` brings "
                        "it when it ends") from None
    if meta.get("origin") not in (None, origin()):
        raise UserError(f"run {run_id} belongs to another checkout ({meta['origin']!r}): record it there")
    if not re.fullmatch(r"[0-9a-f]{40}", meta["commit"]):
        raise UserError(f"{path} names no commit ({meta['commit']!r}): not recorded")
    meta["commit"], meta["short"] = resolve(meta["commit"])
    return meta


def fetch(ray, book, run_id):
    """Write an ended run's log, record and fleet.json into fleet/<run id>/ here (each file atomically; once)."""
    folder = local_folder(run_id)
    if os.path.exists(os.path.join(folder, "fleet.json")):
        return
    info = ask(ray, book.get.remote([run_id], files=True))[run_id]
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
    if meta.get("state") == "finished" and data and data["status"] == "finished":
        line = f"{run_id} {meta['short']} val_bpb {data['val_bpb']:.6f} ({run_record.gpu_of(data) or '?'}, {where})"
    else:
        why = (meta.get("error") or (data or {}).get("reason")
               or f"stopped before its summary (exit {meta.get('returncode')})")
        line = f"{run_id} {meta['short']} crash: {why} ({where})"
    return run_record.printable(line)


def my_runs(ray, book, run_ids=None):
    """{run id: info} of this checkout's runs in the book (those named, when run_ids); a named run that is not in
    the book, or is another checkout's, is one line."""
    runs = ask(ray, book.get.remote(run_ids))
    missing = sorted(set(run_ids or []) - set(runs))
    if missing:
        raise UserError(f"no run {', '.join(missing)} in this cluster's book: see `uv run -m autoresearch.fleet "
                        "status`")
    mine = origin()
    theirs = sorted(i for i, info in runs.items() if info.get("origin") != mine)
    if run_ids and theirs:
        raise UserError(f"run {theirs[0]} belongs to another checkout ({runs[theirs[0]].get('origin')}): follow it "
                        "there")
    return {i: info for i, info in runs.items() if i not in theirs}


def status_lines():
    ray = connect()
    book = _book(ray)
    runs = my_runs(ray, book)
    check_alive(ray, book, runs)
    lines = [f"{'run':<29} {'commit':<9} {'state':<9} {'where':<24} progress or result"]
    for run_id, info in sorted(runs.items(), key=lambda kv: kv[1].get("submitted", 0)):
        where = f"{info.get('host', '-')} slot {info['slot']}" if info.get("slot") is not None else "-"
        said = f"val_bpb {info['val_bpb']:.6f}" if info.get("val_bpb") else info.get("error") or info.get("progress")
        line = f"{run_id:<29} {info.get('short', '?'):<9} {info.get('state', '?'):<9} {where:<24} {said or ''}"
        lines.append(run_record.printable(line))
    return lines


def cancel(run_ids):
    """Stop this checkout's runs: a running one gets SIGTERM (its record says so), a queued one never starts. Each
    ends as a crash to record; returns the lines said."""
    ray = connect()
    book = _book(ray)
    runs = my_runs(ray, book, run_ids)
    lines = []
    for run_id in run_ids:
        if not ask(ray, book.cancel.remote(run_id)):
            lines.append(f"{run_id} has ended already ({runs[run_id].get('state')})")
            continue
        if runs[run_id].get("state") == "queued":  # (its actor waits for a GPU: it goes, and never starts)
            try:
                ray.kill(ray.get_actor(run_id, namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
        lines.append(f"{run_id} cancelled: `fleet wait` brings it, a crash to record")
    return lines


def stop_local():
    """Stop the fleet's local Ray: no other Ray on this machine. Returns the number of processes stopped."""
    n = stop_ray(local_dir())
    with contextlib.suppress(OSError):
        os.remove(_address_file())
    return n


STOP_GRACE = 1.0  # seconds the processes of a Ray being stopped get to end on SIGTERM (the comment in stop_ray)


def stop_ray(folder, grace=STOP_GRACE):
    """Stop the Ray whose --temp-dir is folder: its processes (their command lines name it) and every process under
    them (workers, runs); grace=0 kills them outright. Returns the number of processes stopped."""
    parents, roots = {}, set()
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                parents[pid] = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if folder in cmdline and pid != os.getpid():
            roots.add(pid)
    ours, grew = set(roots), True
    while grew:  # (the workers under the raylet, and the runs under them)
        more = {p for p, parent in parents.items() if parent in ours} - ours
        ours |= more
        grew = bool(more)
    # SIGTERM, then SIGKILL for what is left after `grace` s: the workers and raylets end within a second, but
    # Ray's GCS server outlives a SIGTERM by more than 10 s (measured on a 2-core VM, ray 2.60).
    for sig, seconds in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        for pid in ours:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + seconds
        while any(_alive(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.2)
    return len(ours)


def _alive(pid):
    """True while the process runs: a zombie (ended, not yet reaped by a parent such as `ray start`'s) has ended."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def wait(run_ids=None, timeout=None):
    """Block until the runs (all the book's not yet brought here, when none are named) end; bring each one's files
    here and print its outcome as it ends. Returns the outcome lines."""
    ray = connect()
    book = _book(ray)
    runs = my_runs(ray, book, run_ids)
    pending = [i for i in runs if run_ids or not os.path.exists(os.path.join(local_folder(i), "fleet.json"))]
    deadline = None if timeout is None else time.monotonic() + timeout
    lines, checked = [], 0.0
    if not pending:
        print("no run to wait for: every run in the book is here already (`fleet status` lists them)")
    while pending:
        runs = ask(ray, book.get.remote(pending))
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
    c = sub.add_parser("cancel", help="stop runs: each ends as a crash to record")
    c.add_argument("runs", nargs="+")
    sub.add_parser("stop", help="stop the local Ray that `run` started (no other Ray)")
    args = ap.parse_args(argv)
    global _in_command
    _in_command = True
    _handle_sigterm()
    try:
        if args.command == "run":
            for run_id, short in start_runs(args.commits):
                print(f"{run_id} {short}", flush=True)
        elif args.command == "status":
            print("\n".join(status_lines()))
        elif args.command == "cancel":
            print("\n".join(cancel(args.runs)))
        elif args.command == "stop":
            n = stop_local()
            print(f"stopped the fleet's local Ray ({n} processes)" if n else "no local Ray of the fleet was running")
        else:
            wait(args.runs or None, args.timeout)
    except KeyboardInterrupt:
        _leave("interrupted (Ctrl-C): the runs go on in the cluster; `uv run -m autoresearch.fleet wait` follows "
               "them")
    except UserError as e:
        _leave(e.message)


_in_command = False  # True in a command run by main(): SIGTERM is then one line
STOPPED = "stopped by SIGTERM: the runs go on in the cluster; `uv run -m autoresearch.fleet wait` follows them"


def _sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise UserError(STOPPED)


def _handle_sigterm():
    """SIGTERM ends a command in one line (Ray's driver would print a C++ stack dump): set before Ray starts, and
    again after it connects (it installs its own)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


def _leave(message):
    """End the command in one `error:` line. Connected to Ray, without Ray's exit hooks: they would wait on a
    cluster that may be gone and print their own tracebacks; the runs live in the cluster, not here."""
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    raise UserError(message) from None


if __name__ == "__main__":
    main(sys.argv[1:])
