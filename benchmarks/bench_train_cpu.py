"""Training speed on CPU: our full DeepSpeed path, the plain Trainer and LoRA, in one run.

    python benchmarks/bench_train_cpu.py

Trains a small GPT-2 (2 layers of GPT-2's real width and vocabulary, random weights) with
run_clm.py, the way the guide launches it, and the same run without DeepSpeed:
- deepspeed: `deepspeed --num_gpus=1 run_clm.py --deepspeed ds_config.json ...` (ZeRO-2, Adam
  offloaded to DeepSpeedCPUAdam), activations recomputed (run_clm.py's default);
- plain: `python run_clm.py ...` with the same model, data, batch and checkpointing (torch AdamW);
- lora: plain with `--use_peft` (a LoRA adapter on every linear layer, run_clm.py's defaults);
- deepspeed and plain again with `--gradient_checkpointing False`, to price the recomputation.
Each step is timed inside the training loop (benchmarks/timed_run_clm.py); the first steps and
any step that saved a checkpoint are left out of the per-step figures. The one-time build of
DeepSpeed's CPU ops is measured on its own, in an empty extensions folder.
Only ratios between rows are meant to travel to other machines; absolute CPU speeds do not.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import (
    REPO,
    deepspeed_launcher,
    fmt,
    free_cores,
    machine_line,
    median,
    print_table,
    training_text,
)
from transformers import GPT2Config, GPT2LMHeadModel

from tiny import gpt2_tokenizer

HERE = Path(__file__).resolve().parent
# name: (DeepSpeed or not, activation checkpointing, changes to ds_config.json's
# zero_optimization, more run_clm.py flags)
VARIANTS = {
    "deepspeed": (True, True, {}, []),
    "plain": (False, True, {}, []),
    "lora": (False, True, {}, ["--use_peft"]),
    "deepspeed-no-ckpt": (True, False, {}, []),
    "plain-no-ckpt": (False, False, {}, []),
    # Candidate DeepSpeed settings, run on request (--variants) to price a proposed change.
    "deepspeed-no-overlap": (True, True, {"overlap_comm": False}, []),
    "deepspeed-buckets-5e7": (
        True,
        True,
        {"allgather_bucket_size": 5e7, "reduce_bucket_size": 5e7},
        [],
    ),
    "deepspeed-no-pin": (
        True,
        True,
        {"offload_optimizer": {"device": "cpu", "pin_memory": False}},
        [],
    ),
}
DEFAULT_VARIANTS = ["deepspeed", "plain", "lora", "deepspeed-no-ckpt", "plain-no-ckpt"]
BUILD_SCRIPT = """
import sys, time
from deepspeed.accelerator import get_accelerator
names = ["CPUAdamBuilder"]
if get_accelerator().device_name() == "cpu":
    names.append("ShareMemCommBuilder")
for name in names:
    start = time.perf_counter()
    get_accelerator().create_op_builder(name).load()
    print(name, time.perf_counter() - start, flush=True)
