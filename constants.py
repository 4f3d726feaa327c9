"""Fixed constants shared by prepare.py and train.py. DO NOT CHANGE: they define the task and its metric.

Every number here is the reference design's (see README.md), so that val_bpb figures compare across users.
A few environment overrides exist for tests and small machines only; a run that sets any of them is not
comparable with a standard one:
  AUTORESEARCH_CACHE_DIR     where data, tokenizer and token files live (default ~/.cache/autoresearch)
  AUTORESEARCH_TIME_BUDGET   seconds of training (default 300)
  AUTORESEARCH_EVAL_TOKENS   validation tokens scored by evaluate_bpb (default 40 * 524288)
  AUTORESEARCH_MAX_SEQ_LEN   context length (default 2048)
  HF_ENDPOINT                the dataset hub, for mirrors (default https://huggingface.co)
"""
import os

MAX_SEQ_LEN = int(os.environ.get("AUTORESEARCH_MAX_SEQ_LEN", 2048))  # context length of training and eval
TIME_BUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))  # seconds of counted training time
EVAL_TOKENS = int(os.environ.get("AUTORESEARCH_EVAL_TOKENS", 40 * 524288))  # tokens scored by evaluate_bpb
VOCAB_SIZE = 8192  # 8188 learned BPE tokens + 4 special tokens

# Cache layout: CACHE_DIR/data (parquet shards), CACHE_DIR/tokenizer, CACHE_DIR/tokens (pre-tokenized shards).
CACHE_DIR = os.path.abspath(os.path.expanduser(
    os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join("~", ".cache", "autoresearch")))
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
TOKENS_DIR = os.path.join(CACHE_DIR, "tokens")

# Data: one `text` column per parquet shard. The last shard is pinned as validation; training uses the others.
HF_ENDPOINT = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
DATASET_REPO = "karpathy/climbmix-400b-shuffle"
MAX_SHARD = 6542  # shards are shard_00000.parquet ... shard_06542.parquet
VAL_SHARD = MAX_SHARD
DEFAULT_NUM_SHARDS = 10  # training shards that prepare.py downloads by default


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def shard_url(index, endpoint=HF_ENDPOINT):
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
