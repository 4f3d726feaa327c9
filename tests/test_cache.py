"""The cache never lies: every kind of cache file corrupted, swapped, truncated or emptied is refused by train.py's
start-up check with one line naming it, and a rerun of prepare.py repairs it; sources never mix; --source is
read-only; one prepare.py at a time; bad overrides are one line before anything runs."""
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
from conftest import ROOT, TEST_ENV, run_script
from constants import CACHE_DIR, DATA_DIR, MANIFEST_PATH, TOKENIZER_DIR, VAL_SHARD, shard_name


def cache_file(kind, tokenizer=None):
    """Path of one file of the shared test cache."""
    if kind in ("ranks.txt", "tokenizer.json"):
        return os.path.join(TOKENIZER_DIR, kind)
    split, suffix = kind.split(".", 1)
    name = shard_name(VAL_SHARD) if split == "val" else shard_name(0)
    if suffix == "parquet":
        return os.path.join(DATA_DIR, name)
    tok_rel, idx_rel = cache.token_rels(name, tokenizer.fingerprint)
    return os.path.join(CACHE_DIR, tok_rel if suffix == "tokens" else idx_rel)


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


def replace_parquet(path):
    pq.write_table(pa.table({"text": ["a different document " * 20] * 30}), path)


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def touch(path):
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def make_folder(path):
    os.remove(path)
    os.mkdir(path)


