"""Fixed constants shared by prepare.py and train.py. DO NOT CHANGE: they define the task and its metric.

Every number here is the reference design's (see README.md), so that val_bpb figures compare across users.
A few environment overrides exist for tests and small machines only; a run that sets any of the metric's ones
(preset, time budget, eval size, context length) compares only with runs under the same settings:
  AUTORESEARCH_PRESET        small: the small preset (a CPU, Apple silicon, a small GPU; docs/PLATFORMS.md)
  AUTORESEARCH_FORCE         1: run the standard configuration off CUDA anyway (it would take hours per step)
  AUTORESEARCH_CACHE_DIR     where data, tokenizer and token files live (default ~/.cache/autoresearch)
  AUTORESEARCH_BUDGET        time or flops: what ends training (default: time, flops under the small preset)
  AUTORESEARCH_TIME_BUDGET   seconds of training under the time budget (default 300)
  AUTORESEARCH_FLOP_BUDGET   FLOPs of training under the compute budget (default: see FLOP_BUDGET below)
  AUTORESEARCH_EVAL_TOKENS   validation tokens scored by evaluate_bpb (default 40 * 524288)
  AUTORESEARCH_MAX_SEQ_LEN   context length (default 2048)
  AUTORESEARCH_GPU_MEMORY_GB the GPU memory train.py fits DEVICE_BATCH_SIZE to (default: what is free)
  HF_ENDPOINT                the dataset hub, for mirrors (default https://huggingface.co)
  HF_HUB_OFFLINE, HF_TOKEN   the hub's conventions: 1 = never download; a token sent with every download
  AUTORESEARCH_DEVICE        cpu, cuda or mps: the training device (default: CUDA if torch can use it, else MPS,
                             else the CPU; an NVIDIA GPU that torch cannot use is an error unless this says cpu)
Each is checked here, where it is read: a bad value stops the program with one line.
"""
import math
import os

from autoresearch.errors import UserError


def _env(name, default, parse, ok, allowed, unset_means=None):
    """An override from the environment: a bad value stops the program with one line saying what it may be."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise UserError(f"{name}={raw!r} is not allowed: it must be {allowed} (unset it for "
                        f"{unset_means or f'the default, {default}'})")
    return value


# The defaults are the reference's; a run whose values differ from them is not comparable with a standard one.
# The compute budget (flops) ends training after a fixed number of FLOPs, counted by the fixed code from what each
# step computes (runtime.Run): the same code takes the same steps on any machine at any load. The standard one is
# what the reference's baseline computed in its 5 minutes on an H100: 953 steps of 1.543e14 FLOPs as torch's
# counter counts the baseline's step on the CPU (2.936e8 per token forward and backward, every key of the windowed
# layers counted, plus 3.2e11 for Muon). The small one is 99 steps of the small baseline (4.045e10 each), about
# 65 s of training on a quiet 2-core CPU (docs/PERF_NOTES.md).
DEFAULTS = {"MAX_SEQ_LEN": 2048, "TIME_BUDGET": 300.0, "EVAL_TOKENS": 40 * 524288, "BUDGET": "time",
            "FLOP_BUDGET": 1.47e17}
# The small preset, for machines without a big CUDA GPU (a CPU, Apple silicon, a small GPU): these constants, and
# train.py's size knobs at their small values. Its runs compare with each other, not with standard ones.
PRESET = _env("AUTORESEARCH_PRESET", "", str.lower, lambda v: v == "small", "small", "the standard settings")
SMALL = PRESET == "small"  # train.py's size knobs take their small values (X in `X if SMALL else Y`)
SMALL_DEFAULTS = {"MAX_SEQ_LEN": 256, "TIME_BUDGET": 60.0, "EVAL_TOKENS": 256 * 256, "BUDGET": "flops",
                  "FLOP_BUDGET": 4e12}
_BASE = SMALL_DEFAULTS if PRESET == "small" else DEFAULTS
MAX_SEQ_LEN = _env("AUTORESEARCH_MAX_SEQ_LEN", _BASE["MAX_SEQ_LEN"], int, lambda v: 8 <= v <= 1 << 20,
                   "an integer from 8 to 1048576")  # context length of training and eval
TIME_BUDGET = _env("AUTORESEARCH_TIME_BUDGET", _BASE["TIME_BUDGET"], float,
                   lambda v: math.isfinite(v) and 0 < v <= 7 * 86400,
                   "a number of seconds above 0 (at most a week)")  # seconds of counted training time
BUDGET = _env("AUTORESEARCH_BUDGET", _BASE["BUDGET"], str.lower, lambda v: v in ("time", "flops"),
              "time or flops")  # what ends training: TIME_BUDGET seconds, or FLOP_BUDGET FLOPs
# At most what one GPU computes in a week at an H100's dense bf16 peak (989.5e12 FLOP/s x 604,800 s), as
# TIME_BUDGET is at most a week: a larger number is a typo, not a night's experiment.
MAX_FLOP_BUDGET = 6e20
FLOP_BUDGET = _env("AUTORESEARCH_FLOP_BUDGET", _BASE["FLOP_BUDGET"], float,
                   lambda v: math.isfinite(v) and 1 <= v <= MAX_FLOP_BUDGET,
                   "a number of FLOPs from 1 to 6e20, a week of an H100 (e.g. 2e12)")  # FLOPs under the compute budget
EVAL_TOKENS = _env("AUTORESEARCH_EVAL_TOKENS", _BASE["EVAL_TOKENS"], int, lambda v: 1 <= v <= 1 << 40,
                   "a positive integer, at least one row (MAX_SEQ_LEN)")  # tokens evaluate_bpb scores
if EVAL_TOKENS < MAX_SEQ_LEN:  # evaluate_bpb scores EVAL_TOKENS // MAX_SEQ_LEN rows: at least one
    raise UserError(f"AUTORESEARCH_EVAL_TOKENS={str(EVAL_TOKENS)!r} is not allowed: it must be at least one "
                    f"row of MAX_SEQ_LEN = {MAX_SEQ_LEN} tokens")
RESOLVED = {"MAX_SEQ_LEN": MAX_SEQ_LEN, "TIME_BUDGET": TIME_BUDGET, "EVAL_TOKENS": EVAL_TOKENS, "BUDGET": BUDGET,
            "FLOP_BUDGET": FLOP_BUDGET}  # as read at start


def _written(value):
    """A number written one way: short (`2e+11`, `300`) where that is exact, else in full."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


