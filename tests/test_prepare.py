"""prepare.py and cache.py: --source corpora and their split, the tokenizer (training, round trip, token bytes,
no pickle), bad input and the messages it gets, the device rules (runtime.py)."""
import errno
import os
import re
import shlex

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch import cache, source
import prepare
from autoresearch import hardware
from conftest import MULTILINGUAL, build_docs, run_script
from constants import LOADER_BUFFER_DOCS, SPECIAL_TOKENS, VAL_SHARD, VOCAB_SIZE, shard_name


def test_source_split_is_whole_and_disjoint(prepared, corpus_docs):
    build = cache.current_build()
    assert build.shards("val") == [shard_name(VAL_SHARD)] and not os.path.exists(build.path("data"))
    val, train = build_docs(build, "val"), build_docs(build, "train")
    assert val and train
    assert sorted(val + train) == sorted(set(corpus_docs))  # every document of every format, exact copies once
    assert not set(val) & set(train)


def test_source_split_does_not_depend_on_file_order(tmp_path, corpus_docs):
    from conftest import write_source_corpus
    docs = corpus_docs[:300]
    write_source_corpus(str(tmp_path / "a"), docs)
    write_source_corpus(str(tmp_path / "b"), docs[::-1])
    val = [sorted(source.split_source(source.read_source(str(tmp_path / name))[0]).val) for name in ("a", "b")]
    assert val[0] == val[1] and len(val[0]) > 0


def test_tokenizer_is_plain_data_and_has_the_spec_vocab(prepared, tokenizer):
    assert sorted(os.listdir(cache.current_build().path("tokenizer"))) == ["ranks.txt", "tokenizer.json"]
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.get_bos_token_id() == tokenizer.enc.encode_single_token(SPECIAL_TOKENS[0])
    assert [tokenizer.enc.encode_single_token(t) for t in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - 4, VOCAB_SIZE))


@pytest.mark.parametrize("text", MULTILINGUAL + ["", "def f(x):\n    return x ** 2  # 12345678\n",
                                                 "a\u0301 \U0001F600"])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode([text, text], prepend=SPECIAL_TOKENS[0]) == [[tokenizer.get_bos_token_id()] + ids] * 2


def test_special_token_text_in_a_document_is_plain_text(tokenizer):
    ids = tokenizer.encode("x <|reserved_0|> y")
    assert tokenizer.get_bos_token_id() not in ids


def test_token_bytes_count_as_the_reference_and_exactly(tokenizer):
    import torch
    token_bytes = prepare.get_token_bytes("cpu", tokenizer)
    reference, exact = token_bytes
    assert token_bytes.dtype == torch.int64 and token_bytes.shape == (2, VOCAB_SIZE)
    assert reference[-4:].tolist() == exact[-4:].tolist() == [0, 0, 0, 0]  # special tokens stand for no text
    # Exactly: the bytes of any text's tokens add up to the text's UTF-8 length, multi-byte scripts included.
    for text in MULTILINGUAL:
        assert sum(exact[i].item() for i in tokenizer.encode(text)) == len(text.encode("utf-8"))
    # A token that is a fragment of a UTF-8 sequence counts its own bytes exactly, and 3 bytes (U+FFFD) per invalid
    # run of bytes as the reference counts it (b'\x80' counts 3).
    lone = tokenizer.enc.encode_single_token(b"\x80")
    assert (exact[lone].item(), reference[lone].item()) == (1, 3)
    partial = [i for i in range(VOCAB_SIZE - 4) if not _is_utf8(tokenizer.enc.decode_single_token_bytes(i))]
    assert partial, "a byte-level BPE always has tokens for lone UTF-8 bytes"
    for i in partial:
        token = tokenizer.enc.decode_single_token_bytes(i)
        invalid = reference[i].item() - _valid_bytes(token)  # 3 bytes per invalid run
        assert exact[i].item() == len(token) and invalid > 0 and invalid % 3 == 0
    whole = [i for i in range(VOCAB_SIZE - 4) if i not in set(partial)]
    assert all(reference[i].item() == exact[i].item() for i in whole)


def _valid_bytes(token):
    """The bytes of a token's complete characters (each invalid run in it adds 3 more as the reference counts)."""
    return len(token.decode("utf-8", errors="ignore").encode("utf-8"))


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_a_tampered_tokenizer_gives_one_clear_error(tmp_path, tokenizer):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text('{"pattern": "x"}')
    (folder / "ranks.txt").write_text("not base64 at all\n")
    with pytest.raises(SystemExit, match="corrupt"):
        prepare.Tokenizer.from_directory(str(folder))
    with pytest.raises(SystemExit, match="uv run prepare.py"):
        prepare.Tokenizer.from_directory(str(tmp_path / "missing"))


