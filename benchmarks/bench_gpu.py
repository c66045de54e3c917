"""GPU speed and memory: the guide's GPT2-XL, LoRA and QLoRA on Llama 3 shapes, and generation.

    python benchmarks/bench_gpu.py                 # one CUDA GPU: under 9 minutes, by a deadline
    python benchmarks/bench_gpu.py --only 'llama-3.2-3b/*'
    python benchmarks/bench_gpu.py --toy --cpu     # tiny models on a CPU: checks the code path

Models are built from their published configs with random weights, so nothing is downloaded:
GPT2-XL (1.5B), GPT-Neo 2.7B, Llama-3.1-8B and Llama-3.2-3B (the GPT-2 tokenizer feeds the
Llamas: the weights are random, only the vocabulary must cover its ids). Rows run in priority
order, each in its own process, so what the deadline leaves out matters least:
- guide: the guide's command (fp16, ZeRO-2 with Adam on the CPU, activation checkpointing, its
  batch) with GPU memory capped at 15 GiB, what a 16 GB card offers;
- fast: the fastest honest full fine-tune on the whole GPU: bf16, fused AdamW, no offload, no
  recomputation (again with it if that runs out of memory);
- LoRA and QLoRA under a 15 and a 24 GiB cap, each twice on the same examples of mixed length:
  baseline (`run_clm.py --use_peft` with the Trainer's defaults, padded batches) and fast
  (padding-free --packing and Liger's kernels, where liger-kernel is installed);
- generate: GPT-Neo 2.7B sampling, with and without deepspeed.init_inference kernel injection.
A training row goes through run_clm.py's own code (flags, data, model loading with LoRA and 4-bit
quantization, Trainer); only the checkpoint read from disk is replaced by weights drawn at random,
and the run ends where training ends (no model is saved).
MFU counts model FLOPs per token, 4N + 2T + 12 x layers x hidden x context (N: parameters that
multiply activations, T: the trainable ones among them); HFU adds the recomputed forward.
"""

import argparse
import fnmatch
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchlib import REPO, deepspeed_launcher, fmt, print_table, sample_text

# The deadline counts from here: the imports above take milliseconds, torch & co. load later.
STARTED = time.monotonic()

