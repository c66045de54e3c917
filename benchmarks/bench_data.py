"""Data preparation speed: run_clm.py's data path against each tokenizer's own ceiling.

    python benchmarks/bench_data.py

For three tokenizers (the real GPT-2 one; a SentencePiece-style Llama one and a byte-level
Qwen2 one, both trained on train.txt once per run, as tests/tiny.py makes them) times on 1 core
and on all cores, each core count in a fresh process (benchmarks/datapath.py):
- the ceiling: the tokenizer alone encoding the text as one batch of line pieces;
- run_clm's data path: clm_data.load_splits + clm_data.tokenize on an empty datasets cache,
  what a training run does before its first step (read, cut, tokenize, group into blocks);
- the same with long documents read and encoded whole (clm_data.cut_rule forced to None), as
  for a tokenizer with no exact cut.
Prints tokens/s, the percentage of the ceiling, where the data path spends its time, and whether
it reaches 90% of the ceiling, per tokenizer.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import fmt, machine_line, print_table, training_text

from tiny import gpt2_tokenizer, llama_tokenizer, qwen2_tokenizer

PATHS = ("ceiling", "run_clm", "whole")
GOAL = 0.9  # run_clm's data path at 90% of the tokenizer's own throughput or more
LABELS = {
    "ceiling": "tokenizer alone, batched (ceiling)",
    "run_clm": "run_clm's data path",
    "whole": "run_clm's data path, whole documents",
}
TOKENIZERS = {"gpt2": gpt2_tokenizer, "llama": llama_tokenizer, "qwen2": qwen2_tokenizer}


def spawn(cores: str, args: argparse.Namespace, tokenizers: dict[str, Path], scratch: Path) -> dict:
    """Measure in a fresh process, so thread pools and caches start as a user's run would."""
    result = scratch / f"result-{cores}.json"
    command = [
        sys.executable, str(Path(__file__).resolve().parent / "datapath.py"),
        "--cores", cores,
        "--train_file", str(args.train_file),
        "--block_size", str(args.block_size),
        "--repeats", str(args.repeats),
        "--scratch", str(scratch),
        "--result", str(result),
        *(f"--tokenizer={name}={folder}" for name, folder in tokenizers.items()),
    ]  # fmt: skip
    # The library's default when nobody sets it; test runners often turn it off.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"bench_data.py: the {cores}-core measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text(encoding="utf-8"))


def rates(figures: dict, key: str) -> dict[str, float]:
    """Tokens per second of each path, from its best of the repeats."""
    return {path: figures["tokens"][path] / min(figures[key][path]) for path in PATHS}


def report(results: list[dict], source: str, repeats: int) -> None:
    rows, phase_rows = [], []
    for name in results[0]["tokenizers"]:
        for result in results:
            figures = result["tokenizers"][name]
            wall, cpu = rates(figures, "seconds"), rates(figures, "cpu_seconds")
            cores = f"{result['cores']} ({figures['free_cores']:.1f} free)"
            for path in PATHS:
                rows.append([
                    name, LABELS[path], cores, f"{figures['tokens'][path]:,}",
                    fmt(min(figures["seconds"][path])), f"{wall[path]:,.0f}",
                    f"{wall[path] / wall['ceiling']:.0%}", fmt(min(figures["cpu_seconds"][path])),
                    f"{cpu[path] / cpu['ceiling']:.0%}",
                ])  # fmt: skip
            phases = figures["phases"]
            parts = [phases.get(key, 0.0) for key in ("reading", "tokenizing", "grouping")]
            rest = phases["total"] - sum(parts)
            seconds = [*parts, rest, phases["total"]]
            phase_rows.append([name, str(result["cores"]), *map(fmt, seconds)])
    print_table(
        f"Data preparation: {source}; best of {repeats}",
        ["tokenizer", "path", "cores (free)", "tokens", "seconds", "tokens/s", "% of ceiling",
         "CPU s", "% of ceiling by CPU time"],
        rows,
    )  # fmt: skip
    print_table(
        "Where run_clm's data path spends its time (its fastest repeat, seconds)",
        ["tokenizer", "cores", "reading", "tokenizing", "grouping", "rest", "total"],
        phase_rows,
    )
    print()
    for name, figures in results[0]["tokenizers"].items():
        same = all(result["tokenizers"][name]["same_blocks"] for result in results)
        print(
            f"{name}: cut rule {figures['rule']!r}; whole-document blocks identical to run_clm's: "
            f"{'yes' if same else 'NO'} ({figures['block_tokens']:,} tokens in blocks)"
        )
    for name in results[0]["tokenizers"]:
        # Judged on wall time: what a user waits for.
        shares = [
            (result["cores"], rates(result["tokenizers"][name], "seconds")) for result in results
        ]
        shares = [(cores, rate["run_clm"] / rate["ceiling"]) for cores, rate in shares]
        verdict = "met" if all(share >= GOAL for _, share in shares) else "MISSED"
        listed = ", ".join(f"{share:.0%} on {cores} core(s)" for cores, share in shares)
        print(
            f"goal ({name}): run_clm's data path at {GOAL:.0%} of the ceiling or more: {verdict} ({listed})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--train_file",
        type=Path,
        default=None,
        help="Text to tokenize. Default: the repo's train.txt, else --megabytes of sample text.",
    )
    parser.add_argument(
        "--megabytes",
        type=float,
        default=5.0,
        help="Size of the sample text used when there is no train.txt (default 5).",
    )
    parser.add_argument(
        "--block_size", type=int, default=1024, help="Tokens per training block (default 1024)."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Times each path is timed; the best counts (default 3).",
    )
    parser.add_argument(
        "--cores",
        choices=["1", "all", "both"],
        default="both",
        help="Measure on one core, on all cores, or both (default).",
    )
    parser.add_argument(
        "--tokenizers",
        nargs="+",
        choices=list(TOKENIZERS),
        default=list(TOKENIZERS),
        help="Tokenizers to measure (default: all three).",
    )
    args = parser.parse_args()

    print(f"machine: {machine_line()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        scratch = Path(folder)
        args.train_file, source = training_text(args.train_file, args.megabytes, scratch)
        tokenizers = {}
        for name in args.tokenizers:
            # Trained once here; each measurement loads the saved folder, as run_clm.py does.
            tokenizers[name] = scratch / f"tokenizer-{name}"
            TOKENIZERS[name]().save_pretrained(tokenizers[name])
        wanted = ["1", "all"] if args.cores == "both" else [args.cores]
        results = [spawn(cores, args, tokenizers, scratch) for cores in wanted]
    report(results, source, args.repeats)


if __name__ == "__main__":
    main()
