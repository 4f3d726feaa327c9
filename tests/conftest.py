"""Shared fixtures. The environment overrides are set before any project module is imported, so every test
(and every subprocess it starts) uses a private temporary cache and a tiny compute budget, never ~/.cache."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

_CACHE = tempfile.mkdtemp(prefix="autoresearch-test-cache-")
TEST_ENV = {
    "AUTORESEARCH_CACHE_DIR": _CACHE,
    "AUTORESEARCH_PRESET": "small",  # (what a CPU runs; the overrides below shrink it further)
    "AUTORESEARCH_TIME_BUDGET": "4",  # (for the tests of the time budget: see set_budget)
    "AUTORESEARCH_FLOP_BUDGET": "1.5e10",  # the tiny runs' budget: one step (small model, or test_train's tiny one)
    "AUTORESEARCH_MAX_SEQ_LEN": "128",
    "AUTORESEARCH_EVAL_TOKENS": str(4 * 8 * 128),  # 4 eval batches of 8 rows
    "HF_ENDPOINT": "http://127.0.0.1:9",  # nothing listens there: no test can reach the real hub
    "AUTORESEARCH_DEVICE": "cpu",  # the same path on every machine; tests marked `gpu` use CUDA explicitly
    # Inductor checks each x86 vector ISA by loading a test library in a new Python (~1.3 s each, ~10 per
    # process that compiles for the CPU): the checks are the compiler's, not this project's.
    "TORCHINDUCTOR_VEC_ISA_OK": "1",
}
for _name in [n for n in os.environ if n.startswith(("AUTORESEARCH_", "HF_", "RAY_"))]:  # a user's exports stay out
    del os.environ[_name]
os.environ.update(TEST_ENV)

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A few documents in other scripts, so that the tokenizer and bpb see multi-byte UTF-8.
MULTILINGUAL = [
    "日本語のテキストです。東京は日本の首都で、人口が多い都市です。",
    "中文文本：北京是中国的首都，历史悠久，文化丰富。我们今天学习分词器。",
    "한국어 문장입니다. 서울은 대한민국의 수도입니다.",
    "Emoji 🙂🚀🎉 and flags 🇫🇷🇯🇵 mixed with text: naïve café, Zürich, São Paulo, Ελληνικά, русский.",
    "Math: ∑ᵢ xᵢ² ≤ ∞, ∀ε>0 ∃δ; arrows → ⇒ ↔; currency € £ ¥ ₹.",
]


def stdlib_documents(max_docs=900, max_chars=1500):
    """Real text that every machine with this Python has: the standard library's sources, split at blank
    lines into documents of at most max_chars characters."""
    lib = os.path.dirname(os.__file__)
    docs = []
    for name in sorted(os.listdir(lib)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(lib, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        doc = ""
        for para in text.split("\n\n"):
            if doc and len(doc) + len(para) > max_chars:
                docs.append(doc)
                doc = ""
            doc = f"{doc}\n\n{para}" if doc else para[:max_chars]
        if doc:
            docs.append(doc)
        if len(docs) >= max_docs:
            return docs[:max_docs]
    return docs


def write_source_corpus(folder, docs):
    """Spread documents over all the formats --source reads: .txt, .md, .jsonl and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.join(folder, "nested"), exist_ok=True)
    n = len(docs)
    a, b, c = n // 4, n // 2, 3 * n // 4
    for i, doc in enumerate(docs[:a]):
        ext = ".md" if i % 2 else ".txt"
        with open(os.path.join(folder, "nested", f"doc_{i:04d}{ext}"), "w", encoding="utf-8") as f:
            f.write(doc)
    with open(os.path.join(folder, "part.jsonl"), "w", encoding="utf-8") as f:
        for doc in docs[a:b]:
            f.write(json.dumps({"text": doc, "id": 1}, ensure_ascii=False) + "\n")
    pq.write_table(pa.table({"text": docs[b:c]}), os.path.join(folder, "part1.parquet"), row_group_size=100)
    pq.write_table(pa.table({"text": docs[c:]}), os.path.join(folder, "part2.parquet"), row_group_size=100)


@pytest.fixture(scope="session")
def corpus_docs():
    return stdlib_documents() + MULTILINGUAL * 3


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory, corpus_docs):
    folder = str(tmp_path_factory.mktemp("source"))
    write_source_corpus(folder, corpus_docs)
    return folder


@pytest.fixture(scope="session")
def prepared(source_dir):
    """The shared cache, prepared once through the real CLI entry point: `prepare.py --source DIR`."""
    import prepare
    prepare.main(["--source", source_dir])
    return _CACHE


@pytest.fixture
def damageable_cache(prepared, tmp_path):
    """The shared cache, for a test that damages it: put back byte for byte (mtimes too) afterwards, so that no
    later test depends on this test's rebuild."""
    pristine = tmp_path / "pristine"
    shutil.copytree(_CACHE, pristine)
    yield _CACHE
    shutil.rmtree(_CACHE)
    shutil.copytree(pristine, _CACHE)