# The configs published with the hub models, sizes only; weights are drawn at random.
PUBLISHED = {
    "gpt2-xl": {"model_type": "gpt2", "n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 1024,
                "vocab_size": 50257, "activation_function": "gelu_new", "bos_token_id": 50256,
                "eos_token_id": 50256},
    "gpt-neo-2.7B": {"model_type": "gpt_neo", "num_layers": 32, "hidden_size": 2560, "num_heads": 20,
                     "max_position_embeddings": 2048, "vocab_size": 50257,
                     "attention_types": [[["global", "local"], 16]], "window_size": 256,
                     "activation_function": "gelu_new", "embed_dropout": 0, "attention_dropout": 0,
                     "resid_dropout": 0, "bos_token_id": 50256, "eos_token_id": 50256},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "tie_word_embeddings": False, "dtype": "bfloat16"},
    "llama-3.2-3b": {"model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
                     "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
                     "vocab_size": 128256, "rope_theta": 500000.0, "max_position_embeddings": 131072,
                     "tie_word_embeddings": True, "dtype": "bfloat16"},
}  # fmt: skip
# The same families shrunk, to run the code path on a CPU in seconds.
SMALL_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TOY = {
    "gpt2-xl": {**PUBLISHED["gpt2-xl"], "n_layer": 2, "n_embd": 64, "n_head": 2},
    "gpt-neo-2.7B": {**PUBLISHED["gpt-neo-2.7B"], "num_layers": 2, "hidden_size": 64, "num_heads": 2,
                     "attention_types": [[["global", "local"], 1]], "window_size": 16},
    "llama-3.1-8b": {**PUBLISHED["llama-3.1-8b"], **SMALL_LLAMA},
    "llama-3.2-3b": {**PUBLISHED["llama-3.2-3b"], **SMALL_LLAMA},
}  # fmt: skip
# The guide's command for each model: DeepSpeed config, batch, accumulation, extra flags.
GUIDE = {
    "gpt2-xl": ("ds_config.json", 8, 2, []),
    "gpt-neo-2.7B": ("ds_config_gptneo.json", 4, 2, ["--learning_rate", "5e-06", "--warmup_steps", "10"]),
}  # fmt: skip
BLOCK = {"gpt2-xl": 1024, "gpt-neo-2.7B": 1024, "llama-3.1-8b": 2048, "llama-3.2-3b": 2048}
TOY_BLOCK = 32
CARD_GIB = 15.0  # what a "16 GB" card leaves a program: 15.78 GiB, less the CUDA context
# Rows in priority order: (model, kind, GPU cap in GiB); a LoRA or QLoRA entry is two rows.
PRIORITY = [
    ("gpt2-xl", "guide", CARD_GIB),
    ("gpt2-xl", "fast", None),
    ("llama-3.1-8b", "qlora", 15.0),
    ("llama-3.2-3b", "lora", 15.0),
    ("llama-3.1-8b", "lora", 24.0),
    ("gpt-neo-2.7B", "generate", None),
    ("llama-3.2-3b", "lora", 24.0),
    ("llama-3.2-3b", "qlora", 15.0),
    ("llama-3.1-8b", "qlora", 24.0),
    ("llama-3.2-3b", "qlora", 24.0),
    ("llama-3.1-8b", "lora", 15.0),  # bf16 weights alone are 14.96 GiB: measured last
    ("gpt-neo-2.7B", "guide", CARD_GIB),
    ("gpt-neo-2.7B", "fast", None),
]
# LoRA examples' lengths in turn, as shares of the block: padded in batches of two, about a
# third of the slots are padding (the table shows the share measured).
LENGTHS = (0.9, 0.15, 0.6, 0.35)
# Dense BF16/FP16 tensor-core peaks in TFLOP/s, by a word of torch.cuda.get_device_name(), first
# match wins. NVIDIA's datasheets (H200, H100 SXM and PCIe: half their figures with sparsity;
# A100, L4, V100 SXM2 and PCIe) and the Ada Lovelace whitepaper v2.02, Appendix A, for the RTX
# 4090 (FP16/BF16 with FP32 accumulate). None: a variant not listed; pass --peak_tflops.
PEAK_TFLOPS = (
    ("NVL", None),  # H100 NVL, H200 NVL: other clocks
    ("H200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # "NVIDIA H100 80GB HBM3": the SXM5 card
    ("A100", 312.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("V100-PCIE", 112.0),
    ("V100", 125.0),  # "Tesla V100-SXM2-16GB", the guide's card
)
# The guide's own figure: GPT2-XL on a 16 GB V100, 16 examples of 1024 tokens in about 9 s.
GUIDE_V100 = {"seconds_per_step": 9.0, "examples_per_step": 16, "block": 1024}
TARGETS = {"gpt2-xl/guide-15": ("examples/s", 12.0), "gpt2-xl/fast": ("MFU", 0.40)}
AIM = 1.5  # fast LoRA over the baseline, tokens/s
TRAINING_COLUMNS = ["row", "GPU cap", "setup", "batch x accum", "ckpt", "s/step", "examples/s",
                    "tokens/s", "MFU", "HFU", "padding", "optimizer s", "fwd+bwd s", "peak GPU GiB",
                    "peak host GiB", "fp16 skips", "target"]  # fmt: skip
SAID = r"DeepSpeed ZeRO stage|LoRA r=|--packing:"  # what run_clm.py says that a reader needs


@dataclass
class Row:
    name: str
    model: str
    kind: str  # guide, fast, lora, qlora or generate
    cap_gib: float | None = None
    batch: int = 1
    accumulation: int = 1
    flags: list[str] = field(default_factory=list)  # run_clm.py's, beyond what every row passes
    skip: str | None = None
    notes: list[str] = field(default_factory=list)


NO_CHECKPOINTING = ["--gradient_checkpointing", "False"]


def expand(model: str, kind: str, cap: float | None, missing: dict[str, str | None]) -> list[Row]:
    """The row or rows one PRIORITY entry stands for."""
    if kind == "generate":
        return [Row(f"{model}/generate", model, kind)]
    if kind == "guide":
        config, batch, accumulation, extra = GUIDE[model]
        flags = ["--deepspeed", config, "--fp16", *extra]
        return [Row(f"{model}/guide-{cap:g}", model, kind, cap, batch, accumulation, flags)]
    if kind == "fast":
        _, batch, accumulation, _ = GUIDE[model]
        flags = ["--bf16", "--optim", "adamw_torch_fused", *NO_CHECKPOINTING]
        return [Row(f"{model}/fast", model, kind, None, batch * accumulation, 1, flags)]
    cell = f"{model}/{kind}-{cap:g}"
    common = ["--use_peft", "--bf16", *(["--load_in_4bit"] if kind == "qlora" else [])]
    skip = missing["bitsandbytes"] if kind == "qlora" else None
    baseline = Row(
        f"{cell}/baseline", model, kind, cap, 2, 2, [*common, "--separate_examples"], skip
    )
    fast = Row(f"{cell}/fast", model, kind, cap, 2, 2, [*common, "--packing"], skip)
    if missing["liger"]:
        fast.notes.append(f"without Liger's kernels: {missing['liger']}")
    else:
        fast.flags.append("--use_liger_kernel")
    # A 3B's stored activations (roughly 4 MB a token, estimated) fit beside its weights in
    # 24 GiB for a packed batch of two; elsewhere recomputation stays on.
    if model == "llama-3.2-3b" and cap == 24:
        fast.flags += NO_CHECKPOINTING
    return [baseline, fast]


def describe(flags: list[str]) -> str:
    """A row's settings in a few words, from the flags it ran with."""
    if "--deepspeed" in flags:
        return "fp16, ZeRO-2, Adam on the CPU"
    if "--use_peft" not in flags:
        return "bf16, fused AdamW, no offload"
    words = ["Trainer defaults, padded" if "--separate_examples" in flags else "packing"]
    return ", ".join(words + (["Liger"] if "--use_liger_kernel" in flags else []))


def retry(flags: list[str], result: dict) -> list[str] | None:
    """The flags to try next after a failed attempt: recomputation back on after running out of
    memory, Liger's kernels dropped after an error; None when there is nothing left to change."""
    if result.get("oom") and "--gradient_checkpointing" in flags:
        at = flags.index("--gradient_checkpointing")
        return flags[:at] + flags[at + 2 :]
    if result.get("error") and not result.get("timed_out") and "--use_liger_kernel" in flags:
        return [flag for flag in flags if flag != "--use_liger_kernel"]
    return None


def missing_packages(cpu: bool) -> dict[str, str | None]:
    """Why Liger's kernels and bitsandbytes cannot be used here, or None where they can."""
    if cpu:
        return {
            "liger": "they need a CUDA GPU (Triton)",
            "bitsandbytes": "QLoRA needs a CUDA GPU (bitsandbytes 4-bit)",
        }
    absent = "is not installed (benchmarks/gpu_wheels.sh fetches it)"
    return {
        "liger": None if importlib.util.find_spec("liger_kernel") else f"liger-kernel {absent}",
        "bitsandbytes": None
        if importlib.util.find_spec("bitsandbytes")
        else f"bitsandbytes {absent}",
    }


# ---------------------------------------------------------------- in the row's own process


class TrainingDone(Exception):
    """Raised where training ends: the figures are in, and saving a random model times the disk."""


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def random_state(config) -> dict:
    """Freshly initialised weights as a state dict on the CPU, where a checkpoint's would be.

    Drawn on the GPU (seconds for billions of parameters; minutes on a CPU) before any memory
    cap is set, then the GPU's memory and its peak counter are reset.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype or torch.float32)
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return state


class RandomWeights:
    """Stands in for AutoModelForCausalLM in run_clm.py: from_pretrained takes the drawn weights
    instead of reading a checkpoint, and does the rest (dtype, 4-bit quantization) as for one."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def from_pretrained(self, source, config, **kwargs):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        state, self.state = self.state, None  # from here on only the model holds the weights
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        return model_class.from_pretrained(None, config=config, state_dict=state, **kwargs)


def matmul_parameters(model) -> tuple[int, int]:
    """(all, trainable) parameters that multiply activations: every one but the embedding tables
    looked up by index (a token embedding tied to the output layer multiplies there, so counts)."""
    import torch

    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    lookups.discard(id(model.get_output_embeddings().weight))
    total = trainable = 0
    for parameter in model.parameters():
        if id(parameter) not in lookups:
            # A 4-bit weight is stored packed; its quantization state keeps the real shape.
            quantized = getattr(parameter, "quant_state", None)
            count = math.prod(quantized.shape if quantized is not None else parameter.shape)
            total += count
            trainable += count if parameter.requires_grad else 0
    return total, trainable


def set_cap(cap_gib: float | None, result: dict) -> None:
    import torch

    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name(0)
        if cap_gib:
            # Before the run allocates: the allocator refuses to grow past this share.
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)


def train_worker(spec: dict, result: dict) -> None:
    """Train as run_clm.py would for spec["argv"], timing each step, until training ends."""
    import stepclock
    import torch
    from transformers import AutoConfig

    import checkpoints
    import run_clm

    config = AutoConfig.from_pretrained(spec["model"])
    result.update(layers=config.num_hidden_layers, hidden=config.hidden_size)
    run_clm.AutoModelForCausalLM = RandomWeights(random_state(config))
    set_cap(spec["cap_gib"], result)
    timings = Path(spec["result"]).with_suffix(".steps.json")

    class BenchTrainer(stepclock.timed(run_clm.GuardedTrainer, timings)):
        def train(self, *args, **kwargs):
            result["parameters"], result["trainable"] = matmul_parameters(self.model)
            super().train(*args, **kwargs)
            raise TrainingDone

    run_clm.GuardedTrainer = BenchTrainer
    # run_clm.py checks the disk for one checkpoint even with --save_strategy no; none is saved.
    checkpoints.check_disk = lambda output_dir, needed: None
    try:
        run_clm.train_and_evaluate(*run_clm.parse_args(spec["argv"]))
    except TrainingDone:
        pass
    except torch.OutOfMemoryError as error:
        result["oom"] = first_line(error)
    except run_clm.UserError as error:
        result["oom" if str(error).startswith(run_clm.OOM_ADVICE) else "error"] = first_line(error)
    if torch.cuda.is_available():
        result["max_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    if timings.is_file():
        result.update(json.loads(timings.read_text(encoding="utf-8")))


def generate_worker(spec: dict, result: dict) -> None:
    """Greedy tokens/s of plain transformers generate, then of the model deepspeed.init_inference
    returns (run_generate_neo.py --deepspeed), kernel injection on where there is a GPU."""
    import torch
    from stepclock import now
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import run_generate_neo

    on_gpu = torch.cuda.is_available()
    set_cap(None, result)
    device = torch.device("cuda" if on_gpu else "cpu")
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(spec["model"]),
            dtype=torch.float16 if on_gpu else torch.float32,
        ).eval()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    prompt = tokenizer(sample_text(0.01), return_tensors="pt").input_ids[:, :32].to(device)
    result["runs"] = []

    def measure(setup: str, module) -> None:
        greedy = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
        module.generate(prompt, max_new_tokens=4, **greedy)  # warm-up: kernels, caches
        new = spec["new_tokens"]
        start = now()
        out = module.generate(prompt, max_new_tokens=new, min_new_tokens=new, **greedy)
        run = {"setup": setup, "seconds": now() - start, "ids": out[0, prompt.shape[1] :].tolist()}
        result["runs"].append(run)
        Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")  # kept if killed

    measure("transformers generate", model)
    setup = f"deepspeed.init_inference, kernel injection {'on' if on_gpu else 'off (no GPU)'}"
    try:
        measure(setup, run_generate_neo.wrap_with_deepspeed(model, device, kernel_inject=on_gpu))
    except Exception as error:  # a broken wrapper is the finding, not a crash of the benchmark
        why = f"{type(error).__name__}: {first_line(error)}"
        result["runs"].append({"setup": setup, "error": why})


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    result: dict = {"device": "cpu"}
    try:
        (generate_worker if spec["kind"] == "generate" else train_worker)(spec, result)
    finally:
        if int(os.environ.get("RANK", "0")) == 0:
            Path(spec["result"]).write_text(json.dumps(result, indent=1), encoding="utf-8")


# ---------------------------------------------------------------- the parent: plan, launch, report


def prepare_model(folder: Path, name: str, toy: bool) -> Path:
    """A model folder holding only config.json and the GPT-2 tokenizer: the weights come at random."""
    from tiny import gpt2_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    config = (TOY if toy else PUBLISHED)[name]
    (folder / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def write_data(row: Row, args: argparse.Namespace, path: Path) -> Path:
    """Running text for the full fine-tunes; for LoRA, JSONL examples of LENGTHS in turn."""
    block = TOY_BLOCK if args.toy else BLOCK[row.model]
    count = (args.warmup + args.steps) * row.batch * row.accumulation
    # About 4 characters a GPT-2 token, with a margin so every step has full blocks.
    text = sample_text(count * block * 6 / 1e6 + 0.01)
    if row.kind not in ("lora", "qlora"):
        path = path.with_suffix(".txt")
        path.write_text(text, encoding="utf-8")
        return path
    records, start = [], 0
    for number in range(count):
        size = int(LENGTHS[number % len(LENGTHS)] * block * 4)
        records.append(json.dumps({"text": text[start : start + size]}))
        start += size
    path = path.with_suffix(".jsonl")
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    return path


def run_clm_argv(row: Row, flags: list[str], args, model: Path, folder: Path) -> list[str]:
    tag = row.name.replace("/", "-")
    argv = [
        "--model_name_or_path", str(model),
        "--train_file", str(write_data(row, args, folder / tag)),
        "--do_train",
        "--output_dir", str(folder / tag),
        "--max_steps", str(args.warmup + args.steps),
        "--per_device_train_batch_size", str(row.batch),
        "--gradient_accumulation_steps", str(row.accumulation),
        "--block_size", str(TOY_BLOCK if args.toy else BLOCK[row.model]),
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--seed", "0",
        *flags,
    ]  # fmt: skip
    if "--deepspeed" in argv:
        at = argv.index("--deepspeed") + 1
        config = json.loads((REPO / argv[at]).read_text(encoding="utf-8"))
        # A candidate DeepSpeed setting (--zero), tried on the guide's run: the repo's file, changed.
        config["zero_optimization"].update(args.zero)
        argv[at] = str(folder / f"{tag}.ds_config.json")
        Path(argv[at]).write_text(json.dumps(config, indent=1), encoding="utf-8")
    return argv


def launch(row: Row, flags: list[str], args, folder: Path, model: Path, timeout: float) -> dict:
    """One attempt at a row, in its own process (under the deepspeed launcher for the guide's)."""
    tag = f"{row.name.replace('/', '-')}-{len(list(folder.glob('*.spec.json')))}"
    spec = {
        "kind": row.kind,
        "model": str(model),
        "cap_gib": None if args.cpu else row.cap_gib,
        "result": str(folder / f"{tag}.json"),
        "new_tokens": 8 if args.toy else 128,
    }
    if row.kind != "generate":
        spec["argv"] = run_clm_argv(row, flags, args, model, folder)
    spec_path = folder / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)]
    if row.kind == "guide":
        command = [*deepspeed_launcher(), *command[1:]]
    env = dict(os.environ)
    if args.cpu:
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    start = time.monotonic()
    # A session of its own, so a run that hangs can be stopped with the worker it launched.
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timed_out = False
    try:
        log, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        timed_out = True
    result_path = Path(spec["result"])
    result = json.loads(result_path.read_text(encoding="utf-8")) if result_path.is_file() else {}
    if timed_out:
        result["error"] = f"no result within {timeout:.0f} s"
    elif not (
        result.get("steps") or result.get("runs") or result.get("oom") or result.get("error")
    ):
        lines = log.strip().splitlines() or [f"exit status {process.returncode}"]
        result["error"] = lines[-1][:200]
    # What run_clm.py says about the engine, the adapter and packing.
    said = [line.strip() for line in log.splitlines() if re.search(SAID, line)]
    result.update(flags=flags, said=said, log=log[-3000:], timed_out=timed_out)
    return {**result, "command_s": time.monotonic() - start}


