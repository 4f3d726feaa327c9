"""analysis.ipynb runs headless on the results files an agent leaves; README and program.md name real files."""
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT


def program_header():
    text = open(os.path.join(ROOT, "program.md"), encoding="utf-8").read()
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("commit\t")]
    assert len(lines) == 1, "program.md gives the results.tsv header exactly once"
    return lines[0]


def run_notebook(folder, rows):
    with open(os.path.join(folder, "results.tsv"), "w", encoding="utf-8") as f:
        f.write(program_header() + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    nb = nbformat.read(os.path.join(ROOT, "analysis.ipynb"), as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    out = ""
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out += o.get("text", "")
    return out


def test_header_is_the_five_columns():
    assert program_header().split("\t") == ["commit", "val_bpb", "memory_gb", "status", "description"]


def test_notebook_on_a_normal_night(tmp_path):
    out = run_notebook(tmp_path, [
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
    assert (tmp_path / "progress.png").stat().st_size > 10_000


def test_notebook_with_crashes_only(tmp_path):
    out = run_notebook(tmp_path, [("a1b2c3d", "0.000000", "0.0", "crash", "typo"),
                                  ("b2c3d4e", "0.000000", "0.0", "crash", "OOM")])
    assert "2 experiments: 0 keep, 0 discard, 2 crash" in out and "No kept result yet" in out
    assert (tmp_path / "progress.png").exists()


def test_notebook_with_only_the_baseline(tmp_path):
    out = run_notebook(tmp_path, [("a1b2c3d", "0.997900", "44.0", "keep", "baseline")])
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
    assert files, f"{doc} names no `uv run <file>` command"
    for name in files:
        assert os.path.isfile(os.path.join(ROOT, name)), f"{doc} names {name}, which does not exist"