@pytest.fixture(scope="session")
def tokenizer(prepared):
    import prepare
    return prepare.check_cache()


@pytest.fixture(autouse=True)
def _private_cwd(tmp_path, monkeypatch):
    """Every test runs in a folder of its own: a run's record (run.json) and logs never land in the repository."""
    monkeypatch.chdir(tmp_path)


def build_docs(build, split):
    """The documents of a split as a build holds them: its token files, decoded (each document's BOS dropped)."""
    import prepare
    tokenizer = prepare.Tokenizer.from_directory(build.path("tokenizer"), build)
    docs = []
    for name in build.shards(split):
        tokens, offsets, _ = build.open_tokens(name)
        docs += [tokenizer.decode(tokens[a + 1:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]
    return docs


def git(repo, *args):
    """Run git in repo as a fixed test identity; returns its stdout (fails the test on a git error)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.org",
           "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.org"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


def run_script(args, env=None, timeout=600, cwd=None):
    """Run a Python command with the test environment, as from the repo (its files first on the path), in a folder
    of its own (cwd, else a new temporary one) so that what a run writes there (run.json) never lands in the
    repository; a script named by its repo path (`train.py`) runs from the repo. Returns the CompletedProcess."""
    full_env = {**os.environ, **TEST_ENV, "PYTHONPATH": ROOT, **(env or {})}
    args = [os.path.join(ROOT, a) if i == 0 and a.endswith(".py") else a for i, a in enumerate(args)]
    with tempfile.TemporaryDirectory(prefix="autoresearch-test-run-") as own:
        return subprocess.run([sys.executable, *args], cwd=cwd or own, env=full_env, capture_output=True, text=True,
                              timeout=timeout)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


AGENT_FILES = ["train.py", "prepare.py", "constants.py", "autoresearch"]


def agent_repo(folder):
    """A git checkout as an agent's night starts: the project's files (as they are now) committed as `baseline`
    in folder/repo; returns its path."""
    repo = os.path.join(str(folder), "repo")
    os.makedirs(repo)
    for name in AGENT_FILES:
        if os.path.isdir(os.path.join(ROOT, name)):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(repo, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(os.path.join(ROOT, name), repo)
    git(repo, "init", "-q")
    git(repo, "add", *AGENT_FILES)
    git(repo, "commit", "-qm", "baseline")
    return repo


def edit_train(repo, old, new, message=None):
    """Replace `old` (which must be there) in repo's train.py; commit with message unless it is None."""
    path = os.path.join(repo, "train.py")
    text = open(path, encoding="utf-8").read()
    assert old in text, old
    open(path, "w", encoding="utf-8").write(text.replace(old, new))
    if message is not None:
        git(repo, "commit", "-qam", message)


def set_budget(monkeypatch, kind, amount):
    """Run the in-process tests' runs under another budget, as if the environment had said so at start: `time`
    (amount seconds) or `flops` (amount FLOPs), in constants and in what runtime checks against."""
    import constants
    from autoresearch import runtime
    name = "TIME_BUDGET" if kind == "time" else "FLOP_BUDGET"
    monkeypatch.setattr(constants, "BUDGET", kind)
    monkeypatch.setattr(constants, name, float(amount))
    fixed = {**runtime.FIXED, "BUDGET": kind, name: float(amount)}
    monkeypatch.setattr(runtime, "FIXED", type(runtime.FIXED)(fixed))


def run_train(repo, **env):
    """`timeout 600 uv run train.py > run.log 2>&1` in repo, on the tiny compute budget; returns (exit status, the
    log)."""
    with open(os.path.join(repo, "run.log"), "w") as log:
        proc = subprocess.run([sys.executable, "train.py"], cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                              timeout=600, env={**os.environ, **TEST_ENV, **env})
    return proc.returncode, open(os.path.join(repo, "run.log"), encoding="utf-8").read()


def record_cli(repo, status, description):
    """`uv run -m autoresearch.results record STATUS DESCRIPTION` in repo; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "autoresearch.results", "record", status, description], cwd=repo,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def in_a_run(tmp_path):
    """What runtime.main starts before train(): the run's record (yielded; run.json in tmp_path) and the FLOP count
    of the compute budget."""
    from autoresearch import flops, record, runtime
    run = record.start("train.py", "standard", {}, folder=str(tmp_path))
    with flops.counting() as runtime._meter:
        yield run
    runtime._meter = None
    record.stop()


@pytest.fixture(autouse=True)
def _no_leaked_dispatch_mode(request):
    """A test must not leave a dispatch mode (the FLOP counter) active: it would silently turn compiling off."""
    yield
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    assert _get_current_dispatch_mode() is None, f"{request.node.name} left a dispatch mode active"
