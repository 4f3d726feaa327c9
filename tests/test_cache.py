"""The cache never lies and is never rewritten: a build is made whole in a temporary folder and renamed, so a
running train.py never shares a file with a writer; every kind of build file damaged, swapped, truncated or emptied
is refused by train.py's start-up check with one line naming it, and a rerun of prepare.py makes the build again;
a changed source is a new build beside the old one; --source is read-only; bad overrides are one line before
anything runs."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch import cache, source
import prepare
from conftest import ROOT, TEST_ENV, build_docs, run_script, write_source_corpus
from constants import BUILDS_DIR, CACHE_DIR, POINTER_PATH, VAL_SHARD, shard_name


def build_file(kind):
    """Path of one file of the shared test cache's current build."""
    build = cache.current_build()
    if kind in ("ranks.txt", "tokenizer.json"):
        return build.path(f"tokenizer/{kind}")
    if kind == "build.json":
        return build.path(kind)
    split, suffix = kind.split(".", 1)
    tok_rel, idx_rel = cache.token_rels(shard_name(VAL_SHARD) if split == "val" else shard_name(0))
    return build.path(tok_rel if suffix == "tokens" else idx_rel)


def snapshot(folder):
    """Every file under folder with its bytes, to show something was left untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * keep)])


def flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def cut_lines(path, n=100):
    with open(path, encoding="ascii") as f:
        lines = f.readlines()
    with open(path, "w", encoding="ascii") as f:
        f.writelines(lines[:-n])  # still a well-formed file, cut at a line boundary


def swap(a, b):
    os.replace(a, a + ".swap")
    os.replace(b, a)
    os.replace(a + ".swap", b)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def make_folder(path):
    os.remove(path)
    os.mkdir(path)


def recorded(path):
    """Enter the file in build.json as it now is (size, checksum): damage that only the structure check sees."""
    build = cache.current_build()
    rel = os.path.relpath(path, build.folder).replace(os.sep, "/")
    data = dict(build.data)
    data["files"][rel].update(size=os.path.getsize(path), sha256=cache.file_sha256(path))
    write(build.path("build.json"), json.dumps(data))


def garbage_index(path):
    write(path, "not a zip file")
    recorded(path)


def inconsistent_index(path):
    with np.load(path) as idx:
        offsets, chunk_ends = idx["offsets"].copy(), idx["chunk_ends"]
    offsets[-1] += 1  # one token more than the token file holds
    with open(path, "wb") as f:
        np.savez(f, offsets=offsets, chunk_ends=chunk_ends)
    recorded(path)


# (what is done to the cache, the file the refusal must name)
DAMAGE = {
    "train tokens swapped with the validation shard's": (lambda f: swap(f("train.tokens"), f("val.tokens")),
                                                         ".tokens.npy"),
    "train tokens emptied": (lambda f: truncate(f("train.tokens"), 0), "shard_00000.tokens.npy"),
    "train tokens truncated": (lambda f: truncate(f("train.tokens")), "shard_00000.tokens.npy"),
    "one byte of the validation tokens changed": (lambda f: flip_middle_byte(f("val.tokens")),
                                                  "shard_06542.tokens.npy"),
    "index truncated": (lambda f: truncate(f("train.index")), "shard_00000.index.npz"),
    "ranks.txt cut at a line boundary": (lambda f: cut_lines(f("ranks.txt")), "ranks.txt"),
    "tokenizer.json rewritten": (lambda f: write(f("tokenizer.json"), '{"pattern": "x"}'), "tokenizer.json"),
    "a token file turned into a folder": (lambda f: make_folder(f("val.tokens")), "shard_06542.tokens.npy"),
    "build.json garbled": (lambda f: write(f("build.json"), "{not json"), "build.json"),
    "the pointer garbled": (lambda f: write(POINTER_PATH, "../../etc"), "current does not name a build"),
    "the pointer naming a build that is not there": (lambda f: write(POINTER_PATH, "0" * 16),
                                                     "names build 0000000000000000, which is not in"),
    "an index that does not load (entered as it is)": (
        lambda f: garbage_index(f("train.index")), "shard_00000.tokens.npy or its index cannot be read"),
    "an index inconsistent with its tokens (entered as it is)": (
        lambda f: inconsistent_index(f("train.index")), "shard_00000.tokens.npy and its index are inconsistent"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_refused_then_made_again(case, damageable_cache, tokenizer, source_dir, capsys):
    damage, named = DAMAGE[case]
    before = snapshot(CACHE_DIR)
    source_before = snapshot(source_dir)
    damage(build_file)
    with pytest.raises(SystemExit) as refusal:
        tok = prepare.check_cache()
        next(prepare.make_dataloader(tok, 2, 32, "train", device="cpu"))  # (the loader checks the structure)
    line = str(refusal.value.code)
    assert "\n" not in line and line.startswith("error: ") and named in line, line
    assert "prepare.py" in line, "the refusal says what makes the build again"
    capsys.readouterr()
    prepare.main(["--source", source_dir])  # "rerun prepare.py" makes the build again
    again = prepare.check_cache()
    assert [again.enc.decode_single_token_bytes(i) for i in range(again.get_vocab_size())] == \
        [tokenizer.enc.decode_single_token_bytes(i) for i in range(tokenizer.get_vocab_size())]
    assert snapshot(CACHE_DIR) == before, "the same build, byte for byte"
    assert snapshot(source_dir) == source_before, "--source is only read"


def test_train_py_refuses_a_damaged_build_in_one_line(prepared, tmp_path, source_dir):
    cache_dir = tmp_path / "cache"
    shutil.copytree(CACHE_DIR, cache_dir)
    rel = os.path.relpath(cache.current_build().path(cache.token_rels(shard_name(VAL_SHARD))[0]), CACHE_DIR)
    truncate(cache_dir / rel)
    proc = run_script(["train.py"], env={"AUTORESEARCH_CACHE_DIR": str(cache_dir)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(cache_dir / rel) in line and f"--source {source_dir}" in line
    assert "step" not in proc.stdout


def test_a_hub_run_that_cannot_download_leaves_the_current_build_as_it_was(prepared, source_dir):
    before = snapshot(CACHE_DIR)
    with pytest.raises(SystemExit) as refusal:
        prepare.main([])  # no --source: the hub, which cannot be reached here
    assert "cannot connect" in str(refusal.value.code) and "--source DIR" in str(refusal.value.code)
    assert {k: v for k, v in snapshot(CACHE_DIR).items() if not k.startswith("data")} == before


def test_rerun_with_the_same_source_verifies_and_changes_nothing(prepared, source_dir, capsys):
    before = snapshot(CACHE_DIR)
    prepare.main(["--source", source_dir])
    out = capsys.readouterr().out
    assert "is made already and matches its build.json" in out and "tokenizer: trained" not in out
    assert snapshot(CACHE_DIR) == before


def test_a_changed_source_is_a_new_build_beside_the_old_one_and_old_ones_go_on_request(tmp_path, corpus_docs):
    write_source_corpus(str(tmp_path / "src"), corpus_docs[:300])
    cache_dir = tmp_path / "cache"
    env = {"AUTORESEARCH_CACHE_DIR": str(cache_dir)}  # (HF_ENDPOINT is unreachable)
    for _ in range(2):  # made, then the same source again: verified, nothing made
        proc = run_script(["prepare.py", "--source", str(tmp_path / "src")], env=env)
        assert proc.returncode == 0, proc.stderr
    assert "tokenizer: trained" not in proc.stdout and "is made already" in proc.stdout
    assert sorted(os.listdir(cache_dir)) == ["builds", "current"]
    first = (cache_dir / "current").read_text().strip()
    old = snapshot(cache_dir / "builds" / first)
    with open(tmp_path / "src" / "new.txt", "w", encoding="utf-8") as f:
        f.write("a document added after the cache was built " * 30)
    proc = run_script(["-c", f"import prepare; prepare.main(['--source', {str(tmp_path / 'src')!r}]); "
                             "prepare.check_cache()"], env=env)
    assert proc.returncode == 0, proc.stderr
    second = (cache_dir / "current").read_text().strip()
    assert second != first and "tokenizer: trained" in proc.stdout
    assert snapshot(cache_dir / "builds" / first) == old, "an old build is never changed"
    build = cache.current_build(str(cache_dir))
    assert "a document added after the cache was built " * 30 in build_docs(build, "train") + build_docs(build, "val")
    proc = run_script(["prepare.py", "--source", str(tmp_path / "src"), "--remove-old"], env=env)
    assert proc.returncode == 0 and "1 old build(s) removed" in proc.stdout, proc.stderr
    assert os.listdir(cache_dir / "builds") == [second]


def test_a_running_train_keeps_its_build_while_prepare_makes_others(prepared, tmp_path, corpus_docs):
    """A reader holds the current build open; two prepare.py at once make a new build from a changed corpus: both
    succeed, one build results, and every file the reader had is as it was (nothing is locked, nothing rewritten)."""
    cache_dir = tmp_path / "cache"
    shutil.copytree(CACHE_DIR, cache_dir)
    env = {**os.environ, **TEST_ENV, "AUTORESEARCH_CACHE_DIR": str(cache_dir)}
    reader = subprocess.Popen([sys.executable, "-c", "import prepare, sys\ntok = prepare.check_cache()\n"
                               "rows = prepare.pack_rows(tok, 2, 32, 'train'); next(rows)\n"
                               "print('reading', flush=True); sys.stdin.readline(); next(rows)\n"
                               "print('still reading', tok.build.id, flush=True)"],
                              cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert reader.stdout.readline().startswith("cache: build") and reader.stdout.readline().strip() == "reading"
        held = cache.current_build(str(cache_dir)).id
        before = snapshot(cache_dir / "builds" / held)
        write_source_corpus(str(tmp_path / "src"), corpus_docs[:200])
        makers = [subprocess.Popen([sys.executable, "prepare.py", "--source", str(tmp_path / "src")], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for _ in range(2)]
        assert all(m.wait(timeout=300) == 0 for m in makers), [m.stderr.read() for m in makers]
        reader.stdin.write("\n")
        reader.stdin.flush()
        assert reader.stdout.readline().split() == ["still", "reading", held]
    finally:
        reader.kill()
        reader.wait()
    assert snapshot(cache_dir / "builds" / held) == before
    builds = sorted(n for n in os.listdir(cache_dir / "builds"))
    assert len(builds) == 2 and (cache_dir / "current").read_text().strip() in builds


# ---------------------------------------------------------------------------------------------------------------
# --source: read-only, never inside the cache, odd folders and odd values

def test_a_source_inside_the_cache_is_refused_and_nothing_is_deleted(prepared):
    before = snapshot(CACHE_DIR)
    for folder in (BUILDS_DIR, CACHE_DIR, os.path.dirname(CACHE_DIR)):
        with pytest.raises(SystemExit, match="overlap"):
            prepare.main(["--source", folder])
    assert snapshot(CACHE_DIR) == before


@pytest.mark.parametrize("value, message", [("", "empty string"), (os.path.join(ROOT, "README.md"), "is a file")])
def test_bad_source_values_are_one_line(value, message):
    with pytest.raises(SystemExit, match=message):
        prepare.main(["--source", value])


def test_fifos_broken_links_and_other_files_are_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first document " * 20)
    (src / "b.md").write_text("second document " * 20)
    (src / "image.png").write_bytes(b"\x89PNG")
    os.mkfifo(src / "pipe.txt")  # opening it would block forever
    os.symlink(src / "gone.txt", src / "dangling.txt")
    result = []
    reader = threading.Thread(target=lambda: result.append(source.read_source(str(src))), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert result, "read_source hung on a FIFO"
    docs, _ = result[0]
    assert sorted(docs) == sorted(["first document " * 20, "second document " * 20])
    out = capsys.readouterr().out
    assert "1 .png files" in out and "2 not readable regular files" in out


@pytest.mark.parametrize("values", [[1, 2, 3], [b"bytes", b"more"], [["a", "list"], ["b"]]])
def test_non_string_parquet_text_is_an_error_naming_the_file(tmp_path, values):
    (tmp_path / "ok.txt").write_text("fine " * 10)
    pq.write_table(pa.table({"text": values}), tmp_path / "odd.parquet")
    with pytest.raises(SystemExit, match="odd.parquet.*not strings"):
        source.read_source(str(tmp_path))


def test_jsonl_non_string_text_names_the_line_and_lone_surrogates_are_replaced(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "lone \\ud800 surrogate"}\n{"text": null}\n')
    docs, _ = source.read_source(str(tmp_path))
    assert docs == ["fine", "lone \ufffd surrogate"]
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n\n{"text": 42}\n')
    with pytest.raises(SystemExit, match=r"b\.jsonl:3: `text` is a int"):
        source.read_source(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Overrides: checked where they are read, before any data is loaded or any step run

@pytest.mark.parametrize("name, value", [
    ("AUTORESEARCH_TIME_BUDGET", "abc"), ("AUTORESEARCH_TIME_BUDGET", "-5"), ("AUTORESEARCH_TIME_BUDGET", "nan"),
    ("AUTORESEARCH_TIME_BUDGET", "inf"), ("AUTORESEARCH_TIME_BUDGET", "0"), ("AUTORESEARCH_MAX_SEQ_LEN", "4"),
    ("AUTORESEARCH_MAX_SEQ_LEN", "12.5"), ("AUTORESEARCH_EVAL_TOKENS", "0"), ("AUTORESEARCH_EVAL_TOKENS", "1e6"),
    ("HF_ENDPOINT", "ftp://example.org"), ("AUTORESEARCH_DEVICE", "tpu"),
    ("AUTORESEARCH_EVAL_TOKENS", "100"),  # less than one row of MAX_SEQ_LEN (128 in the tests)
    ("AUTORESEARCH_PRESET", "tiny"), ("AUTORESEARCH_FORCE", "maybe"), ("AUTORESEARCH_GPU_MEMORY_GB", "-24"),
    ("HF_HUB_OFFLINE", "sometimes"),
    ("AUTORESEARCH_FLOP_BUDGET", "1e22"),  # more than a week of an H100: a typo, as a 10-week TIME_BUDGET is
])
def test_bad_overrides_are_one_line_naming_the_variable(name, value):
    proc = run_script(["-c", "import constants"], env={name: value})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith(f"error: {name}={value!r}") and "must be" in line
    unset = re.search(r"\(unset it for (.*)\)$", line)  # what the variable's absence gives, in words
    assert (unset or "must be at least one row" in line) and (not unset or unset.group(1).strip(" ,") != "the default")


@pytest.mark.parametrize("env, settings", [
    ({"AUTORESEARCH_FLOP_BUDGET": "2.0e11"}, "AUTORESEARCH_PRESET=small AUTORESEARCH_FLOP_BUDGET=2e+11"),
    ({"AUTORESEARCH_FLOP_BUDGET": "2e11"}, "AUTORESEARCH_PRESET=small AUTORESEARCH_FLOP_BUDGET=2e+11"),
    ({"AUTORESEARCH_FLOP_BUDGET": "4e12"}, "AUTORESEARCH_PRESET=small"),  # the preset's own value: no override
    ({"AUTORESEARCH_FLOP_BUDGET": "4000000000000.0"}, "AUTORESEARCH_PRESET=small"),
    ({"AUTORESEARCH_FLOP_BUDGET": "1234567891"}, "AUTORESEARCH_PRESET=small AUTORESEARCH_FLOP_BUDGET=1234567891.0"),
    ({"AUTORESEARCH_PRESET": "", "AUTORESEARCH_TIME_BUDGET": "300.0"}, "standard"),
])
def test_equal_settings_are_written_alike(env, settings):
    base = {"AUTORESEARCH_MAX_SEQ_LEN": "", "AUTORESEARCH_EVAL_TOKENS": "", "AUTORESEARCH_FLOP_BUDGET": "",
            "AUTORESEARCH_TIME_BUDGET": ""}
    proc = run_script(["-c", "import constants; print(constants.SETTINGS)"], env={**base, **env})
    assert proc.returncode == 0 and proc.stdout.strip() == settings, proc.stderr


def test_build_json_is_plain_json_naming_the_source_and_every_file(prepared, source_dir):
    build = cache.current_build()
    with open(build.path("build.json"), encoding="utf-8") as f:
        data = json.load(f)
    assert data["source"]["kind"] == "local" and data["source"]["path"] == os.path.realpath(source_dir)
    assert data["id"] == os.path.basename(build.folder) == cache.build_id(data["source"])
    for rel, entry in data["files"].items():
        assert os.path.getsize(build.path(rel)) == entry["size"]
        assert cache.file_sha256(build.path(rel)) == entry["sha256"]
    on_disk = {os.path.relpath(os.path.join(r, n), build.folder) for r, _, ns in os.walk(build.folder) for n in ns}
    assert on_disk == set(data["files"]) | {"build.json"}


def test_a_cache_of_the_version_before_builds_is_refused_in_one_line(tmp_path, source_dir):
    (tmp_path / "cache" / "data").mkdir(parents=True)
    (tmp_path / "cache" / "manifest.json").write_text('{"format": 1, "source": {"kind": "local"}}')
    proc = run_script(["prepare.py"], env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    line = proc.stderr.strip()
    assert proc.returncode == 1 and "\n" not in line and "made by an older version" in line and "data/ too" in line
    assert sorted(os.listdir(tmp_path / "cache")) == ["data", "manifest.json"]


def test_a_cache_path_that_is_a_file_is_one_line(tmp_path, source_dir):
    (tmp_path / "cache").write_text("not a folder")
    proc = run_script(["prepare.py", "--source", source_dir], env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 1 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