def run_row(row: Row, args: argparse.Namespace, folder: Path, models: dict[str, Path]) -> dict:
    """A row's result: its first attempt, then retries (see retry) until one trains, nothing is
    left to change, or the deadline is near. Attempts that failed first are kept as notes."""
    if row.skip:
        return {"flags": row.flags, "status": f"skipped: {row.skip}"}
    flags, failed = row.flags, []
    while True:
        left = args.deadline_s - (time.monotonic() - STARTED)
        if left < 60:
            status = f"not run: --deadline_s {args.deadline_s} near"
            return {"flags": flags, "status": status, "failed": failed}
        if row.model not in models:
            models[row.model] = prepare_model(folder / row.model, row.model, args.toy)
        result = launch(row, flags, args, folder, models[row.model], min(args.run_timeout, left))
        if result.get("steps") or result.get("runs"):
            return {**result, "failed": failed}
        print(result["log"], file=sys.stderr, flush=True)
        following = retry(flags, result)
        if following is None:
            return {**result, "failed": failed}
        failed.append(f"first tried {' '.join(flags)}: {result.get('oom') or result.get('error')}")
        flags = following


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    for word, peak in PEAK_TFLOPS:
        if re.search(rf"\b{re.escape(word)}\b", device):
            return peak
    return None


