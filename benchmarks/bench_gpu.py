"""GPU speed and memory of the guide's two fine-tunes, from the published configs, random weights.

    python benchmarks/bench_gpu.py                 # on a CUDA GPU: four runs, about 5 minutes
    python benchmarks/bench_gpu.py --toy --cpu     # tiny models on a CPU: checks the code path

GPT2-XL (1.5B) and GPT-Neo 2.7B are built from their published configs with random weights, so
nothing is downloaded. Each run is one process under the deepspeed launcher that goes through
run_clm.py's own pieces: its flag parsing (the guide's flags), its data path, its Trainer class
with the ReportEngine callback; only loading weights from disk and the final save are left out.
Two modes per model:
- capped: the guide's settings (fp16, GPT2-XL batch 8 x accumulation 2, GPT-Neo 4 x 2, block
  1024, activation checkpointing, ds_config*.json with Adam offloaded to the CPU) with the GPU
  memory cut to 16 GiB (torch's per-process memory fraction), to test the guide's 16 GB claim;
- fast: the whole GPU, the same examples per optimizer step in one micro-batch, ZeRO-2 with
  the optimizer on the GPU (torch's fused AdamW) and no recomputation; where that runs out of
  memory, again with activation checkpointing.
MFU counts model FLOPs, 6 x parameters per token; HFU adds the recomputation (8 x parameters).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import stepclock
import torch
from benchlib import REPO, fmt, free_port, median, print_table, sample_text
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, default_data_collator

import run_clm
from tiny import gpt2_tokenizer

# The configs published with the hub models (gpt2-xl, EleutherAI/gpt-neo-2.7B), sizes only.
PUBLISHED = {
    "gpt2-xl": {
        "model_type": "gpt2",
        "n_layer": 48,
        "n_embd": 1600,
        "n_head": 25,
        "n_positions": 1024,
        "n_ctx": 1024,
        "vocab_size": 50257,
        "activation_function": "gelu_new",
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
    "gpt-neo-2.7B": {
        "model_type": "gpt_neo",
        "num_layers": 32,
        "hidden_size": 2560,
        "num_heads": 20,
        "max_position_embeddings": 2048,
        "vocab_size": 50257,
        "attention_types": [[["global", "local"], 16]],
        "window_size": 256,
        "activation_function": "gelu_new",
        "embed_dropout": 0,
        "attention_dropout": 0,
        "resid_dropout": 0,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    },
}
# The same families shrunk, to run the code path on a CPU in seconds.
TOY = {
    "gpt2-xl": {**PUBLISHED["gpt2-xl"], "n_layer": 2, "n_embd": 64, "n_head": 2},
    "gpt-neo-2.7B": {
        **PUBLISHED["gpt-neo-2.7B"],
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 2,
        "attention_types": [[["global", "local"], 1]],
        "window_size": 16,
    },
}
# The guide's command for each model: DeepSpeed config, batch, accumulation, extra flags.
GUIDE = {
    "gpt2-xl": ("ds_config.json", 8, 2, []),
    "gpt-neo-2.7B": (
        "ds_config_gptneo.json",
        4,
        2,
        ["--learning_rate", "5e-06", "--warmup_steps", "10"],
    ),
}
# Dense fp16/bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "V100": 125.0}
# The guide's own figure: GPT2-XL on a 16 GB V100, 16 examples of 1024 tokens in about 9 s.
GUIDE_V100 = {"seconds_per_step": 9.0, "examples_per_step": 16, "block": 1024}
GPT2_XL_PARAMETERS = 1_557_611_200
TARGETS = {("gpt2-xl", "capped"): ("examples/s", 12.0), ("gpt2-xl", "fast"): ("MFU", 0.40)}


# ---------------------------------------------------------------- one run, in its own process


def random_model(config, on_gpu: bool):
    """Random weights in float32 on the CPU, where from_pretrained would leave a hub model.

    Initialising 2.7B parameters is quick on a GPU and slow on a CPU, so they are drawn there
    and copied over; the GPU's peak-memory counter is reset afterwards.
    """
    torch.manual_seed(0)
    if not on_gpu:
        return AutoModelForCausalLM.from_config(config)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to("cpu")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return model


def worker(spec_path: Path) -> None:
    """Train as run_clm.py would for spec["argv"], timing each step; results to spec["result"]."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    on_gpu = torch.cuda.is_available()
    result: dict = {"device": "cpu", "oom": None}
    if on_gpu:
        properties = torch.cuda.get_device_properties(0)
        result["device"] = torch.cuda.get_device_name(0)
        result["gpu_total_bytes"] = properties.total_memory
        if spec["cap_gib"]:
            # Before anything is allocated: the allocator refuses to grow past this share.
            torch.cuda.set_per_process_memory_fraction(
                spec["cap_gib"] * 2**30 / properties.total_memory
            )

    model_args, data, _run, training = run_clm.parse_args(spec["argv"])
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    model = random_model(config, on_gpu)
    model.config.use_cache = False  # as run_clm.load_model does
    result["parameters"] = sum(p.numel() for p in model.parameters())
    block_size = run_clm.pick_block_size(data.block_size, run_clm.model_positions(config))
    blocks = run_clm.tokenize(run_clm.load_texts(data), tokenizer, data, block_size, training)

    timings = Path(spec["result"]).with_suffix(".steps.json")
    trainer_class = stepclock.timed(run_clm.SealingTrainer, timings)
    trainer = trainer_class(
        model=model,
        args=training,
        train_dataset=blocks["train"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[run_clm.ReportEngine()],
    )
    try:
        trainer.train()
    except torch.OutOfMemoryError as error:
        result["oom"] = str(error).splitlines()[0][:300]
        if on_gpu:
            result["max_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if timings.is_file():
        result.update(json.loads(timings.read_text(encoding="utf-8")))
    Path(spec["result"]).write_text(json.dumps(result, indent=1), encoding="utf-8")


# ---------------------------------------------------------------- the parent: plan, launch, report


def prepare_model(folder: Path, name: str, toy: bool) -> Path:
    """A model folder holding only config.json and the tokenizer: the weights come at random."""
    folder.mkdir(parents=True, exist_ok=True)
    AutoConfig.for_model(**(TOY if toy else PUBLISHED)[name]).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def plans(name: str, mode: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """The runs to try for one model and mode, in order; the first that fits counts."""
    config_file, batch, accumulation, extra = GUIDE[name]
    base = {
        "cap_gib": None,
        "batch": batch,
        "accumulation": accumulation,
        "checkpointing": True,
        "block": 64 if args.toy else 1024,
        "extra": extra,
        "optim": None,
    }
    if mode == "capped":
        config_path = REPO / config_file
        if args.zero:
            # A candidate DeepSpeed setting, tried on the guide's run: the repo's file, changed.
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config["zero_optimization"].update(args.zero)
            config_path = folder / f"capped-{config_file}"
            config_path.write_text(json.dumps(config, indent=1), encoding="utf-8")
        return [{**base, "cap_gib": args.cap_gib, "ds_config": str(config_path)}]
    # The guide's config minus the offload and minus DeepSpeed's optimizer, so the Trainer's
    # fused AdamW runs on the GPU and nothing needs compiling.
    fast_config = json.loads((REPO / config_file).read_text(encoding="utf-8"))
    fast_config["zero_optimization"].pop("offload_optimizer")
    fast_config.pop("optimizer")
    path = folder / f"fast-{config_file}"
    path.write_text(json.dumps(fast_config, indent=1), encoding="utf-8")
    one_batch = {**base, "batch": batch * accumulation, "accumulation": 1, "ds_config": str(path)}
    one_batch["optim"] = "adamw_torch_fused"
    return [{**one_batch, "checkpointing": False}, one_batch]


def launch(
    name: str,
    mode: str,
    plan: dict,
    args: argparse.Namespace,
    folder: Path,
    model: Path,
    timeout: float,
) -> dict:
    """One run under the deepspeed launcher, as the guide starts run_clm.py."""
    tag = f"{name}-{mode}-{'ckpt' if plan['checkpointing'] else 'nockpt'}"
    block = plan["block"]
    steps = args.warmup + args.steps
    text = folder / f"{tag}.txt"
    # About 4.5 characters a token; a margin so every step has full blocks.
    text.write_text(
        sample_text(steps * plan["batch"] * plan["accumulation"] * block * 6 / 1e6 + 0.01)
    )
    argv = [
        "--deepspeed", plan["ds_config"],
        "--model_name_or_path", str(model),
        "--train_file", str(text),
        "--do_train",
        "--fp16",
        "--output_dir", str(folder / tag),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", str(plan["batch"]),
        "--gradient_accumulation_steps", str(plan["accumulation"]),
        "--block_size", str(block),
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        *plan["extra"],
    ]  # fmt: skip
    if not plan["checkpointing"]:
        argv += ["--gradient_checkpointing", "False"]
    if plan["optim"]:
        argv += ["--optim", plan["optim"]]
    spec = {"argv": argv, "cap_gib": plan["cap_gib"], "result": str(folder / f"{tag}.json")}
    spec_path = folder / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    command = [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--master_port", str(free_port()),
        "--num_gpus=1",
        str(Path(__file__).resolve()), "--worker", str(spec_path),
    ]  # fmt: skip
    env = dict(os.environ)
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    # A session of its own, so a run that hangs can be stopped with the worker it launched.
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"error": f"no result within {timeout:.0f} s", **plan}
    done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    wall = time.perf_counter() - start
    result_path = Path(spec["result"])
    if not result_path.is_file():
        log = (done.stdout + done.stderr)[-3000:]
        return {"error": f"exit status {done.returncode}", "log": log, **plan}
    result = json.loads(result_path.read_text(encoding="utf-8"))
    engine = [line for line in done.stdout.splitlines() if "DeepSpeed ZeRO stage" in line]
    return {**result, **plan, "command_s": wall, "engine": engine[0].strip() if engine else ""}


def summarize(name: str, mode: str, result: dict, args: argparse.Namespace) -> dict:
    """Per-step medians over the timed steps that really stepped (fp16 overflow skips do not)."""
    block = result["block"]
    examples = result["batch"] * result["accumulation"]
    timed = [s for s in result.get("steps", [])[args.warmup :] if not s["skipped"]]
    wall = median([s["wall"] for s in timed])
    tokens_per_s = examples * block / wall if timed else float("nan")
    parameters = result.get("parameters", 0)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in result.get("device", "")), None)
    peak = args.peak_tflops or peak
    mfu = 6 * parameters * tokens_per_s / (peak * 1e12) if peak else float("nan")
    hfu_factor = 8 if result["checkpointing"] else 6
    summary = {
        "model": name,
        "mode": mode,
        "device": result.get("device", "?"),
        "cap": f"{result['cap_gib']:g} GiB" if result["cap_gib"] and not args.cpu else "none",
        "batch": f"{result['batch']} x {result['accumulation']}",
        "checkpointing": "yes" if result["checkpointing"] else "no",
        "s_per_step": wall,
        "examples_per_s": examples / wall if timed else float("nan"),
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "hfu": mfu * hfu_factor / 6,
        "optimizer_s": median([s["optimizer"] for s in timed]),
        "forward_backward_s": median([s["forward"] + s["backward"] for s in timed]),
        "gpu_peak_gib": result.get("max_gpu_reserved_bytes", float("nan")) / 2**30,
        "host_peak_gib": result.get("max_rss_bytes", float("nan")) / 2**30,
        "skipped": sum(1 for s in result.get("steps", [])[args.warmup :] if s["skipped"]),
        "timed_steps": len(timed),
        "oom": result.get("oom"),
        "error": result.get("error"),
        "engine": result.get("engine", ""),
        "command_s": result.get("command_s", float("nan")),
    }
    target = TARGETS.get((name, mode))
    if target and result.get("device", "cpu") != "cpu" and timed:
        key, goal = target
        value = summary["examples_per_s"] if key == "examples/s" else summary["mfu"]
        shown = f"{goal:g}" if key == "examples/s" else f"{goal:.0%}"
        summary["target"] = f"{key} >= {shown}: {'met' if value >= goal else 'MISSED'}"
    else:
        summary["target"] = "-"
    return summary


