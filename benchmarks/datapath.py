"""The measuring half of bench_data.py: one process, pinned to 1 core or given all of them.

    python benchmarks/datapath.py --cores 1 --train_file train.txt --tokenizer gpt2=DIR --result out.json

For each tokenizer (a saved folder), times on a fresh tokenizer each time the tokenizer's batched
ceiling, run_clm.py's data path (clm_data.load_splits + clm_data.tokenize, on an empty datasets
cache) and the same path with long documents read whole, and writes the seconds, CPU seconds,
token counts and phases as JSON. bench_data.py starts one of these per core count.
"""

import argparse
import json
import os
import resource
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import datasets
import numpy as np
from benchlib import free_cores
from transformers import AutoTokenizer, TrainingArguments

import clm_data

PATHS = ("ceiling", "run_clm", "whole")


@contextmanager
def whole_documents():
    """run_clm.py's data path as for a tokenizer with no exact cut: every document in one call."""
    original = clm_data.cut_rule
    clm_data.cut_rule = lambda tokenizer: None
    try:
        yield
    finally:
        clm_data.cut_rule = original


@contextmanager
def map_clock(phases: dict[str, float]):
    """Adds to `phases` the seconds of the tokenizing and the grouping maps of clm_data.tokenize."""
    original = datasets.Dataset.map

    def timed_map(self, *args, **kwargs):
        phase = "grouping" if "Grouping" in str(kwargs.get("desc")) else "tokenizing"
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - start

    datasets.Dataset.map = timed_map
    try:
        yield
    finally:
        datasets.Dataset.map = original


def cpu_time() -> float:
    """CPU seconds of this process and of its finished children (datasets' map workers, if any).

    It moves less than wall time when other jobs share the machine (in a virtual machine, time
    the host takes away can still count); on several cores it shows overhead, not speed-up.
    """
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def data_path(tokenizer, data, training, block_size: int, phases: dict) -> datasets.Dataset:
    """What run_clm.py does with a text file before its first step: read it, tokenize, group."""
    start = time.perf_counter()
    # model_args matters only for --dataset_name.
    records = clm_data.load_splits(data, tokenizer, None)
    phases["reading"] = time.perf_counter() - start
    with map_clock(phases):
        return clm_data.tokenize(records, tokenizer, data, block_size, training)["train"]


def measure_one(folder: Path, text: str, args: argparse.Namespace, scratch: Path) -> dict:
    """Every path for one tokenizer, `repeats` times, interleaved, each on an empty cache."""
    free = free_cores()  # here, not once per process: a neighbour's job comes and goes
    rule = clm_data.cut_rule(AutoTokenizer.from_pretrained(folder))
    # The ceiling gets the tokenizer's best case: a batch of line pieces, whatever the rule.
    pieces = clm_data.pieces(text, rule or "\n")
    data = clm_data.DataArguments(train_file=str(args.train_file))
    training = TrainingArguments(output_dir=str(scratch / "unused"), report_to="none")
    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu_seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    tokens: dict[str, int] = {}
    phases: dict[str, float] = {}
    blocks = {}
    for repeat in range(args.repeats):
        order = PATHS[repeat % len(PATHS) :] + PATHS[: repeat % len(PATHS)]
        for path in order:
            # A fresh tokenizer each time: its word cache would flatter whoever runs second.
            tokenizer = AutoTokenizer.from_pretrained(folder)
            # An empty cache each time, so every repeat reads and tokenizes as a first run does.
            cache = scratch / f"cache-{folder.name}-{repeat}-{path}"
            datasets.config.HF_DATASETS_CACHE = cache
            timed: dict[str, float] = {}
            start, cpu_start = time.perf_counter(), cpu_time()
            if path == "ceiling":
                fast = tokenizer.backend_tokenizer.encode_batch_fast(
                    pieces, add_special_tokens=False
                )
                encoded = [encoding.ids for encoding in fast]
            else:
                with whole_documents() if path == "whole" else nullcontext():
                    train = data_path(tokenizer, data, training, args.block_size, timed)
            elapsed = time.perf_counter() - start
            seconds[path].append(elapsed)
            cpu_seconds[path].append(cpu_time() - cpu_start)
            if path == "ceiling":
                tokens[path] = sum(len(ids) for ids in encoded)
            else:
                tokens[path] = len(train) * args.block_size
                blocks[path] = train.data.column("input_ids").combine_chunks().flatten().to_numpy()
            if path == "run_clm" and elapsed <= min(seconds[path]):
                phases = {**timed, "total": elapsed}  # of the fastest repeat, as the table
            shutil.rmtree(cache, ignore_errors=True)
    return {
        "free_cores": free,
        "rule": rule,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": tokens,
        "phases": phases,
        "same_blocks": bool(np.array_equal(blocks["run_clm"], blocks["whole"])),
        "block_tokens": len(blocks["run_clm"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cores", choices=["1", "all"], required=True, help="Pin to one core, or use all."
    )
    parser.add_argument("--train_file", type=Path, required=True, help="Text to tokenize.")
    parser.add_argument(
        "--tokenizer",
        action="append",
        required=True,
        metavar="NAME=FOLDER",
        help="A saved tokenizer to measure (repeatable).",
    )
    parser.add_argument(
        "--block_size", type=int, default=1024, help="Tokens per training block (default 1024)."
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="Times each path is timed (default 2)."
    )
    parser.add_argument("--scratch", type=Path, required=True, help="Folder for the caches.")
    parser.add_argument("--result", type=Path, required=True, help="JSON file for the figures.")
    args = parser.parse_args()
    if args.cores == "1":
        # Rust's thread pool and datasets' workers both size themselves from this process's CPUs.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    datasets.disable_progress_bars()
    text = args.train_file.read_text(encoding="utf-8")
    results = {}
    for entry in args.tokenizer:
        name, _, folder = entry.partition("=")
        results[name] = measure_one(Path(folder), text, args, args.scratch)
    summary = {"cores": len(os.sched_getaffinity(0)), "tokenizers": results}
    args.result.write_text(json.dumps(summary), encoding="utf-8")


if __name__ == "__main__":
    main()