def flops(
    result: dict, tokens: float, attention: float, checkpointing: bool
) -> tuple[float, float]:
    """Model and hardware FLOPs of `tokens` tokens whose examples' squared lengths sum to `attention`.

    Per token: forward 2N, gradients of the inputs 2N, of the trainable weights 2T (full
    fine-tune: T = N, the familiar 6N; LoRA: T is the adapters); attention 12 x layers x hidden
    per token of context (PaLM's appendix B), over each example's real length. Recomputation
    repeats the forward: 2N a token and a third of the attention.
    """
    n, t = result["parameters"], result["trainable"]
    attention_flops = 12 * result["layers"] * result["hidden"] * attention
    model = (4 * n + 2 * t) * tokens + attention_flops
    return model, model + (2 * n * tokens + attention_flops / 3 if checkpointing else 0)


def summarize(row: Row, result: dict, args: argparse.Namespace) -> dict:
    """Rates over the timed steps that really stepped (fp16's loss scaler skips some)."""
    summary = {"name": row.name, "row": row, "result": result, "device": result.get("device", "?")}
    steps = result.get("steps", [])[args.warmup :]
    timed = [step for step in steps if not step["skipped"]]
    summary["skipped"] = len(steps) - len(timed)
    if not timed:
        return summary
    total = {key: sum(step[key] for step in timed) for key in timed[0]}
    checkpointing = "--gradient_checkpointing" not in result["flags"]
    model_flops, hardware_flops = flops(result, total["tokens"], total["attention"], checkpointing)
    peak = peak_tflops(summary["device"], args.peak_tflops)
    per_second = 1 / total["wall"]
    summary.update(
        s_per_step=total["wall"] / len(timed),
        examples_per_s=total["examples"] * per_second,
        tokens_per_s=total["tokens"] * per_second,
        mfu=model_flops * per_second / (peak * 1e12) if peak else math.nan,
        hfu=hardware_flops * per_second / (peak * 1e12) if peak else math.nan,
        padding=1 - total["tokens"] / total["slots"],
        optimizer_s=total["optimizer"] / len(timed),
        forward_backward_s=(total["forward"] + total["backward"]) / len(timed),
    )
    return summary