def one_line_error(proc):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_missing_source_folder(tmp_path):
    line = one_line_error(run_script(["prepare.py", "--source", str(tmp_path / "nope")],
                                     env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")}))
    assert str(tmp_path / "nope") in line
    assert not (tmp_path / "cache").exists()  # nothing written for a bad command


def test_corrupt_parquet_and_missing_text_column_are_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello " * 100)
    (src / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    line = one_line_error(run_script(["prepare.py", "--source", str(src)],
                                     env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")}))
    assert "broken.parquet" in line
    os.remove(src / "broken.parquet")
    pq.write_table(pa.table({"content": ["x", "y"]}), src / "nocol.parquet")
    line = one_line_error(run_script(["prepare.py", "--source", str(src)],
                                     env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")}))
    assert "nocol.parquet" in line and "text" in line


PROC_VERSION = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build  "
                "(dvs-builder@U16-I3-B03-4-3)  Thu Feb 22 01:25:25 UTC 2024\nGCC version:  gcc version 12.3.0\n")


def test_the_driver_version_is_read_from_proc(tmp_path):
    (tmp_path / "version").write_text(PROC_VERSION)
    assert hardware.nvidia_driver_version(str(tmp_path / "version")) == "550.54.14"
    (tmp_path / "version").write_text(PROC_VERSION.replace("Open Kernel Module for x86_64", "Kernel Module"))
    assert hardware.nvidia_driver_version(str(tmp_path / "version")) == "550.54.14"


@pytest.mark.parametrize("cuda_available, driver, torch_cuda, expected", [
    (True, "590.10", "13.0", None),                       # torch uses the GPU
    (False, None, "13.0", None),                          # no NVIDIA GPU: the CPU (or MPS) is the device
    (False, "550.54.14", "13.0", ["550.54.14", ">= 580", "Older NVIDIA drivers", "AUTORESEARCH_DEVICE=cpu"]),
    (False, "560.35", "12.8", ["CUDA_VISIBLE_DEVICES", "Older NVIDIA drivers"]),  # new enough: something else
    (False, "470.1", "12.8", ["470.1", ">= 525"]),
    (False, "550.54.14", None, ["without CUDA", "Older NVIDIA drivers"]),   # a CPU-only torch on a GPU machine
])
def test_a_gpu_torch_cannot_use_is_one_line_naming_the_driver(cuda_available, driver, torch_cuda, expected):
    problem = hardware.unusable_gpu_problem(cuda_available, driver, torch_cuda, torch_version="2.11.0")
    if expected is None:
        assert problem is None
    else:
        assert "\n" not in problem and all(part in problem for part in expected), problem


# ---------------------------------------------------------------------------------------------------------------
# The --source split: no document in both splits, no single document as the whole validation set

def test_exact_duplicates_are_dropped_before_the_split():
    docs = ["the same document, copied many times " * 20] * 300 + [f"document {i} " * 40 for i in range(200)]
    split = source.split_source(docs)
    val, train = split.val, [d for shard in split.train for d in shard]
    assert split.duplicates == 299 and len(val) + len(train) == 201 and not set(val) & set(train)


def test_a_huge_document_never_becomes_the_whole_validation_set():
    huge = "one enormous document " * 50_000  # 1.1 MB, far more than a tenth of the corpus
    docs = [huge] + [f"small document number {i} " * 40 for i in range(120)]
    split = source.split_source(docs)
    assert huge not in split.val and len(split.val) > 1
    assert split.val_bytes <= 0.1 * sum(len(d) for d in docs)


def test_validation_holds_enough_documents_for_the_loaders_look_ahead():
    docs = [f"document {i} " + "words " * (20 + i % 50) for i in range(4000)]
    split = source.split_source(docs)
    val, train = split.val, [d for shard in split.train for d in shard]
    # a tenth of the bytes is ~400 documents; the loader looks 1000 ahead: a quarter of them (at most 2 x 1000)
    assert len(val) == 1000 and len(train) == 3000 and not set(val) & set(train)
    assert split.val_bytes == sum(len(d) for d in val) > 0.1 * sum(len(d) for d in docs)
    many = source.split_source([f"document {i} " + "words " * (20 + i % 50) for i in range(12_000)])
    assert len(many.val) == 2 * LOADER_BUFFER_DOCS  # a larger corpus: twice the look-ahead, not a quarter
    shards = source.split_source(docs, shard_bytes=50_000).train  # training shards of about shard_bytes, in order
    assert len(shards) > 1 and [d for shard in shards for d in shard] == train


def test_a_small_corpus_says_its_vocabulary_is_smaller(tmp_path):
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(f"a tiny corpus, document {i} " * 30)
    proc = run_script(["prepare.py", "--source", str(tmp_path / "src")],
                      env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^note: .* too few distinct pieces for 8192 tokens: the tokenizer has \d+", proc.stdout,
                     flags=re.M)


# ---------------------------------------------------------------------------------------------------------------
# Messages that say what happened

def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfplain text")
    docs, _ = source.read_source(str(tmp_path))
    assert docs == ["first", "second", "plain text"]


def test_prepare_commands_quote_their_folder():
    command = cache.prepare_command({"kind": "local", "path": "/data/my corpus"})
    assert command == "uv run prepare.py --source '/data/my corpus'"
    assert shlex.split(command)[-1] == "/data/my corpus"


def test_unreadable_folders_and_skipped_files_are_counted(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("readable " * 20)
    (tmp_path / "b.md").write_text("also readable " * 20)
    (tmp_path / "data.bin").write_bytes(b"not a document type")
    real_walk = os.walk

    def walk_with_an_unreadable_folder(top, onerror=None, **kw):  # (as root every folder is readable)
        onerror(PermissionError(13, "Permission denied", str(tmp_path / "private")))
        yield from real_walk(top, onerror=onerror, **kw)

    monkeypatch.setattr(cache.os, "walk", walk_with_an_unreadable_folder)
    source.read_source(str(tmp_path))
    out = capsys.readouterr().out
    assert "read .parquet, .jsonl and 51 plain-text extensions (--extensions) files" in out
    assert "1 .bin files" in out and "1 unreadable folders" in out


def test_source_code_is_read_and_long_files_split_into_documents(tmp_path, capsys):
    """A folder of .py files is a corpus; a long file becomes documents of at most DOC_CHARS, cut at
    blank lines, so that the loader sees all of it, not only its start."""
    functions = [f"def f{i}(x):\n    return x + {i}\n" * 20 for i in range(200)]
    (tmp_path / "module.py").write_text("\n\n".join(functions))
    (tmp_path / "notes.md").write_text("short notes\n\nin two paragraphs")
    docs, _ = source.read_source(str(tmp_path))
    notes = "short notes\n\nin two paragraphs"
    assert len(docs) > 20 and max(len(d) for d in docs) <= source.DOC_CHARS and notes in docs
    assert "\n\n".join(d for d in docs if d != notes) == "\n\n".join(functions)  # nothing lost
    with pytest.raises(SystemExit, match="holds 1 document"):  # a short file is one document
        source.read_source(str(tmp_path), source.parse_extensions("md"))
    assert "skipped 1 .py files" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["", ",", ".parquet", "jsonl,.py"])
def test_bad_extensions_are_one_line(value):
    with pytest.raises(SystemExit, match="--extensions .*: give plain-text extensions"):
        source.parse_extensions(value)


def test_a_line_longer_than_a_document_is_cut():
    docs = source.split_document("x" * 12_000, 5000)
    assert [len(d) for d in docs] == [5000, 5000, 2000]


def test_an_empty_home_is_refused():
    proc = run_script(["-c", "import constants"], env={"HOME": "", "AUTORESEARCH_CACHE_DIR": ""})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "HOME is set but empty" in proc.stderr and "AUTORESEARCH_CACHE_DIR" in proc.stderr


def test_a_full_disk_is_said_and_leaves_no_temporary_file(damageable_cache, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.txt").write_text(f"another corpus, document {i} " * 30)
    real_save = prepare.np.save

    def write_then_fill_the_disk(file, array, **kw):  # (the first token file of the new build)
        real_save(file, array, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.np, "save", write_then_fill_the_disk)
    with pytest.raises(SystemExit) as refusal:
        prepare.main(["--source", str(tmp_path / "src")])
    assert "is full" in str(refusal.value.code) and "AUTORESEARCH_CACHE_DIR" in str(refusal.value.code)
    assert os.listdir(os.path.join(damageable_cache, "builds")) == [cache.current_build().id]  # no half build