# The overrides of the metric's constants that this process runs under (name -> value), for the run's notes: the
# budget's kind when it is not the preset's, and only the size of the budget that runs; each only where its value
# differs from the preset's, written one way (2.0e11 and 2e11 are both 2e+11), so that equal values compare equal.
METRIC_OVERRIDES = {f"AUTORESEARCH_{name}": _written(RESOLVED[name]) for name in
                    ("MAX_SEQ_LEN", "EVAL_TOKENS", "TIME_BUDGET" if BUDGET == "time" else "FLOP_BUDGET")
                    if RESOLVED[name] != _BASE[name]}
if BUDGET != _BASE["BUDGET"]:
    METRIC_OVERRIDES["AUTORESEARCH_BUDGET"] = BUDGET
# What a run's val_bpb compares with: "standard", or the preset and overrides it ran under (the `settings:` line).
SETTINGS = " ".join(([f"AUTORESEARCH_PRESET={PRESET}"] if PRESET else [])
                    + [f"{name}={value}" for name, value in sorted(METRIC_OVERRIDES.items())]) or "standard"
# Off CUDA only the small preset runs (the standard configuration would take hours per step) unless this is set.
FORCE = _env("AUTORESEARCH_FORCE", False, lambda v: v in ("1", "true", "yes"), lambda v: v, "1", "no forcing")
# The GPU memory train.py may plan for, in GB (default: what the GPU has free), e.g. to try a 24 GB card's batch.
GPU_MEMORY_GB = _env("AUTORESEARCH_GPU_MEMORY_GB", 0.0, float, lambda v: math.isfinite(v) and v > 0,
                     "a positive number of GB", "the memory the GPU has free")
VOCAB_SIZE = 8192  # 8188 learned BPE tokens + 4 special tokens

DEVICE = _env("AUTORESEARCH_DEVICE", "", str.lower, lambda v: v in ("cpu", "cuda", "mps"), "cpu, cuda or mps",
              "the best device found")

# Cache layout: CACHE_DIR/data (the hub's parquet shards), CACHE_DIR/builds/<build id> (a tokenizer and token files,
# never changed once made; autoresearch/cache.py), CACHE_DIR/current (the id of the build train.py reads).
if not os.environ.get("AUTORESEARCH_CACHE_DIR") and os.environ.get("HOME", None) == "":
    raise UserError("HOME is set but empty, so the cache would land in /.cache: set HOME, or "
                    "AUTORESEARCH_CACHE_DIR to the cache folder")
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "autoresearch")
CACHE_DIR = os.path.abspath(os.path.expanduser(os.environ.get("AUTORESEARCH_CACHE_DIR") or DEFAULT_CACHE_DIR))
DATA_DIR = os.path.join(CACHE_DIR, "data")
BUILDS_DIR = os.path.join(CACHE_DIR, "builds")
POINTER_PATH = os.path.join(CACHE_DIR, "current")

# Data: one `text` column per parquet shard. The last shard is pinned as validation; training uses the others.
HF_ENDPOINT = _env("HF_ENDPOINT", "https://huggingface.co", lambda v: v.rstrip("/"),
                   lambda v: v.startswith(("http://", "https://")) and len(v) > len("https://"),
                   "an http:// or https:// address")
HF_HUB_OFFLINE = _env("HF_HUB_OFFLINE", False, str.lower, lambda v: v in ("1", "true", "yes", "0", "false", "no"),
                      "1 or 0", "downloads allowed") in ("1", "true", "yes")  # the hub's convention: never download
HF_TOKEN = os.environ.get("HF_TOKEN", "").strip()  # the hub's convention: sent as a bearer token when set
DATASET_REPO = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542  # shards are shard_00000.parquet ... shard_06542.parquet
VAL_SHARD = MAX_SHARD
DEFAULT_NUM_SHARDS = 10  # training shards that prepare.py downloads by default


def shard_name(index):
    """The file name of shard `index`: shard_00042.parquet."""
    return f"shard_{index:05d}.parquet"


def shard_url(index, endpoint=HF_ENDPOINT):
    """Where the hub (or a mirror at endpoint) serves shard `index`."""
    return f"{endpoint}/datasets/{DATASET_REPO}/resolve/main/{shard_name(index)}"


# Tokenizer: the GPT-4 split pattern with numbers grouped in runs of 1-2 digits (not 1-3).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]  # ids follow the learned tokens
BOS_TOKEN = SPECIAL_TOKENS[0]  # every document starts with it
TOKENIZER_MAX_DOC_CHARS = 10_000  # each training document is cut to this many characters ...
TOKENIZER_MAX_CHARS = 1_000_000_000  # ... and tokenizer training reads at most this many in total

# Dataloader packing (best fit): buffer of documents to choose from, documents added per refill.
LOADER_BUFFER_DOCS = 1000
LOADER_REFILL_DOCS = 128
