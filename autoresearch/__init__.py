"""The fixed harness around train.py. DO NOT CHANGE: it decides what a run's numbers mean.

    errors.py    the one error a user (or the agent) must act on: `error: <what to do>`, exit status 1
    cache.py     the cache: the hub's shards, and immutable builds (tokenizer, token files) named by a pointer
    download.py  fetching shards from the hub (or a mirror)
    source.py    building shards from a local corpus (prepare.py --source)
    hardware.py  the device, its precision, compiling, memory, peak FLOP/s
    runtime.py   the run: the budget (FLOPs or time), progress lines, the checks, the summary
    flops.py     the compute budget's counter: every FLOP from the start of train() to the metric
    record.py    the run's record (run.json), written by the fixed code only
    results.py   the experiment log: `uv run -m autoresearch.results` (standard library only): reading, verdicts
    recording.py `results record`: which run a log is, the rules it must have run under, its row
    verify.py    `results verify`: the best kept commits run again from a clean tree
    bench.py     benchmarks: `uv run -m autoresearch.bench ...`
    fleet.py     several GPUs: `uv run -m autoresearch.fleet ...` (Ray)

Importing the package imports nothing: each module is loaded only where it is used.
"""