def percent(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.1f}%"


def guide_row() -> list[str]:
    """The guide's V100 figure, with this table's FLOPs (GPT2-XL: N = its 1,557,611,200 less the
    1024 x 1600 position table)."""
    examples = GUIDE_V100["examples_per_step"] / GUIDE_V100["seconds_per_step"]
    tokens = examples * GUIDE_V100["block"]
    n = 1_557_611_200 - 1024 * 1600
    facts = {"parameters": n, "trainable": n, "layers": 48, "hidden": 1600}
    model, hardware = flops(facts, tokens, tokens * GUIDE_V100["block"], checkpointing=True)
    peak = peak_tflops("Tesla V100-SXM2-16GB", None) * 1e12
    cells = dict.fromkeys(TRAINING_COLUMNS, "n/a")
    cells.update(
        {"row": "gpt2-xl/guide (V100 16 GB, the guide's figure)", "GPU cap": "16 GB",
         "setup": describe(["--deepspeed"]), "batch x accum": "8 x 2", "ckpt": "yes",
         "s/step": fmt(GUIDE_V100["seconds_per_step"]), "examples/s": fmt(examples),
         "tokens/s": f"{tokens:,.0f}", "MFU": percent(model / peak), "HFU": percent(hardware / peak),
         "padding": "0%", "peak GPU GiB": "< 16", "peak host GiB": "60+ (machine)", "target": "-"}
    )  # fmt: skip
    return list(cells.values())


