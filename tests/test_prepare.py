"""prepare.py and cache.py: --source corpora, the tokenizer (training, round trip, token bytes, no pickle), bad input,
the device rules (runtime.py)."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cache
import prepare
import runtime
from conftest import MULTILINGUAL, run_script
from constants import DATA_DIR, SPECIAL_TOKENS, TOKENIZER_DIR, VAL_SHARD, VOCAB_SIZE, shard_name


def all_texts(paths):
    return [t for p in paths for batch in cache.read_parquet_texts(p) for t in batch]


def test_source_split_is_whole_and_disjoint(prepared, corpus_docs):
    val = all_texts(cache.list_shards("val"))
    train = all_texts(cache.list_shards("train"))
    assert cache.list_shards("val") == [os.path.join(DATA_DIR, shard_name(VAL_SHARD))]
    assert val and train
    assert sorted(val + train) == sorted(corpus_docs)  # every document of every format, once
    assert not set(val) & set(train) - set(MULTILINGUAL)  # (the multilingual docs are repeated on purpose)


def test_source_split_does_not_depend_on_file_order(tmp_path, corpus_docs):
    from conftest import write_source_corpus
    docs = corpus_docs[:300]
    write_source_corpus(str(tmp_path / "a"), docs)
    write_source_corpus(str(tmp_path / "b"), docs[::-1])
    for name in ("a", "b"):
        cache.write_source_shards(cache.read_source(str(tmp_path / name))[0], str(tmp_path / f"out_{name}"))
    val = [sorted(all_texts(cache.list_shards("val", str(tmp_path / d)))) for d in ("out_a", "out_b")]
    assert val[0] == val[1] and len(val[0]) > 0


def test_tokenizer_is_plain_data_and_has_the_spec_vocab(prepared, tokenizer):
    assert sorted(os.listdir(TOKENIZER_DIR)) == ["ranks.txt", "tokenizer.json"]
    assert tokenizer.get_vocab_size() == VOCAB_SIZE
    assert tokenizer.get_bos_token_id() == tokenizer.enc.encode_single_token(SPECIAL_TOKENS[0])
    assert [tokenizer.enc.encode_single_token(t) for t in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - 4, VOCAB_SIZE))


@pytest.mark.parametrize("text", MULTILINGUAL + ["", "def f(x):\n    return x ** 2  # 12345678\n", "a\u0301 \U0001F600"])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode([text, text], prepend=SPECIAL_TOKENS[0]) == [[tokenizer.get_bos_token_id()] + ids] * 2


def test_special_token_text_in_a_document_is_plain_text(tokenizer):
    ids = tokenizer.encode("x <|reserved_0|> y")
    assert tokenizer.get_bos_token_id() not in ids


def test_token_bytes_count_each_tokens_own_bytes(tokenizer):
    import torch
    token_bytes = prepare.get_token_bytes("cpu", tokenizer)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[-4:].tolist() == [0, 0, 0, 0]  # special tokens stand for no text
    # The bytes of any text's tokens add up to the text's UTF-8 length exactly, multi-byte scripts included.
    for text in MULTILINGUAL:
        assert sum(token_bytes[i].item() for i in tokenizer.encode(text)) == len(text.encode("utf-8"))
    # Tokens that are a fragment of a UTF-8 sequence count their own bytes (the reference counted 3, for U+FFFD).
    partial = [i for i in range(VOCAB_SIZE - 4)
               if not _is_utf8(tokenizer.enc.decode_single_token_bytes(i))]
    assert partial, "a byte-level BPE always has tokens for lone UTF-8 bytes"
    for i in partial:
        assert token_bytes[i].item() == len(tokenizer.enc.decode_single_token_bytes(i))
    assert any(token_bytes[i].item() != 3 for i in partial)


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


def test_source_cli_works_offline_end_to_end(tmp_path, corpus_docs):
    from conftest import write_source_corpus
    write_source_corpus(str(tmp_path / "src"), corpus_docs[:200])
    proc = run_script(["prepare.py", "--source", str(tmp_path / "src")],
                      env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})  # HF_ENDPOINT is unreachable
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "cache")) == ["data", "manifest.json", "prepare.lock", "tokenizer", "tokens"]
    again = run_script(["prepare.py", "--source", str(tmp_path / "src")],
                       env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr


PROC_VERSION = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build  "
                "(dvs-builder@U16-I3-B03-4-3)  Thu Feb 22 01:25:25 UTC 2024\nGCC version:  gcc version 12.3.0\n")


def test_the_driver_version_is_read_from_proc(tmp_path):
    (tmp_path / "version").write_text(PROC_VERSION)
    assert runtime.nvidia_driver_version(str(tmp_path / "version")) == "550.54.14"
    (tmp_path / "version").write_text(PROC_VERSION.replace("Open Kernel Module for x86_64", "Kernel Module"))
    assert runtime.nvidia_driver_version(str(tmp_path / "version")) == "550.54.14"


@pytest.mark.parametrize("cuda_available, driver, torch_cuda, expected", [
    (True, "590.10", "13.0", None),                       # torch uses the GPU
    (False, None, "13.0", None),                          # no NVIDIA GPU: the CPU (or MPS) is the device
    (False, "550.54.14", "13.0", ["550.54.14", ">= 580", "Older NVIDIA drivers", "AUTORESEARCH_DEVICE=cpu"]),
    (False, "560.35", "12.8", ["CUDA_VISIBLE_DEVICES", "Older NVIDIA drivers"]),  # new enough: something else
    (False, "470.1", "12.8", ["470.1", ">= 525"]),
    (False, "550.54.14", None, ["without CUDA", "Older NVIDIA drivers"]),   # a CPU-only torch on a GPU machine
])
def test_a_gpu_torch_cannot_use_is_one_line_naming_the_driver(cuda_available, driver, torch_cuda, expected):
    problem = runtime.unusable_gpu_problem(cuda_available, driver, torch_cuda, torch_version="2.11.0")
    if expected is None:
        assert problem is None
    else:
        assert "\n" not in problem and all(part in problem for part in expected), problem


def test_device_choice_is_said_by_prepare(tokenizer, capsys, source_dir):
    prepare.main(["--source", source_dir])
    assert "device: train.py will run on cpu" in capsys.readouterr().out