def guide_row() -> list[str]:
    examples = GUIDE_V100["examples_per_step"] / GUIDE_V100["seconds_per_step"]
    tokens = examples * GUIDE_V100["block"]
    mfu = 6 * GPT2_XL_PARAMETERS * tokens / (PEAK_TFLOPS["V100"] * 1e12)
    return ["gpt2-xl", "guide, V100 16 GB", "16 GB", "8 x 2", "yes", fmt(GUIDE_V100["seconds_per_step"]),
            fmt(examples), f"{tokens:,.0f}", f"{mfu:.1%}", f"{mfu * 8 / 6:.1%}", "n/a", "n/a", "< 16",
            "machine: 60+", "-", "-"]  # fmt: skip


def report(summaries: list[dict], args: argparse.Namespace) -> None:
    rows = [guide_row()] if not args.toy else []
    for s in summaries:
        if s["error"] or s["oom"]:
            why = f"out of GPU memory: {s['oom']}" if s["oom"] else s["error"]
            rows.append([s["model"], s["mode"], s["cap"], s["batch"], s["checkpointing"], why[:60],
                         *["-"] * 6, fmt(s["gpu_peak_gib"]), "-", "-", s["target"]])  # fmt: skip
            continue
        rows.append(
            [
                s["model"],
                s["mode"],
                s["cap"],
                s["batch"],
                s["checkpointing"],
                fmt(s["s_per_step"]),
                fmt(s["examples_per_s"]),
                f"{s['tokens_per_s']:,.0f}",
                fmt(100 * s["mfu"], 1) + "%" if s["mfu"] == s["mfu"] else "n/a",
                fmt(100 * s["hfu"], 1) + "%" if s["hfu"] == s["hfu"] else "n/a",
                fmt(s["optimizer_s"]),
                fmt(s["forward_backward_s"]),
                fmt(s["gpu_peak_gib"]),
                fmt(s["host_peak_gib"]),
                f"{s['skipped']}/{s['skipped'] + s['timed_steps']}",
                s["target"],
            ]
        )
    device = next((s["device"] for s in summaries if s["device"]), "?")
    if args.zero:
        print(f"\ncapped runs with zero_optimization changed: {json.dumps(args.zero)}", flush=True)
    print_table(
        f"GPU benchmark on {device}{' (toy sizes)' if args.toy else ''}: median of "
        f"{args.steps} steps after {args.warmup} warm-up; MFU = 6 x parameters x tokens/s / peak",
        ["model", "mode", "GPU cap", "batch x accum", "ckpt", "s/step", "examples/s", "tokens/s",
         "MFU", "HFU", "optimizer s", "fwd+bwd s", "peak GPU GiB", "peak host GiB", "skipped",
         "target"],
        rows,
    )  # fmt: skip
    for s in summaries:
        if s["engine"]:
            print(
                f"{s['model']} {s['mode']}: {s['engine']} ({s['command_s']:.0f} s from launch to exit)"
            )


