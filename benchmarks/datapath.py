"""The measuring half of bench_data.py: one process, pinned to 1 core or given all of them.

    python benchmarks/datapath.py --cores 1 --train_file train.txt --result out.json

Times, on a fresh tokenizer each time, the tokenizer's batched ceiling, run_clm.tokenize() and
the proposed tokenize() below, and writes the seconds, token counts and phases as JSON.
bench_data.py starts one of these per core count and prints the tables.
"""

import argparse
import json
import os
import resource
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import datasets
import datasets.arrow_dataset
import datasets.fingerprint
import numpy as np
from benchlib import free_cores
from transformers import AutoTokenizer, TrainingArguments

import run_clm
from tiny import gpt2_tokenizer

PATHS = ("ceiling", "run_clm", "whole")


@contextmanager
def whole_documents():
    """run_clm.tokenize() as if line pieces were not exact for the tokenizer: each document is
    encoded in one call (the way run_clm.py worked before, and still works for other tokenizers)."""
    original = run_clm.tokenizer_identity

    def identity(tokenizer):
        return original(tokenizer)[0], False

    run_clm.tokenizer_identity = identity
    try:
        yield
    finally:
        run_clm.tokenizer_identity = original


@contextmanager
def phase_clock(phases: dict[str, float]):
    """Adds to `phases` the seconds of each map run_clm.tokenize() makes and, apart, the part of
    each spent hashing its function and arguments for the datasets cache."""
    original_fingerprint = datasets.fingerprint.update_fingerprint
    original_map = datasets.Dataset.map
    current = ["outside any map"]

    def add(name: str, seconds: float) -> None:
        phases[name] = phases.get(name, 0.0) + seconds

    def timed_fingerprint(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original_fingerprint(*args, **kwargs)
        finally:
            add(f"{current[0]}: hashing", time.perf_counter() - start)

    def timed_map(self, *args, **kwargs):
        current[0] = "grouping" if "Grouping" in str(kwargs.get("desc")) else "tokenizing"
        start = time.perf_counter()
        try:
            return original_map(self, *args, **kwargs)
        finally:
            add(current[0], time.perf_counter() - start)
            current[0] = "outside any map"

    # Dataset.map calls the copy arrow_dataset imported; the decorators call fingerprint's.
    holders = (datasets.fingerprint, datasets.arrow_dataset)
    for holder in holders:
        holder.update_fingerprint = timed_fingerprint
    datasets.Dataset.map = timed_map
    try:
        yield phases
    finally:
        for holder in holders:
            holder.update_fingerprint = original_fingerprint
        datasets.Dataset.map = original_map


def cpu_time() -> float:
    """CPU seconds of this process and of its finished children (datasets' map workers).

    It moves less than wall time when other jobs share the machine (in a virtual machine, time
    the host takes away can still count); on several cores it shows overhead, not speed-up.
    """
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def flat_ids(blocks: datasets.DatasetDict) -> np.ndarray:
    return blocks["train"].data.column("input_ids").combine_chunks().flatten().to_numpy()


def measure(args: argparse.Namespace) -> dict:
    """One process's share: every path on this process's cores, `repeats` times, interleaved."""
    if args.cores == "1":
        # Rust's thread pool and datasets' workers both size themselves from this process's CPUs.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    cores = len(os.sched_getaffinity(0))
    workers = cores
    scratch = Path(args.scratch)
    datasets.disable_progress_bars()
    # run_clm.py loads its tokenizer from a folder; so do the measurements.
    saved = scratch / f"tokenizer-{args.cores}"
    gpt2_tokenizer().save_pretrained(saved)

    data = run_clm.DataArguments(
        train_file=str(args.train_file), overwrite_cache=True, preprocessing_num_workers=workers
    )
    training = TrainingArguments(output_dir=str(scratch / "out"), report_to="none")
    start = time.perf_counter()
    texts = run_clm.load_texts(data)
    read_s = time.perf_counter() - start
    text = Path(args.train_file).read_text(encoding="utf-8")
    pieces = run_clm.line_pieces(text)

    seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    cpu_seconds: dict[str, list[float]] = {path: [] for path in PATHS}
    tokens: dict[str, int] = {}
    phases: dict[str, float] = {}
    outputs = {}
    for repeat in range(args.repeats):
        # A fresh tokenizer each time: its word cache would flatter whoever runs second.
        order = PATHS[repeat % len(PATHS) :] + PATHS[: repeat % len(PATHS)]
        for path in order:
            tokenizer = AutoTokenizer.from_pretrained(saved)
            start, cpu_start = time.perf_counter(), cpu_time()
            if path == "ceiling":
                encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
                elapsed = time.perf_counter() - start
                tokens[path] = sum(len(ids) for ids in encoded)
            else:
                timed: dict[str, float] = {}
                with phase_clock(timed), whole_documents() if path == "whole" else nullcontext():
                    blocks = run_clm.tokenize(texts, tokenizer, data, args.block_size, training)
                elapsed = time.perf_counter() - start
                if repeat == 0 and path == "run_clm":
                    phases = {**timed, "total": elapsed}
                tokens[path] = len(blocks["train"]) * args.block_size
                outputs[path] = blocks
            seconds[path].append(elapsed)
            cpu_seconds[path].append(cpu_time() - cpu_start)

    run_ids, whole_ids = flat_ids(outputs["run_clm"]), flat_ids(outputs["whole"])
    return {
        "cores": cores,
        "free_cores": free_cores(),
        "read_s": read_s,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": tokens,
        "phases": phases,
        "same_blocks": bool(np.array_equal(run_ids, whole_ids)),
        "block_tokens": len(run_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cores", choices=["1", "all"], required=True, help="Pin to one core, or use all."
    )
    parser.add_argument("--train_file", required=True, help="Text to tokenize.")
    parser.add_argument(
        "--block_size", type=int, default=1024, help="Tokens per training block (default 1024)."
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="Times each path is timed (default 2)."
    )
    parser.add_argument("--scratch", required=True, help="Folder for caches and the tokenizer.")
    parser.add_argument("--result", required=True, help="JSON file to write the figures to.")
    args = parser.parse_args()
    Path(args.result).write_text(json.dumps(measure(args)), encoding="utf-8")


if __name__ == "__main__":
    main()