"""


def save_model(folder: Path, layers: int, width: int, heads: int, seed: int) -> int:
    """A GPT-2 of real width and vocabulary but few layers, saved as run_clm.py expects."""
    import torch

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, n_positions=1024)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def cut_text(source: Path, tokens: int, target: Path) -> Path:
    """Enough of `source` for `tokens` tokens (GPT-2 averages under 5 characters a token)."""
    text = source.read_text(encoding="utf-8")
    wanted = tokens * 6
    while len(text) < wanted:
        text += "\n\n" + text
    target.write_text(text[:wanted], encoding="utf-8")
    return target


def run_variant(
    name: str, args: argparse.Namespace, model: Path, data: Path, scratch: Path
) -> dict:
    deepspeed, checkpointing, changes, extra = VARIANTS[name]
    output = scratch / name
    timings = scratch / f"{name}.json"
    timings.unlink(missing_ok=True)
    flags = [
        "--model_name_or_path", str(model),
        "--train_file", str(data),
        "--do_train",
        "--output_dir", str(output),
        "--overwrite_output_dir",
        "--max_steps", str(args.steps),
        "--block_size", str(args.block_size),
        "--per_device_train_batch_size", str(args.batch),
        "--gradient_accumulation_steps", str(args.accumulation),
        "--logging_steps", "1",
        "--save_steps", str(args.save_at),
        "--report_to", "none",
        "--seed", "0",
        *extra,
    ]  # fmt: skip
    if not checkpointing:
        flags += ["--gradient_checkpointing", "False"]
    script = [str(HERE / "timed_run_clm.py"), "--timings", str(timings)]
    if not deepspeed:
        command = [sys.executable, *script, *flags]
    else:
        config_path = REPO / "ds_config.json"
        if changes:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["zero_optimization"].update(changes)
            config_path = scratch / f"{name}.ds_config.json"
            config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        command = [*deepspeed_launcher(), *script, "--deepspeed", str(config_path), *flags]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    # A CPU benchmark everywhere: no GPU for the plain Trainer, the CPU accelerator for DeepSpeed.
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not timings.is_file():
        sys.exit(
            f"bench_train_cpu.py: the {name} run failed:\n{(done.stdout + done.stderr)[-4000:]}"
        )
    result = json.loads(timings.read_text(encoding="utf-8"))
    result["command_s"] = wall
    result["engine_line"] = next(
        (line for line in done.stdout.splitlines() if "DeepSpeed ZeRO stage" in line), ""
    )
    return result


def summarize(rounds: list[dict], warmup: int) -> dict:
    """Medians over every round's steady steps: after warm-up, without a checkpoint save in them."""
    steps = [step for result in rounds for step in result["steps"][warmup:]]
    steady = [step for step in steps if step["save"] == 0]
    summary = {
        part: median([step[part] for step in steady])
        for part in ("wall", "cpu", "forward", "backward", "optimizer")
    }
    summary["steps"] = len(steady)
    summary["save"] = median([step["save"] for step in steps if step["save"] > 0])
    summary["command_s"] = median([result["command_s"] for result in rounds])
    summary["max_rss_bytes"] = max(result["max_rss_bytes"] for result in rounds)
    summary["engine_line"] = rounds[0]["engine_line"]
    return summary