def flip_byte_keeping_mtime(path, offset=512):
    """One byte changed where the spot checksum reads (its first block), the mtime put back: only a checksum sees it."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def edit_manifest(change):
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        data = json.load(f)
    change(data)
    with open(MANIFEST_PATH, "w", encoding="utf-8") as f:
        json.dump(data, f)


def recorded(path):
    """Record the file in the manifest as it now is (size, checksum): damage that only the structure check sees."""
    rel = os.path.relpath(path, CACHE_DIR).replace(os.sep, "/")

    def change(data):
        data["files"][rel].update(size=os.path.getsize(path), sha256=cache.file_sha256(path))
    edit_manifest(change)


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


def made_from_another_parquet(tokens_path):
    rel = os.path.relpath(tokens_path, CACHE_DIR).replace(os.sep, "/")
    edit_manifest(lambda data: data["files"][rel].update({"from": "0" * 64}))


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
    "a training shard replaced": (lambda f: replace_parquet(f("train.parquet")), "shard_00000.parquet"),
    "a training shard only touched": (lambda f: touch(f("train.parquet")), "shard_00000.parquet"),
    "a token file turned into a folder": (lambda f: make_folder(f("val.tokens")), "shard_06542.tokens.npy"),
    "manifest.json garbled": (lambda f: write(MANIFEST_PATH, "{not json"), "manifest.json"),
    "train tokens changed where the spot checksum reads, mtime kept": (
        lambda f: flip_byte_keeping_mtime(f("train.tokens")), "shard_00000.tokens.npy does not match its checksum"),
    "train tokens recorded as made from another parquet": (
        lambda f: made_from_another_parquet(f("train.tokens")), "shard_00000.tokens.npy was made from another version"),
    "an index that does not load (recorded as it is)": (
        lambda f: garbage_index(f("train.index")), "shard_00000.tokens.npy or its index cannot be read"),
    "an index inconsistent with its tokens (recorded as it is)": (
        lambda f: inconsistent_index(f("train.index")), "shard_00000.tokens.npy and its index are inconsistent"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damage_is_refused_then_repaired(case, damageable_cache, tokenizer, source_dir, capsys):
    damage, named = DAMAGE[case]
    before = snapshot(CACHE_DIR)
    source_before = snapshot(source_dir)
    damage(lambda kind: cache_file(kind, tokenizer))
    with pytest.raises(SystemExit) as refusal:
        prepare.check_cache()
        next(prepare.make_dataloader(tokenizer, 2, 32, "train", device="cpu"))  # (the loader checks the structure)
    line = str(refusal.value.code)
    assert "\n" not in line and line.startswith("error: ") and named in line, line
    assert "prepare.py" in line, "the refusal says what repairs it"
    if "emptied" in case:  # the loader refuses too, instead of spinning on empty documents
        with pytest.raises(SystemExit, match="shard_00000"):
            next(prepare.make_dataloader(tokenizer, 2, 32, "train", device="cpu"))
    capsys.readouterr()
    prepare.main(["--source", source_dir])  # "rerun prepare.py" repairs
    if "touched" in case:  # same bytes: verified by checksum and recorded again, nothing rewritten
        assert "unchanged since the cache was built" in capsys.readouterr().out
    assert prepare.check_cache().fingerprint == tokenizer.fingerprint
    after = snapshot(CACHE_DIR)
    for rel in ("tokenizer/ranks.txt", f"data/{shard_name(VAL_SHARD)}",
                cache.token_rels(shard_name(VAL_SHARD), tokenizer.fingerprint)[0]):
        assert after[rel] == before[rel], f"{rel} is not what it was before the damage"
    assert snapshot(source_dir) == source_before, "--source is only read"


def test_train_py_refuses_a_damaged_cache_in_one_line(prepared, tokenizer, tmp_path, source_dir):
    cache_dir = tmp_path / "cache"
    shutil.copytree(CACHE_DIR, cache_dir)  # (copy2 keeps the mtimes the manifest recorded)
    rel = cache.token_rels(shard_name(VAL_SHARD), tokenizer.fingerprint)[0]
    truncate(cache_dir / rel)
    proc = run_script(["train.py"], env={"AUTORESEARCH_CACHE_DIR": str(cache_dir)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and str(cache_dir / rel) in line and f"--source {source_dir}" in line
    assert "step" not in proc.stdout


def test_a_hub_run_on_a_cache_from_source_is_refused(prepared, source_dir):
    before = snapshot(CACHE_DIR)
    with pytest.raises(SystemExit) as refusal:
        prepare.main([])  # no --source: the hub
    line = str(refusal.value.code)
    assert f"--source {source_dir}" in line and CACHE_DIR in line and "delete" in line
    assert snapshot(CACHE_DIR) == before


def test_rerun_with_the_same_source_verifies_and_keeps_everything(prepared, source_dir, capsys):
    before = snapshot(CACHE_DIR)
    prepare.main(["--source", source_dir])
    out = capsys.readouterr().out
    assert "unchanged since the cache was built" in out and "verified" in out
    assert snapshot(CACHE_DIR) == before


def test_the_source_cli_works_offline_and_a_changed_source_is_rebuilt(prepared, tmp_path, corpus_docs):
    from conftest import write_source_corpus
    write_source_corpus(str(tmp_path / "src"), corpus_docs[:300])
    cache_dir = tmp_path / "cache"
    env = {"AUTORESEARCH_CACHE_DIR": str(cache_dir)}  # (HF_ENDPOINT is unreachable)
    for _ in range(2):  # built, then the same source again: verified, nothing rebuilt
        proc = run_script(["prepare.py", "--source", str(tmp_path / "src")], env=env)
        assert proc.returncode == 0, proc.stderr
    assert "tokenizer: trained" not in proc.stdout and "rebuilding" not in proc.stdout
    assert sorted(os.listdir(cache_dir)) == ["cache.lock", "data", "manifest.json", "tokenizer", "tokens"]
    with open(tmp_path / "src" / "new.txt", "w", encoding="utf-8") as f:
        f.write("a document added after the cache was built " * 30)
    proc = run_script(["-c", f"import prepare; prepare.main(['--source', {str(tmp_path / 'src')!r}]); "
                             "prepare.check_cache()"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "changed since the cache was built: rebuilding" in proc.stdout and "tokenizer: trained" in proc.stdout
    texts = [t for p in cache.list_shards("train", str(cache_dir / "data")) + cache.list_shards("val", str(
        cache_dir / "data")) for batch in cache.read_parquet_texts(p) for t in batch]
    assert "a document added after the cache was built " * 30 in texts


# ---------------------------------------------------------------------------------------------------------------
# --source: read-only, never inside the cache, odd folders and odd values

def test_a_source_inside_the_cache_is_refused_and_nothing_is_deleted(prepared):
    before = snapshot(CACHE_DIR)
    for folder in (DATA_DIR, CACHE_DIR, os.path.dirname(CACHE_DIR)):
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
# One prepare.py at a time; the cache folder itself

def test_one_prepare_at_a_time_and_none_under_a_running_train(tmp_path):
    with cache.cache_lock(str(tmp_path)):
        with pytest.raises(SystemExit, match="another prepare.py is working on"):
            with cache.cache_lock(str(tmp_path)):
                pass
        with pytest.raises(SystemExit, match="prepare.py is writing the cache"):
            with cache.reading(str(tmp_path)):
                pass
    with cache.reading(str(tmp_path)):  # prepare.py is done: a train.py reads, shared
        with cache.reading(str(tmp_path)):  # another train.py on the same cache is welcome
            pass
        with pytest.raises(SystemExit, match="a train.py is reading the cache"):
            with cache.cache_lock(str(tmp_path)):
                pass
    with cache.cache_lock(str(tmp_path)):  # the run has ended
        pass


def test_a_killed_prepare_leaves_no_lock_behind(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from autoresearch import cache\n"
                               f"with cache.cache_lock({str(tmp_path)!r}):\n print('holding', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              env={**os.environ, **TEST_ENV})
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(SystemExit, match="prepare.py is writing the cache"):
            with cache.reading(str(tmp_path)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with cache.reading(str(tmp_path)):  # the OS dropped the killed process's hold
        pass


def test_reading_a_cache_that_does_not_exist_runs_unlocked_and_creates_nothing(tmp_path):
    with cache.reading(str(tmp_path / "missing")):
        pass
    assert not (tmp_path / "missing").exists()


def test_prepare_refuses_to_rewrite_the_data_under_a_running_train(prepared, source_dir):
    before = snapshot(CACHE_DIR)
    reader = subprocess.Popen([sys.executable, "-c", "import prepare, time; from autoresearch import cache\n"
                               "with cache.reading():\n prepare.check_cache(); print('holding', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, **TEST_ENV})
    try:
        assert "holding" in reader.stdout.readline() + reader.stdout.readline()
        with pytest.raises(SystemExit, match="a train.py is reading the cache"):
            prepare.main(["--source", source_dir])
    finally:
        reader.kill()
        reader.wait()
    assert snapshot(CACHE_DIR) == before


def test_a_cache_path_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(SystemExit, match="is not a folder"):
        with cache.cache_lock(str(tmp_path / "cache")):
            pass


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


def test_manifest_is_plain_json_naming_the_source(prepared, source_dir, tokenizer):
    with open(MANIFEST_PATH, encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["source"]["kind"] == "local" and manifest["source"]["path"] == os.path.realpath(source_dir)
    assert manifest["tokenizer"] == tokenizer.fingerprint
    for rel, entry in manifest["files"].items():
        assert os.path.getsize(os.path.join(CACHE_DIR, rel)) == entry["size"]
        assert cache.file_sha256(os.path.join(CACHE_DIR, rel)) == entry["sha256"]

