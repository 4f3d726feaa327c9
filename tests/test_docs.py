"""analysis.ipynb runs headless on the results files an agent leaves; README and program.md name real files."""
import copy
import os
import re

import numpy as np

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, git


def program_header():
    text = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("commit\t")]
    assert len(lines) == 1, "program.md gives the results.tsv header exactly once"
    return lines[0]


def write_results(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(program_header() + "\n" + "".join("\t".join(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def notebook_kernel():
    """One Jupyter kernel for every notebook test (starting one costs seconds): yields run(folder, rows, others),
    which makes folder/repo a git repository, writes `rows` as folder/repo/results.tsv and `others` ({path
    relative to folder: rows}), runs every cell of analysis.ipynb from folder/repo and returns the printed output."""
    nb = nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    nb.cells = [nbformat.v4.new_code_cell() for _ in range(len(code) + 1)]  # (the client stores each cell run)
    client = NotebookClient(nb, timeout=120, kernel_name="python3")

    def run(folder, rows, others=None):
        repo = os.path.join(folder, "repo")
        os.makedirs(repo, exist_ok=True)
        git(repo, "init", "-q")
        git(repo, "commit", "-q", "--allow-empty", "-m", "baseline")
        write_results(os.path.join(repo, "results.tsv"), rows)
        for rel, other_rows in (others or {}).items():
            write_results(os.path.join(folder, rel), other_rows)
        cells = [nbformat.v4.new_code_cell(f"import os, sys; os.chdir({repo!r}); sys.path.insert(0, {ROOT!r})")]
        cells += [copy.deepcopy(c) for c in code]
        out = ""
        for i, cell in enumerate(cells):
            client.execute_cell(cell, i)
            out += "".join(o.get("text", "") for o in cell.get("outputs", []))
        return out

    with client.setup_kernel():
        yield run


@pytest.fixture
def run_notebook(notebook_kernel, tmp_path):
    return lambda rows, others=None: notebook_kernel(str(tmp_path), rows, others)


def test_header_is_the_references_five_columns_and_the_gpu():
    assert program_header().split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description", "gpu"]


def test_notebook_on_a_normal_night(run_notebook, tmp_path):
    out = run_notebook([
        ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
        ("b2c3d4e", "0.998100", "44.0", "discard", "baseline again (noise)"),
        ("c3d4e5f", "0.990000", "44.2", "keep", "halve TOTAL_BATCH_SIZE"),
        ("d4e5f6a", "0.000000", "0.0", "crash", "depth 16 (OOM)"),
        ("e5f6a7b", "0.993000", "44.1", "discard", "GELU"),
        ("f6a7b8c", "0.985000", "47.0", "keep", "depth 9 — 深さ 9 🚀"),
    ])
    assert "6 experiments: 3 keep, 2 discard, 1 crash" in out
    assert "keep rate: 60.0%" in out
    assert "baseline: 0.997900" in out and "best:     0.985000" in out
    assert "total improvement: 0.012900" in out
    ranked = out.split("ranked by gain")[1]
    assert ranked.index("halve TOTAL_BATCH_SIZE") < ranked.index("深さ 9 🚀")  # 0.0079 before 0.0050
    assert (tmp_path / "repo" / "progress.png").stat().st_size > 10_000
    assert "noise floor: not set: one baseline run so far" in out  # (the second row is another commit)


def test_notebook_with_crashes_only(run_notebook, tmp_path):
    out = run_notebook([("a1b2c3d", "0.000000", "0.0", "crash", "typo"),
                        ("b2c3d4e", "0.000000", "0.0", "crash", "OOM")])
    assert "2 experiments: 0 keep, 0 discard, 2 crash" in out and "No kept result yet" in out
    assert (tmp_path / "repo" / "progress.png").exists()


def test_notebook_with_only_the_baseline(run_notebook):
    out = run_notebook([("a1b2c3d", "0.997900", "44.0", "keep", "baseline")])
    assert "baseline: 0.997900" in out and "total improvement: 0.000000" in out
    assert "only the baseline so far" in out


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("doc", ["README.md", "program.md"])
def test_every_uv_run_names_a_real_file(doc):
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    files = re.findall(r"uv run ([\w./-]+\.py)", text)
    modules = re.findall(r"uv run -m ([\w.]+)", text)
    assert files and modules, f"{doc} names no `uv run <file>` or `uv run -m <module>` command"
    for name in files:
        assert os.path.isfile(os.path.join(ROOT, name)), f"{doc} names {name}, which does not exist"
    for name in modules:
        assert os.path.isfile(os.path.join(ROOT, *name.split(".")) + ".py"), f"{doc} names module {name}, not here"


def test_the_top_level_is_the_design_cards():
    """The files the design card lists, the harness in one package, docs/ and tests/: nothing else tracked."""
    top = {path.split("/")[0] for path in git(ROOT, "ls-files").split() if not path.startswith(".")}
    card = {"LICENSE", "README.md", "analysis.ipynb", "constants.py", "prepare.py", "program.md", "pyproject.toml",
            "train.py", "uv.lock"}
    assert top == card | {"autoresearch", "docs", "tests"}


def test_notebook_overlays_several_agents(run_notebook, tmp_path):
    from PIL import Image
    out = run_notebook([
        ("a1b2c3d", "0.997900", "44.0", "keep", "baseline"),
        ("a1b2c3d", "0.995900", "44.0", "keep", "baseline (rerun)"),
        ("c3d4e5f", "0.990000", "44.2", "keep", "halve TOTAL_BATCH_SIZE"),
    ], others={
        "repo/results/host3.tsv": [("b1", "0.000000", "0.0", "crash", "OOM"),
                                   ("b2", "0.000000", "0.0", "crash", "typo — タイポ")],
        "repo/results/host2-gpu0.tsv": [("c1", "0.998000", "44.0", "keep", "baseline"),
                                        ("c1", "0.998500", "44.0", "keep", "baseline (rerun)"),
                                        ("c2", "0.980000", "44.0", "keep", "depth 9")],
        "another-project/results.tsv": [("d1", "1.500000", "0.0", "keep", "not this repository's")],
    })
    assert "3 results file(s)" in out and "another-project" not in out  # a folder beside it: not this project's
    # a baseline and its re-run are one experiment, worth their mean; experiments are numbered per agent
    assert "  #1    0.996900" in out and "  #2    0.990000" in out
    assert "3 experiments: 3 keep, 0 discard, 0 crash" not in out and "2 experiments: 2 keep" in out
    for agent in ("repo", "host3", "host2-gpu0"):
        assert f"== {agent} ==" in out
    assert "noise floor: 0.002000" in out  # repo's two baselines differ by 0.002
    table = out.split("Each agent's best:")[1]
    assert "host2-gpu0" in table and "0.980000" in table and "depth 9" in table
    assert "host3" in table  # the crash-only agent has a row too
    image = np.asarray(Image.open(tmp_path / "repo" / "progress.png").convert("RGB"))
    assert image.shape[1] > 1000


def test_program_md_states_the_loop_rules():
    text = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    for rule in [
        "uv run train.py > run.log 2>&1", 'grep "^val_bpb:\\|^peak_vram_mb:" run.log', "tail -n 50 run.log",
        "git reset --hard", "Never stop to ask", "do not run it yourself",    # the reference's rules
        "baseline (rerun)", "worth the mean of its runs", "at least 0.001",   # the two baselines, the floor
        "run the same commit again", "the mean of both",                      # a marginal win's re-run
        "equal: within F", "simpler", "starts from the last kept commit",     # rules with no gap
        "--overrule", "Read the result before you record it",                 # the verdict
        "flops_per_sec", "re-measure", "AUTORESEARCH_BUDGET=flops",           # the machine's speed
        "commit the code that ran first", "already recorded",                # the log cannot lie
        "timeout 600", "as a crash", "never through `tee`",                   # timeouts, a small context
        "uv run -m autoresearch.results record", "(typo)",                    # one-step bookkeeping
        "off CUDA torch measures none",                                       # memory_gb
        "AUTORESEARCH_PRESET=small", "the same settings",                     # comparability
        "AUTORESEARCH_", "not comparable with any run",                 # the metric is not the agent's
        'grep "^step', "the same `%`",                                        # reading the progress lines
        "AUTORESEARCH_FLEET_GPUS", "export them", "fleet cancel",             # the fleet on a CPU, its settings
    ]:
        assert rule in text, f"program.md does not say {rule!r}"


def test_program_md_lists_every_fixed_call_train_py_makes():
    """The agent reads train.py and program.md only: every fixed name train.py uses is in program.md's table."""
    program = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    table = program.split("## What train.py calls")[1].split("\n## ")[0]
    source = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()
    imported = re.search(r"^from prepare import (.+)$", source, flags=re.M).group(1).split(", ")
    used = sorted(set(re.findall(r"\b((?:runtime|hardware)\.\w+)\(", source)))
    assert imported and used
    for name in imported:
        assert f"`{name}(" in table, f"program.md does not list prepare.{name}"
    for name in used:
        assert f"`{name}" in table, f"program.md does not list {name}"


def test_notebook_draws_each_gpu_model_apart(run_notebook):
    out = run_notebook([("a1", "0.990000", "44.0", "keep", "baseline", "NVIDIA H100"),
                        ("a1", "0.992000", "44.0", "keep", "baseline (rerun)", "NVIDIA H100"),
                        ("a1", "0.950000", "70.0", "keep", "baseline", "NVIDIA H200"),
                        ("b2", "0.000000", "0.0", "crash", "typo", "")])
    assert "== repo on NVIDIA H100 ==" in out and "== repo on NVIDIA H200 ==" in out
    h200 = out.split("== repo on NVIDIA H200 ==")[1].split("==")[0]
    assert "2 experiments: 1 keep, 0 discard, 1 crash" in h200  # the crash without a model joins the one above


def test_notebook_explains_bad_results_files_and_still_renders(run_notebook, tmp_path):
    (tmp_path / "repo" / "results").mkdir(parents=True)
    (tmp_path / "repo" / "results" / "empty.tsv").write_text("")
    out = run_notebook([("a1b2c3d", "0.997900", "44.0", "keep", "baseline\twith a tab", "cpu"),
                        ("b2c3d4e", "N/A", "44.0", "keep", "lost its value"),
                        ("c3d4e5f", "0.990000", "44.0", "keep", "halve the batch")])
    assert "empty.tsv is empty (not even the header line): skipped" in out
    assert "a tab inside the description" in out and "without a val_bpb ('N/A')" in out
    assert "best:     0.990000" in out and "nan" not in out.lower()
    assert (tmp_path / "repo" / "progress.png").stat().st_size > 10_000


def test_one_route_for_a_users_mistake():
    """Every `error:` line comes from autoresearch.errors.UserError: no sys.exit, SystemExit or message-carrying
    assert elsewhere in the code a user runs (asserts guard invariants, and say no `error:`)."""
    folder = os.path.join(ROOT, "autoresearch")
    harness = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n != "errors.py")
    sources = ["prepare.py", "train.py", "constants.py"] + [os.path.join("autoresearch", n) for n in harness]
    for rel in sources:
        text = open(os.path.join(ROOT, rel), encoding="utf-8").read()
        for pattern in (r"\bsys\.exit\(", r"\bSystemExit\(", r"assert .*\"error:"):
            assert not re.search(pattern, text), f"{rel} has {pattern}"


def test_the_results_command_imports_only_the_standard_library(tmp_path):
    import subprocess
    import sys
    heavy = ("numpy", "torch", "pyarrow", "requests", "matplotlib", "pandas", "filelock")
    code = ("import sys, runpy; sys.argv = ['results']; runpy.run_module('autoresearch.results', run_name='__main__')\n"
            f"print('heavy:', sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("heavy: []"), proc.stdout


def test_the_notebook_runs_headless_with_what_uv_sync_installed(tmp_path):
    """README's headless command, `uv run jupyter execute analysis.ipynb` (nbclient comes with `uv sync`), writes
    progress.png from the results here and leaves the notebook as stored (no outputs)."""
    import shutil
    import subprocess
    import sys
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "uv run jupyter execute analysis.ipynb" in readme
    shutil.copy(os.path.join(ROOT, "analysis.ipynb"), tmp_path)
    shutil.copytree(os.path.join(ROOT, "autoresearch"), tmp_path / "autoresearch",
                    ignore=shutil.ignore_patterns("__pycache__"))
    write_results(str(tmp_path / "results.tsv"), [("a1", "0.997900", "44.0", "keep", "baseline"),
                                                  ("b2", "0.990000", "44.0", "keep", "halve the batch")])
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([sys.executable, "-m", "jupyter", "execute", "analysis.ipynb"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "progress.png").stat().st_size > 10_000
    assert nbformat.read(str(tmp_path / "analysis.ipynb"), as_version=4).cells[1].outputs == []