def zero_setting(text: str) -> tuple[str, object]:
    """`overlap_comm=false` -> ("overlap_comm", False): the value is read as JSON."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=JSON, e.g. overlap_comm=false")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not JSON ({error.msg})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(PUBLISHED),
        default=list(PUBLISHED),
        help="Models to run (default: both).",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["capped", "fast"],
        default=["capped", "fast"],
        help="capped: guide settings within --cap_gib; fast: the whole GPU (default: both).",
    )
    parser.add_argument(
        "--cap_gib", type=float, default=16.0, help="GPU memory for the capped runs (default 16)."
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="Timed optimizer steps per run (default 4)."
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="Untimed first steps per run (default 2)."
    )
    parser.add_argument(
        "--toy", action="store_true", help="Two-layer, 64-wide models and 64-token blocks."
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="Run on the CPU (DeepSpeed's CPU accelerator, fp32); use with --toy.",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="The GPU's dense fp16 peak for MFU (default: known for H200, H100, A100, V100).",
    )
    parser.add_argument(
        "--run_timeout",
        type=int,
        default=240,
        help="Seconds one run may take before it is given up (default 240).",
    )
    parser.add_argument(
        "--deadline_s",
        type=int,
        default=450,
        help="Stop any run still going this many seconds after the start and start none with "
        "under a minute left, so the script ends within 8 minutes (default 450).",
    )
    parser.add_argument(
        "--zero",
        type=zero_setting,
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="Change a zero_optimization setting of the capped runs, e.g. overlap_comm=false or "
        "reduce_bucket_size=5e7 (repeatable), to measure a proposed config change.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--worker", type=Path, default=None, help="Internal: run one spec file.")
    parser.add_argument(
        "--local_rank", type=int, default=0, help="Set by the deepspeed launcher; one GPU: 0."
    )
    args = parser.parse_args()
    args.zero = dict(args.zero)

    if args.worker is not None:
        worker(args.worker)
        return
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA GPU here; for a code-path check on a CPU pass --toy --cpu")

    start = time.perf_counter()
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        folder = Path(scratch)
        for name in args.models:
            model = prepare_model(folder / name, name, args.toy)
            for mode in args.modes:
                candidates = plans(name, mode, args, folder)
                for number, plan in enumerate(candidates, start=1):
                    left = args.deadline_s - (time.perf_counter() - start)
                    if left < 60:
                        print(
                            f"{name} {mode}: not run, --deadline_s {args.deadline_s} near",
                            flush=True,
                        )
                        break
                    timeout = min(args.run_timeout, left)
                    result = launch(name, mode, plan, args, folder, model, timeout)
                    summary = summarize(name, mode, result, args)
                    print(
                        f"{name} {mode}: done after {time.perf_counter() - start:.0f} s", flush=True
                    )
                    if summary["error"]:
                        print(result.get("log", ""), file=sys.stderr, flush=True)
                    if not summary["oom"] or number == len(candidates):
                        summaries.append(summary)
                        break
    report(summaries, args)
    print(f"\ntotal: {time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
