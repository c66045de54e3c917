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
from contextlib import contextmanager
from pathlib import Path

import datasets
import datasets.arrow_dataset
import datasets.fingerprint
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from benchlib import free_cores
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments

import run_clm
from tiny import gpt2_tokenizer

# Pieces this long keep every core busy yet make the per-piece overhead negligible.
PIECE_CHARS = 1 << 16
PATHS = ("ceiling", "run_clm", "proposed")


def line_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters, only where GPT-2's BPE cuts anyway.

    A cut follows a newline with non-space characters on both sides: GPT-2's pre-tokenizer ends
    a token before and after such a newline, so the pieces' tokens joined are the text's tokens.
    """
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and (
            text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()
        ):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def column_tokens(dataset: datasets.Dataset) -> int:
    """Tokens in a list column, counted by Arrow without turning rows into Python lists."""
    return int(pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py() or 0)


def proposed_tokenize(
    texts: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    workers: int,
) -> datasets.DatasetDict:
    """run_clm.tokenize() for concatenated text, with three changes and the same blocks out:

    1. long documents are encoded as a batch of line-aligned pieces, which the Rust tokenizer
       spreads over all cores (one 5 MB string runs on one core, and slower per token);
    2. the cache fingerprint comes from the tokenizer's JSON, so `datasets` does not pickle the
       tokenizer through dill on every map (seconds, whatever the data size);
    3. token ids leave encode() as NumPy arrays, and grouping and the length check run on
       Arrow/NumPy arrays: `datasets` inspects every element of a Python list it writes.
    """
    eos = tokenizer.eos_token_id
    identity = datasets.fingerprint.Hasher.hash_bytes(
        tokenizer.backend_tokenizer.to_str().encode("utf-8")
    )

    def encode(batch: dict) -> dict:
        pieces, owners = [], []
        for row, text in enumerate(batch["text"]):
            for piece in line_pieces(text):
                pieces.append(piece)
                owners.append(row)
        encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
        rows: list[list[int]] = [[] for _ in batch["text"]]
        for owner, ids in zip(owners, encoded, strict=True):
            rows[owner].extend(ids)
        # NumPy rows skip the per-element type scan `datasets` runs on Python lists.
        return {"input_ids": [np.array([*row, eos], dtype=np.int64) for row in rows]}

    def group(table: pa.Table) -> dict:
        flat = table.column("input_ids").combine_chunks().flatten().to_numpy()
        usable = len(flat) - len(flat) % block_size
        blocks = flat[:usable].reshape(-1, block_size)
        return {"input_ids": blocks, "labels": blocks.copy()}

    shaped = {}
    for split, dataset in texts.items():
        rows = len(dataset)
        ids = dataset.map(
            encode,
            batched=True,
            batch_size=256,
            # Forked workers only pay off with many rows; pieces already use every core.
            num_proc=workers if rows >= 4 * workers and workers > 1 else None,
            remove_columns=["text"],
            load_from_cache_file=False,
            new_fingerprint=f"{dataset._fingerprint}-{identity}-encode",
            desc="Tokenizing (proposed)",
        )
        if column_tokens(ids) < block_size:
            raise ValueError(f"{split}: fewer tokens than one block of {block_size}")
        shaped[split] = ids.with_format("arrow").map(
            group,
            batched=True,
            batch_size=None,
            load_from_cache_file=False,
            new_fingerprint=f"{ids._fingerprint}-group-{block_size}",
            desc=f"Grouping into blocks of {block_size} (proposed)",
        )
    return datasets.DatasetDict(shaped).with_format(None)


@contextmanager
def phase_clock(phases: dict[str, float]):
    """Adds to `phases` the seconds of each map run_clm.tokenize() makes and, apart, the part of
    each spent hashing its function and arguments for the datasets cache."""
    original_fingerprint = datasets.fingerprint.update_fingerprint
    original_map = datasets.DatasetDict.map
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
    datasets.DatasetDict.map = timed_map
    try:
        yield phases
    finally:
        for holder in holders:
            holder.update_fingerprint = original_fingerprint
        datasets.DatasetDict.map = original_map


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
    pieces = line_pieces(text)

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
            elif path == "run_clm":
                timed: dict[str, float] = {}
                with phase_clock(timed):
                    blocks = run_clm.tokenize(texts, tokenizer, data, args.block_size, training)
                elapsed = time.perf_counter() - start
                if repeat == 0:
                    phases = {**timed, "total": elapsed}
                tokens[path] = len(blocks["train"]) * args.block_size
                outputs[path] = blocks
            else:
                blocks = proposed_tokenize(texts, tokenizer, args.block_size, workers)
                elapsed = time.perf_counter() - start
                tokens[path] = len(blocks["train"]) * args.block_size
                outputs[path] = blocks
            seconds[path].append(elapsed)
            cpu_seconds[path].append(cpu_time() - cpu_start)

    run_ids, proposed_ids = flat_ids(outputs["run_clm"]), flat_ids(outputs["proposed"])
    return {
        "cores": cores,
        "free_cores": free_cores(),
        "read_s": read_s,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "tokens": tokens,
        "phases": phases,
        "same_blocks": bool(np.array_equal(run_ids, proposed_ids)),
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