def gib(result: dict, key: str) -> str:
    return fmt(result.get(key, math.nan) / 2**30)


def training_row(s: dict, args: argparse.Namespace) -> list[str]:
    row, result = s["row"], s["result"]
    cells = dict.fromkeys(TRAINING_COLUMNS, "-")
    cells.update(
        {
            "row": row.name,
            "GPU cap": f"{row.cap_gib:g} GiB" if row.cap_gib and not args.cpu else "none",
            "setup": describe(result["flags"]),
            "batch x accum": f"{row.batch} x {row.accumulation}",
            "ckpt": "no" if "--gradient_checkpointing" in result["flags"] else "yes",
            "peak GPU GiB": gib(result, "max_gpu_reserved_bytes"),
        }
    )
    if "s_per_step" not in s:
        oom = result.get("oom") and f"out of GPU memory: {result['oom']}"
        cells["s/step"] = (result.get("status") or oom or result.get("error", "no steps"))[:70]
        return list(cells.values())
    if row.name in TARGETS and s["device"] != "cpu":
        key, goal = TARGETS[row.name]
        value = s["examples_per_s"] if key == "examples/s" else s["mfu"]
        shown = f"{goal:g}" if key == "examples/s" else f"{goal:.0%}"
        cells["target"] = f"{key} >= {shown}: {'met' if value >= goal else 'MISSED'}"
    cells.update(
        {
            "s/step": fmt(s["s_per_step"]),
            "examples/s": fmt(s["examples_per_s"]),
            "tokens/s": f"{s['tokens_per_s']:,.0f}",
            "MFU": percent(s["mfu"]),
            "HFU": percent(s["hfu"]),
            "padding": f"{s['padding']:.0%}",
            "optimizer s": fmt(s["optimizer_s"]),
            "fwd+bwd s": fmt(s["forward_backward_s"]),
            "peak host GiB": gib(result, "max_rss_bytes"),
            "fp16 skips": str(s["skipped"]),
        }
    )
    return list(cells.values())