def compile_times(scratch: Path) -> list[list[str]]:
    """Seconds to build DeepSpeed's CPU ops in an empty cache, then to load them from it."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(scratch / "torch_extensions"))
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    seconds: dict[str, list[float]] = {}
    for _ in ("cold", "warm"):
        done = subprocess.run(
            [sys.executable, "-c", BUILD_SCRIPT], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            sys.exit(f"bench_train_cpu.py: building DeepSpeed's ops failed:\n{done.stderr[-3000:]}")
        for line in done.stdout.splitlines():
            name, value = line.split()
            seconds.setdefault(name, []).append(float(value))
    return [[name, fmt(cold), fmt(warm)] for name, (cold, warm) in seconds.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="Transformer layers (default 2).")
    parser.add_argument(
        "--width", type=int, default=768, help="Hidden size (default 768, GPT-2 small's)."
    )
    parser.add_argument("--heads", type=int, default=12, help="Attention heads (default 12).")
    parser.add_argument(
        "--block_size", type=int, default=128, help="Tokens per example (default 128)."
    )
    parser.add_argument(
        "--batch", type=int, default=4, help="Examples per micro-batch (default 4)."
    )
    parser.add_argument(
        "--accumulation", type=int, default=2, help="Micro-batches per optimizer step (default 2)."
    )
    parser.add_argument("--steps", type=int, default=8, help="Optimizer steps per run (default 8).")
    parser.add_argument(
        "--warmup", type=int, default=2, help="First steps left out of the figures (default 2)."
    )
    parser.add_argument(
        "--save_at",
        type=int,
        default=4,
        help="Save a checkpoint every this many steps, to time it (default 4).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANTS,
        help=f"Runs to make (default: {' '.join(DEFAULT_VARIANTS)}).",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="Run every variant this many times, round-robin, and pool the steps (default 1).",
    )
    parser.add_argument(
        "--skip_compile",
        action="store_true",
        help="Do not time the one-time build of DeepSpeed's ops (a minute or more on 2 cores).",
    )
    parser.add_argument(
        "--train_file",
        type=Path,
        default=None,
        help="Text to train on. Default: the repo's train.txt, else sample text.",
    )
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")

    print(
        f"machine: {machine_line()}; {free_cores():.1f} of {os.cpu_count()} cores free", flush=True
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        scratch = Path(folder)
        source, description = training_text(args.train_file, 1.0, scratch)
        step_tokens = args.batch * args.accumulation * args.block_size
        data = cut_text(source, step_tokens * (args.steps + 2), scratch / "train.txt")
        model = scratch / "model"
        parameters = save_model(model, args.layers, args.width, args.heads, seed=0)
        results: dict[str, list[dict]] = {name: [] for name in args.variants}
        # Round-robin, so a neighbour's job that comes and goes hits every variant alike.
        for _ in range(args.rounds):
            for name in args.variants:
                results[name].append(run_variant(name, args, model, data, scratch))
        compiled = None if args.skip_compile else compile_times(scratch)

    summaries = {name: summarize(rounds, args.warmup) for name, rounds in results.items()}
    rows = []
    for name, s in summaries.items():
        checkpointing = VARIANTS[name][1]
        # Each run against the plain Trainer with the same checkpointing.
        baseline = summaries.get("plain" if checkpointing else "plain-no-ckpt")
        ratio = baseline["wall"] / s["wall"] if baseline else float("nan")
        cpu_ratio = baseline["cpu"] / s["cpu"] if baseline else float("nan")
        rows.append(
            [
                name,
                fmt(s["wall"]),
                fmt(s["cpu"]),
                f"{step_tokens / s['wall']:,.0f}",
                fmt(ratio) + "x",
                fmt(cpu_ratio) + "x",
                fmt(s["forward"]),
                fmt(s["backward"]),
                fmt(s["optimizer"]),
                fmt(s["wall"] - s["forward"] - s["backward"] - s["optimizer"]),
                fmt(s["save"]),
                fmt(s["command_s"], 1),
                fmt(s["max_rss_bytes"] / 2**30),
            ]
        )
    print_table(
        f"Training on CPU: GPT-2 {args.layers} layers x {args.width} wide ({parameters / 1e6:.0f}M "
        f"parameters), batch {args.batch} x accumulation {args.accumulation} x {args.block_size} "
        f"tokens; median of {min(s['steps'] for s in summaries.values())}+ steps in {args.rounds} "
        f"round(s); text: {description}",
        [
            "run",
            "s/step",
            "CPU s/step",
            "tokens/s",
            "speed vs plain",
            "by CPU time",
            "forward s",
            "backward s",
            "optimizer s",
            "other s",
            "checkpoint save s",
            "command s",
            "peak RSS GiB",
        ],
        rows,
    )
    for name, s in summaries.items():
        if s["engine_line"]:
            print(f"{name}: {s['engine_line'].strip()}")
    if "lora" in summaries and "plain" in summaries:
        lora, full = summaries["lora"], summaries["plain"]
        print(
            f"LoRA step / full step (plain Trainer, same model, batch and checkpointing): "
            f"{lora['wall'] / full['wall']:.2f} by wall time, {lora['cpu'] / full['cpu']:.2f} by CPU time"
        )
    if compiled:
        print_table(
            "DeepSpeed's one-time op build (empty TORCH_EXTENSIONS_DIR), then a load from the cache",
            ["op", "first build s", "cached load s"],
            compiled,
        )


if __name__ == "__main__":
    main()
