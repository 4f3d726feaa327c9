"""Kept results re-checked outside the agent's process: the best kept commits, run again from a clean tree.

    uv run -m autoresearch.results verify [N]      # the N best kept experiments of results.tsv (default 3)

Each one's train.py beside the baseline's fixed files, in a new folder and a fresh interpreter, under the settings
its record names; what it must match to reproduce: docs/RUN.md, 'The results log'. Logs land in runs/verify/.
"""
import glob
import os
import subprocess
import sys
import tempfile

from autoresearch import record as run_record
from autoresearch.errors import UserError

# The environment a re-run keeps: where the data is, the device and memory asked for. The metric's settings come
# from the record, never from this shell.
KEPT_SETTINGS = ("AUTORESEARCH_CACHE_DIR", "AUTORESEARCH_DEVICE", "AUTORESEARCH_GPU_MEMORY_GB", "AUTORESEARCH_FORCE")


def settings_env(settings, keep=()):
    """This shell's environment with a record's settings for its AUTORESEARCH_* (`keep` stay); None if bad."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTORESEARCH_") or k in keep}
    if settings != "standard":
        for item in str(settings).split():
            name, sep, value = item.partition("=")
            if not (sep and name.startswith("AUTORESEARCH_")):
                return None
            env[name] = value
    return env


def clean_tree(folder, commit, base):
    """folder gets train.py of `commit` and the fixed files of `base` (git archive: what the commits hold)."""
    for rev, paths in ((commit, ["train.py"]), (base, list(run_record.FIXED_FILES))):
        archive = run_record.git_archive(rev, *paths)
        if archive is None:
            raise UserError(f"git archive {rev} failed: run verify in the experiment's checkout")
        run_record.untar(archive, folder)


def rerun(commit, base, settings, log_path):
    """Run train.py of `commit` with base's fixed files in a fresh interpreter; returns its record (or None)."""
    env = settings_env(settings, keep=KEPT_SETTINGS)
    if env is None:
        raise UserError(f"the record's settings {settings!r} do not parse: cannot run them again")
    env.pop("PYTHONPATH", None)  # (the clean tree's own modules, not this checkout's)
    with tempfile.TemporaryDirectory(prefix="autoresearch-verify-") as folder:
        clean_tree(folder, commit, base)
        with open(log_path, "wb") as log:
            subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        return run_record.read(os.path.join(folder, run_record.RECORD_NAME))


def judge(exp, records, floor, data):
    """(reproduces, words) for a re-run's record `data` against an experiment and its runs' archived records."""
    if data is None or data.get("status") != "finished":
        why = (data or {}).get("reason") or "no record"
        return False, f"the re-run did not finish ({why})"
    value, steps = data["val_bpb"], data.get("steps")
    said = f"val_bpb {value:.6f}, {steps} steps"
    gpus = {run_record.gpu_of(r) for r in records} - {""}
    if gpus and run_record.gpu_of(data) not in gpus:
        return False, f"{said} on {run_record.gpu_of(data)}, recorded on {', '.join(sorted(gpus))}: not comparable"
    exact = all(r.get("budget_kind") == "flops" and (r.get("summary") or {}).get("device") == "cpu" for r in records)
    recorded_steps = sorted({r.get("steps") for r in records})
    if exact and records:
        ok = f"{value:.6f}" == f"{exp['value']:.6f}" and recorded_steps == [steps]
        return ok, f"{said}; recorded {exp['value']:.6f}, {'/'.join(map(str, recorded_steps))} steps (exact)"
    tolerance = 2 * (floor or 0.0)
    ok = floor is not None and abs(value - exp["value"]) <= tolerance
    return ok, f"{said}; recorded {exp['value']:.6f}, within {tolerance:.6f} (twice the noise floor) needed"


def verify(count=3, path="results.tsv"):
    """Run the `count` best kept experiments again; a line each; one `error:` line if any did not reproduce."""
    from autoresearch import results
    if count < 1:
        raise UserError(f"verify {count}: give a number of kept experiments, at least 1")
    if not os.path.exists(path):
        raise UserError(f"no {path} here: verify runs in the experiment's checkout, after `record`")
    runs_dir, chosen, lines, failed = results.runs_folder(path), [], [], 0
    for exps in results.load([glob.escape(path)])[1].values():  # (one group per GPU model)
        base = next((e for e in exps if e["finished"]), None)
        floor, _ = results.noise_floor(exps)
        for exp in (e for e in exps if e["finished"] and e["status"] == "keep"):
            mine = [r for r in exp["members"] if r["status"].lower() != "crash"]
            runs = [r["record"] for r in mine if r.get("record") and r["record"].get("status") == "finished"]
            unmatched = sum(1 for r in mine if r.get("differs") or not r.get("record"))
            chosen.append((exp["value"], exp, runs, base, floor, unmatched))
    chosen.sort(key=lambda c: c[0])
    if not chosen:
        raise UserError(f"no kept experiment in {path} to verify")
    os.makedirs(os.path.join(runs_dir, "verify"), exist_ok=True)
    for _, exp, runs, base, floor, unmatched in chosen[:count]:
        settings = runs[0]["settings"] if runs else "standard"
        log_path = os.path.join(runs_dir, "verify", f"{exp['commit']}-{run_record.new_run_id()}.log")
        print(f"#{exp['number']} {exp['commit']} {exp['description']}: running again ...", flush=True)
        data = rerun(exp["commit"], base["commit"], settings, log_path)
        ok, words = judge(exp, runs, floor, data)
        if unmatched:
            ok, words = False, (words + f"; {unmatched} of its rows differ from their runs in runs/ "
                                "(changed by hand?)")
        failed += not ok
        lines.append(results.printable(f"#{exp['number']} {exp['commit']} {exp['description']}: "
                                       f"{'reproduces' if ok else 'does NOT reproduce'}: {words}"))
        print(lines[-1], flush=True)
    if failed:
        raise UserError(f"{failed} of {len(lines)} kept result(s) did not reproduce (logs in {runs_dir}/verify): "
                        "read their diffs and logs before building on them")
    return lines