def report(summaries: list[dict], args: argparse.Namespace) -> None:
    device = next((s["device"] for s in summaries if s["device"] not in ("?", "cpu")), "cpu")
    sizes = " (toy sizes)" if args.toy else ""
    trained = [s for s in summaries if s["row"].kind != "generate"]
    print_table(
        f"Training on {device}{sizes}: {args.steps} steps after {args.warmup} warm-up; "
        "MFU = (4N + 2T + 12 x layers x hidden x context) x tokens/s / peak",
        TRAINING_COLUMNS,
        ([] if args.toy else [guide_row()]) + [training_row(s, args) for s in trained],
    )
    measured = {s["name"]: s for s in trained if "tokens_per_s" in s}
    for name, fast in measured.items():
        base = measured.get(name.replace("/fast", "/baseline"))
        if name.endswith("/fast") and base:
            ratio = fast["tokens_per_s"] / base["tokens_per_s"]
            memory = [gib(x["result"], "max_gpu_reserved_bytes") for x in (base, fast)]
            print(
                f"speed-up {name.removesuffix('/fast')}: fast / baseline = {ratio:.2f}x tokens/s "
                f"(aim {AIM:g}x: {'met' if ratio >= AIM else 'MISSED'}); "
                f"peak GPU {memory[0]} -> {memory[1]} GiB"
            )
    for s in summaries:
        for line in [*s["row"].notes, *s["result"].get("failed", []), *s["result"].get("said", [])]:
            print(f"{s['name']}: {line}")
    for s in summaries:
        if s["row"].kind == "generate":
            print_table(
                f"Generation on {device}{sizes}: random weights, a 32-token prompt",
                ["row", "setup", "new tokens", "seconds", "tokens/s", "speed vs plain",
                 "same greedy tokens"],
                generation_rows(s),
            )  # fmt: skip


def generation_rows(s: dict) -> list[list[str]]:
    runs = s["result"].get("runs", [])
    if not runs:
        why = s["result"].get("status") or s["result"].get("error", "no result")
        return [[s["name"], "-", why[:70], "-", "-", "-", "-"]]
    plain, rows = runs[0], []
    for run in runs:
        if "error" in run:
            rows.append([s["name"], run["setup"], run["error"][:70], "-", "-", "-", "-"])
            continue
        new, seconds = len(run["ids"]), run["seconds"]
        # How many tokens, from the first, match the plain model's greedy choice (a kernel that
        # stopped early would give fewer: hence not strict).
        pairs = zip(run["ids"], plain["ids"], strict=False)
        same = next((i for i, (a, b) in enumerate(pairs) if a != b), new)
        speed = fmt(plain["seconds"] / seconds) + "x"
        rows.append(
            [
                s["name"],
                run["setup"],
                str(new),
                fmt(seconds),
                f"{new / seconds:,.1f}",
                speed,
                f"{same}/{new}",
            ]
        )
    return rows


def zero_setting(text: str) -> tuple[str, object]:
    """`overlap_comm=false` -> ("overlap_comm", False): the value is read as JSON."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=JSON, e.g. overlap_comm=false")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not JSON ({error.msg})") from None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        nargs="+",
        default=["*"],
        metavar="PATTERN",
        help="Rows to run, as shell patterns of their names, e.g. 'gpt2-xl/*' "
        "'llama-3.2-3b/lora-15/*' gpt-neo-2.7B/generate (default: all, in priority order).",
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="Timed optimizer steps per row (default 4)."
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="Untimed first steps per row (default 2)."
    )
    parser.add_argument(
        "--toy", action="store_true", help=f"Two-layer, 64-wide models, {TOY_BLOCK}-token blocks."
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="Run on the CPU (no caps, fp32 for fp16); use with --toy.",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="The GPU's dense BF16 peak for MFU (default: known for H200, H100, A100, L4, RTX 4090, V100).",
    )
    parser.add_argument(
        "--run_timeout", type=int, default=240, help="Seconds one row may take (default 240)."
    )
    parser.add_argument(
        "--deadline_s",
        type=int,
        default=540,
        help="Seconds from the script's start after which every row still going is stopped; none "
        "starts with under a minute left, so the script ends within 9 minutes (default 540).",
    )
    parser.add_argument(
        "--zero",
        type=zero_setting,
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="Change a zero_optimization setting of the guide rows, e.g. overlap_comm=false or "
        "reduce_bucket_size=5e7 (repeatable), to measure a proposed config change.",
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument("--worker", type=Path, default=None, help="Internal: run one spec file.")
    parser.add_argument(
        "--local_rank", type=int, default=0, help="Set by the deepspeed launcher; one GPU: 0."
    )
    args = parser.parse_args()
    args.zero = dict(args.zero)
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args.worker)
        return
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: no CUDA GPU here; for a code-path check on a CPU pass --toy --cpu")
    missing = missing_packages(args.cpu)
    rows = [row for entry in PRIORITY for row in expand(*entry, missing)]
    rows = [row for row in rows if any(fnmatch.fnmatch(row.name, p) for p in args.only)]
    summaries = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        models: dict[str, Path] = {}
        for row in rows:
            result = run_row(row, args, Path(scratch), models)
            print(f"{row.name}: after {time.monotonic() - STARTED:.0f} s", flush=True)
            summaries.append(summarize(row, result, args))
    report(summaries, args)
    print(f"\ntotal: {time.monotonic() - STARTED:.0f} s", flush=True)
    if args.json:
        plain = [{**s, "row": asdict(s["row"])} for s in summaries]
        args.json.write_text(json.dumps(plain, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
