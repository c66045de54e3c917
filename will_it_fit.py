#!/usr/bin/env python
"""Will it fit? Plan a fine-tuning run's GPU memory and host RAM from the model's config alone.

From a model's config (no weights are read or allocated), a DeepSpeed config, the batch and
block sizes and the number of GPUs, print what the run needs on each GPU and in each node's RAM,
compare it with a machine, say whether it fits and, when it does not, name the cheapest change
that does: a smaller micro-batch with more accumulation, smaller buckets, the ZeRO-3 config, or
more GPUs.

    python will_it_fit.py --model gpt2-xl --deepspeed ds_config.json \\
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \\
        --gpu_memory 16GB --ram 78GB

Model states (weights, gradients, optimizer states) are DeepSpeed's own estimates; the rest
(activations with gradient checkpointing, DeepSpeed's buffers, the peak while saving) follow the
formulas documented in each function. Sizes are in GiB (2**30 bytes), the unit DeepSpeed's
estimators and nvidia-smi use: a "16 GB" V100 has 16 GiB, and "GB" on the command line means GiB.

Exit status: 0 fits, 1 does not fit (or there is no GPU to compare with), 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "will_it_fit.py"
GIB = 2**30
# Not resolved: a symlinked copy of the repo should name its own configs, not the originals.
HERE = Path(__file__).absolute().parent

# The configs the search may switch to, looked up beside this script so it works from any cwd.
ZERO3_CONFIG = HERE / "ds_config_zero3.json"
SMALL_BUCKETS_CONFIG = HERE / "ds_config_gptneo.json"
# The guide's fallback for tight GPUs: "reduce allgather_bucket_size and reduce_bucket_size to 5e7".
SMALL_BUCKET = 50_000_000

# Fixed costs a measurement sees but no formula gives: the CUDA context with cuBLAS/cuDNN
# workspaces and the caching allocator's slack on each GPU, and on the host each training
# process's Python, torch and CUDA libraries, tokenizer and tokenized data.
CUDA_CONTEXT = 1 * GIB
RUNTIME_RAM = 3 * GIB

# Bytes per logit held at the loss: the 16-bit logits, the fp32 copy transformers' loss makes
# (ForCausalLMLoss upcasts), and the fp32 log-softmax that cross-entropy keeps for backward
# (its fp32 gradient later takes that place).
LOGIT_BYTES = 2 + 4 + 4

# These families' eager attention computes query x key in fp32 (HF casts q and k up), so their
# scores and saved q, k take twice the bytes of a 16-bit model's.
FP32_ATTENTION = {"gpt_neo", "gptj"}
# Activations transformers writes as several Python tensor operations (autograd saves each step).
PYTHON_GELUS = {"gelu_new"}

# Published configs (from each model's config.json on the Hugging Face hub), so the planner
# needs no download: only the fields that set the architecture's size.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "model_type": "gpt2",
        "n_layer": 12,
        "n_embd": 768,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
    },
    "gpt2-medium": {
        "model_type": "gpt2",
        "n_layer": 24,
        "n_embd": 1024,
        "n_head": 16,
        "n_positions": 1024,
        "vocab_size": 50257,
    },
    "gpt2-large": {
        "model_type": "gpt2",
        "n_layer": 36,
        "n_embd": 1280,
        "n_head": 20,
        "n_positions": 1024,
        "vocab_size": 50257,
    },
    "gpt2-xl": {
        "model_type": "gpt2",
        "n_layer": 48,
        "n_embd": 1600,
        "n_head": 25,
        "n_positions": 1024,
        "vocab_size": 50257,
    },
    "EleutherAI/gpt-neo-125M": {
        "model_type": "gpt_neo",
        "num_layers": 12,
        "hidden_size": 768,
        "num_heads": 12,
        "attention_types": [[["global", "local"], 6]],
        "window_size": 256,
        "max_position_embeddings": 2048,
        "vocab_size": 50257,
    },
    "EleutherAI/gpt-neo-1.3B": {
        "model_type": "gpt_neo",
        "num_layers": 24,
        "hidden_size": 2048,
        "num_heads": 16,
        "attention_types": [[["global", "local"], 12]],
        "window_size": 256,
        "max_position_embeddings": 2048,
        "vocab_size": 50257,
    },
    "EleutherAI/gpt-neo-2.7B": {
        "model_type": "gpt_neo",
        "num_layers": 32,
        "hidden_size": 2560,
        "num_heads": 20,
        "attention_types": [[["global", "local"], 16]],
        "window_size": 256,
        "max_position_embeddings": 2048,
        "vocab_size": 50257,
    },
    "EleutherAI/gpt-j-6b": {
        "model_type": "gptj",
        "n_layer": 28,
        "n_embd": 4096,
        "n_head": 16,
        "n_positions": 2048,
        "rotary_dim": 64,
        "vocab_size": 50400,
        "tie_word_embeddings": False,
    },
    "facebook/opt-13b": {
        "model_type": "opt",
        "num_hidden_layers": 40,
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "ffn_dim": 20480,
        "word_embed_proj_dim": 5120,
        "max_position_embeddings": 2048,
        "vocab_size": 50272,
        "do_layer_norm_before": True,
    },
}
# The hub moved OpenAI's checkpoints under an organisation; both spellings name the same model.
HUB_PREFIXES = ("openai-community/",)


class PlanError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs to know about a model, all derived from its config."""

    name: str
    model_type: str
    params: int
    largest_layer_params: int
    largest_param: int
    block_params: int
    param_sizes: tuple[int, ...]
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int
    max_positions: int
    attention: str
    activation: str


@dataclass(frozen=True)
class ZeroSettings:
    """The parts of a DeepSpeed config that decide memory, with "auto" resolved as the Trainer does."""

    source: str
    stage: int
    offload_optimizer: str
    offload_param: str
    reduce_bucket_size: int
    allgather_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    prefetch_bucket_size: int
    persistence_threshold: int
    max_live_parameters: int
    gather_16bit_on_save: bool
    edit: str = ""


@dataclass(frozen=True)
class Run:
    """The shape of the training run being planned."""

    micro_batch: int
    grad_accum: int
    block_size: int
    gpus_per_node: int
    nodes: int
    precision: str
    # run_clm.py's default; False plans `--gradient_checkpointing False`.
    checkpointing: bool = True

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.total_gpus


@dataclass(frozen=True)
class Machine:
    """Memory of one GPU and of one node's RAM, in bytes; gpu None when there is no GPU to use."""

    gpu: int | None
    ram: int
    gpu_source: str
    ram_source: str


@dataclass(frozen=True)
class Item:
    label: str
    size: int


@dataclass(frozen=True)
class Plan:
    """What one run needs, item by item, against one machine."""

    model: ModelFacts
    zero: ZeroSettings
    run: Run
    machine: Machine
    states_cpu: int
    states_gpu: int
    gpu_items: tuple[Item, ...]
    ram_items: tuple[Item, ...]

    @property
    def gpu_total(self) -> int:
        return sum(item.size for item in self.gpu_items)

    @property
    def ram_total(self) -> int:
        return sum(item.size for item in self.ram_items)

    @property
    def gpu_fits(self) -> bool:
        return self.machine.gpu is not None and self.gpu_total <= self.machine.gpu

    @property
    def ram_fits(self) -> bool:
        return self.ram_total <= self.machine.ram

    @property
    def fits(self) -> bool:
        return self.gpu_fits and self.ram_fits


@dataclass(frozen=True)
class Change:
    """A change to the run that the search tried, and the plan it gives."""

    what: str
    plan: Plan


def parse_size(text: str) -> int:
    """Bytes in a size like 16GB, 16GiB, 16 (GiB), 16160MiB or 1.5TB; GB means GiB here."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 16GB)")
    unit = (match.group(2) or "g")[0].lower()
    # Cards and clouds sell "16 GB" meaning 16 GiB; counting GB as 10**9 would shrink every GPU.
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be positive: {text!r}")
    return size


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def true_or_false(text: str) -> bool:
    """The Trainer's spelling of a boolean flag value: True/False, also yes/no and 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not True or False")


def plural(number: int, word: str) -> str:
    return f"{number} {word}" if number == 1 else f"{number} {word}s"


def gib(size: float) -> str:
    return f"{size / GIB:.2f}"


def count(value: float) -> str:
    """2e8 -> "2e8", 6553600 -> "6.55e6": bucket sizes the way DeepSpeed configs spell them."""
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value))
    return f"{value / 10**exponent:.3g}e{exponent}"


def shown(path: Path) -> str:
    """A config path as a user would type it from the current directory."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def read_json(path: Path) -> Any:
    """Parse a JSON file, naming the file and line of a syntax error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}, line {exc.lineno}: malformed JSON: {exc.msg}") from None


def published_config(spec: str) -> tuple[str, dict[str, Any]] | None:
    """The built-in config named by a hub name, matched case-insensitively."""
    wanted = spec.lower()
    for prefix in HUB_PREFIXES:
        wanted = wanted.removeprefix(prefix)
    for name, config in PUBLISHED_CONFIGS.items():
        if name.lower() == wanted:
            return name, dict(config)
    return None


def read_model_config(spec: str) -> tuple[str, dict[str, Any]]:
    """Model name and config dict from a model directory, a config.json, or a published name."""
    path = Path(spec)
    # A local directory wins over a hub name, as it does for from_pretrained and run_clm.py.
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise PlanError(f"{spec}: a directory without config.json")
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
            raise PlanError(f'{path}: not a model config (no "model_type")')
        return spec, data
    found = published_config(spec)
    if found is None:
        names = ", ".join(PUBLISHED_CONFIGS)
        raise PlanError(
            f"unknown model {spec!r}: give a model directory, a config.json, or one of: {names}"
        )
    return found


def model_facts(spec: str, attention: str = "auto") -> ModelFacts:
    """Count a model's parameters exactly by building it on the meta device: no memory, no weights."""
    name, data = read_model_config(spec)
    # Heavy imports wait until the cheap input checks passed, so a typo is reported at once.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(data)
    model_type = data.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError, KeyError) as exc:
        raise PlanError(f"{spec}: transformers cannot build this config: {exc}") from None
    kwargs = {} if attention == "auto" else {"attn_implementation": attention}
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except (ValueError, TypeError, KeyError, ImportError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(
            f"{spec}: not a causal language model transformers can build: {first_line}"
        ) from None
    # parameters() yields a tied weight once, as DeepSpeed's own counter (by data_ptr) does.
    sizes = tuple(p.numel() for p in model.parameters())
    # DeepSpeed's ZeRO-3 estimator wants the biggest single module's own parameters.
    largest_layer = max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()
    )
    # The transformer blocks are the longest ModuleList; ZeRO-3 gathers about one block at a time.
    blocks = max(
        (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None
    )
    block = sum(p.numel() for p in blocks[0].parameters()) if blocks else largest_layer
    hidden = int(config.hidden_size)
    intermediate = next(
        (
            int(value)
            for key in ("n_inner", "intermediate_size", "ffn_dim")
            if (value := getattr(config, key, None)) is not None
        ),
        4 * hidden,
    )
    return ModelFacts(
        name=name,
        model_type=model_type,
        params=sum(sizes),
        largest_layer_params=largest_layer,
        largest_param=max(sizes),
        block_params=block,
        param_sizes=sizes,
        layers=int(config.num_hidden_layers),
        hidden=hidden,
        heads=int(config.num_attention_heads),
        vocab=int(config.vocab_size),
        intermediate=intermediate,
        max_positions=int(config.max_position_embeddings),
        attention=str(model.config._attn_implementation),
        activation=str(
            getattr(config, "activation_function", None) or getattr(config, "hidden_act", "")
        ),
    )


def _zero_count(zero: dict[str, Any], key: str, default: int, auto: int | None, source: str) -> int:
    value = zero.get(key, default)
    if value == "auto":
        if auto is None:
            raise PlanError(
                f'{source}: zero_optimization.{key} "auto" is not filled in by the Trainer; give a number'
            )
        return auto
    # JSON has no integers like 2e8: DeepSpeed accepts the float and so do we.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise PlanError(
            f'{source}: zero_optimization.{key} must be a number or "auto", not {value!r}'
        )
    return int(value)


def _offload_device(block: Any, legacy: Any, source: str, key: str) -> str:
    # The 2021 configs said "cpu_offload": true; DeepSpeed still reads it as offload_optimizer.
    if block is None:
        return "cpu" if legacy is True else "none"
    device = block.get("device", "none") if isinstance(block, dict) else None
    if device not in ("none", "cpu", "nvme"):
        raise PlanError(
            f'{source}: zero_optimization.{key} needs "device": "cpu", "nvme" or "none"'
        )
    return device


def zero_settings(config: Any, source: str, hidden: int) -> ZeroSettings:
    """Read a parsed DeepSpeed config, resolving "auto" as transformers' Trainer integration does."""
    if not isinstance(config, dict):
        raise PlanError(f"{source}: a DeepSpeed config must be a JSON object")
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise PlanError(f"{source}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise PlanError(
            f"{source}: ZeRO stage {stage!r}: the planner covers stages 2 and 3, those DeepSpeed estimates"
        )
    offload_optimizer = _offload_device(
        zero.get("offload_optimizer"), zero.get("cpu_offload"), source, "offload_optimizer"
    )
    offload_param = "none"
    if stage == 3:
        offload_param = _offload_device(
            zero.get("offload_param"), zero.get("cpu_offload_params"), source, "offload_param"
        )
    gather = zero.get(
        "stage3_gather_16bit_weights_on_model_save",
        zero.get("stage3_gather_fp16_weights_on_model_save", False),
    )
    return ZeroSettings(
        source=source,
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_param=offload_param,
        # The "auto" values are those HfTrainerDeepSpeedConfig fills in from the hidden size.
        reduce_bucket_size=_zero_count(
            zero, "reduce_bucket_size", 500_000_000, hidden * hidden, source
        ),
        allgather_bucket_size=_zero_count(zero, "allgather_bucket_size", 500_000_000, None, source),
        # DeepSpeed turns overlap_comm on by default for stage 3 only.
        overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
        contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        prefetch_bucket_size=_zero_count(
            zero, "stage3_prefetch_bucket_size", 50_000_000, int(0.9 * hidden * hidden), source
        ),
        persistence_threshold=_zero_count(
            zero, "stage3_param_persistence_threshold", 100_000, 10 * hidden, source
        ),
        max_live_parameters=_zero_count(
            zero, "stage3_max_live_parameters", 1_000_000_000, None, source
        ),
        gather_16bit_on_save=gather is True,
    )


def load_zero_settings(path: Path, hidden: int) -> ZeroSettings:
    return zero_settings(read_json(path), shown(path), hidden)


def deepspeed_estimators() -> tuple[Any, Any]:
    """DeepSpeed's own model-state estimators (ZeRO-2, ZeRO-3)."""
    import torch

    # The estimators are arithmetic; on a machine without a GPU DeepSpeed would otherwise warn
    # while guessing an accelerator the planner never uses.
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # DeepSpeed's logger writes to the stdout it finds at import; point it at stderr so the
    # plan on stdout stays clean for pipes.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def model_states(model: ModelFacts, zero: ZeroSettings, run: Run) -> tuple[int, int]:
    """(host RAM per node, memory per GPU) for weights, gradients and optimizer states, from DeepSpeed."""
    zero2, zero3 = deepspeed_estimators()
    # nvme offload still stages through host memory; the estimators only know "offloaded or not".
    offload = zero.offload_optimizer != "none"
    if zero.stage == 2:
        cpu, gpu = zero2(
            total_params=model.params,
            num_gpus_per_node=run.gpus_per_node,
            num_nodes=run.nodes,
            cpu_offload=offload,
        )
        return cpu, gpu
    # The Trainer loads a model under ZeRO-3 with deepspeed.zero.Init, hence zero_init.
    cpu, gpu, _largest_layer_memory = zero3(
        total_params=model.params,
        largest_layer_params=model.largest_layer_params,
        num_gpus_per_node=run.gpus_per_node,
        num_nodes=run.nodes,
        cpu_offload=offload,
        cpu_offload_params=zero.offload_param != "none",
        zero_init=True,
    )
    return cpu, gpu


def activation_items(model: ModelFacts, run: Run) -> list[Item]:
    """GPU memory for activations of one micro-batch, 16-bit.

    With checkpointing each transformer block keeps only its input hidden states (2 bytes per
    value); in backward one block at a time is recomputed and holds its full activations.
    Without it, every block keeps its full activations from forward to backward. A block's full
    activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", section 4.1), 34*h bytes per token for a 4*h MLP plus 5*heads*seq for
    the attention scores; written for any MLP width i it is 18*h + 4*i. Attention kernels
    that never store the scores (sdpa, flash) drop the last term; eager attention in fp32 (GPT-Neo,
    GPT-J) keeps fp32 q, k (+4*h) and fp32 scores (9 instead of 5 bytes). GPT-2's, GPT-Neo's and
    GPT-J's `gelu_new` is written in transformers as Python tensor operations, so autograd keeps
    three more tensors of the MLP's width (+6*i; measured on a bf16 GPT-2 block with
    saved_tensors_hooks: 54*h bytes per token against 30*h for the fused GELU, no dropout). The logits and the
    loss's fp32 copies (LOGIT_BYTES per value) are usually the biggest single item at batch 8.
    """
    tokens = run.micro_batch * run.block_size
    h = model.hidden
    per_token = 18 * h + 4 * model.intermediate
    if model.activation in PYTHON_GELUS:
        per_token += 6 * model.intermediate
    if model.attention == "eager":
        fp32_scores = model.model_type in FP32_ATTENTION
        per_token += (4 * h if fp32_scores else 0) + model.heads * run.block_size * (
            9 if fp32_scores else 5
        )
    if run.checkpointing:
        blocks = [
            Item(
                f"checkpointed hidden states ({model.layers + 1} x {tokens} tokens x {h})",
                (model.layers + 1) * tokens * h * 2,
            ),
            Item(
                f"one block recomputed in backward ({model.attention} attention)",
                tokens * per_token,
            ),
        ]
    else:
        blocks = [
            Item(
                f"all {model.layers} blocks' activations, not checkpointed ({model.attention} attention)",
                model.layers * tokens * per_token,
            )
        ]
    return [
        *blocks,
        Item(
            f"logits and loss ({tokens} tokens x {model.vocab} vocab x {LOGIT_BYTES} bytes)",
            tokens * model.vocab * LOGIT_BYTES,
        ),
    ]


def buffer_items(model: ModelFacts, zero: ZeroSettings) -> list[Item]:
    """DeepSpeed's GPU buffers besides model states, all in 16 bits (sizes from its stage 2/3 code)."""
    items = []
    if zero.contiguous_gradients:
        # Gradients are copied into a bucket of reduce_bucket_size; overlap_comm double-buffers it.
        buffers = 2 if zero.overlap_comm else 1
        items.append(
            Item(
                f"gradient buckets ({buffers} x reduce_bucket_size {count(zero.reduce_bucket_size)})",
                buffers * zero.reduce_bucket_size * 2,
            )
        )
    if zero.stage == 2:
        items.append(
            Item(
                f"all-gather bucket (allgather_bucket_size {count(zero.allgather_bucket_size)})",
                zero.allgather_bucket_size * 2,
            )
        )
        if zero.offload_optimizer != "none":
            # Offloaded gradients pass through a staging buffer the size of the largest parameter.
            items.append(
                Item(
                    f"offload staging buffer (largest parameter, {count(model.largest_param)})",
                    model.largest_param * 2,
                )
            )
    else:
        items.append(
            Item(
                f"parameter prefetch (stage3_prefetch_bucket_size {count(zero.prefetch_bucket_size)})",
                zero.prefetch_bucket_size * 2,
            )
        )
        # Gathered 16-bit weights in use: a block at a time (the estimator counts only the largest
        # module), never more than stage3_max_live_parameters.
        live = min(model.block_params, zero.max_live_parameters)
        items.append(Item(f"one block's parameters gathered ({count(live)})", live * 2))
        persistent = sum(size for size in model.param_sizes if size <= zero.persistence_threshold)
        items.append(
            Item(
                f"small parameters kept whole (<= {count(zero.persistence_threshold)} each)",
                persistent * 2,
            )
        )
    return items


def save_peak(model: ModelFacts, zero: ZeroSettings, run: Run) -> Item:
    """Extra host RAM while the Trainer saves a model or checkpoint.

    Under ZeRO-2, and ZeRO-3 with stage3_gather_16bit_weights_on_model_save, rank 0 pulls the
    whole 16-bit state dict into host memory to write model.safetensors (and again, one after the
    other, for the checkpoint's module states). The fp32 optimizer states written with a
    checkpoint are already in host memory when offloaded and are written without a copy.
    Without the gather, ZeRO-3 writes only each GPU's own partition. Loading comes earlier, before
    the optimizer states exist, so it is not the peak. Pinned staging buffers and the 16-bit
    copies ZeRO-2 keeps for gradient accumulation on the host are left to the 1.5 buffer factor
    in DeepSpeed's own estimate rather than counted twice.
    """
    if zero.stage == 2 or zero.gather_16bit_on_save:
        return Item("16-bit weights gathered while saving", model.params * 2)
    return Item("16-bit partitions copied while saving", model.params * 2 // run.total_gpus)


def plan(model: ModelFacts, zero: ZeroSettings, run: Run, machine: Machine) -> Plan:
    """Everything one run needs per GPU and per node, item by item."""
    if run.block_size > model.max_positions:
        raise PlanError(
            f"block size {run.block_size} is longer than {model.name}'s {model.max_positions} positions"
        )
    states_cpu, states_gpu = model_states(model, zero, run)
    estimator = "estimate_zero2" if zero.stage == 2 else "estimate_zero3"
    gpu_items = [
        Item(f"model states (DeepSpeed {estimator}_model_states_mem_needs)", states_gpu),
        *buffer_items(model, zero),
        *activation_items(model, run),
        Item("CUDA context, workspaces, allocator slack", CUDA_CONTEXT),
    ]
    ram_items = [
        Item(f"model states (DeepSpeed {estimator}_model_states_mem_needs)", states_cpu),
        save_peak(model, zero, run),
        Item(
            f"Python, torch, CUDA libraries, data ({gib(RUNTIME_RAM)} GiB per GPU process)",
            RUNTIME_RAM * run.gpus_per_node,
        ),
    ]
    return Plan(
        model, zero, run, machine, states_cpu, states_gpu, tuple(gpu_items), tuple(ram_items)
    )


def smaller_micro_batches(run: Run) -> list[Run]:
    """Smaller micro-batches, biggest first, with the accumulation that keeps the effective batch."""
    return [
        dataclasses.replace(
            run, micro_batch=size, grad_accum=run.grad_accum * run.micro_batch // size
        )
        for size in range(run.micro_batch - 1, 0, -1)
        if run.micro_batch % size == 0
    ]


def with_gpus(run: Run, gpus_per_node: int, nodes: int) -> Run:
    """The run on more GPUs, accumulating less (or smaller micro-batches) to keep the effective batch.

    When the effective batch does not split evenly over the GPUs, it grows to the next size
    that does with one sequence per GPU at least; the plan prints the new size.
    """
    total = gpus_per_node * nodes
    per_gpu = max(1, run.effective_batch // total)
    if per_gpu * total != run.effective_batch:
        per_gpu = math.ceil(run.effective_batch / total)
    micro = max(size for size in range(1, min(run.micro_batch, per_gpu) + 1) if per_gpu % size == 0)
    return dataclasses.replace(
        run,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        micro_batch=micro,
        grad_accum=per_gpu // micro,
    )


def small_bucket_settings(model: ModelFacts, zero: ZeroSettings) -> ZeroSettings | None:
    """The current ZeRO-2 config with 5e7 buckets, named after a config file that has exactly that."""
    if zero.stage != 2 or max(zero.reduce_bucket_size, zero.allgather_bucket_size) <= SMALL_BUCKET:
        return None
    smaller = dataclasses.replace(
        zero,
        reduce_bucket_size=min(zero.reduce_bucket_size, SMALL_BUCKET),
        allgather_bucket_size=min(zero.allgather_bucket_size, SMALL_BUCKET),
    )
    if SMALL_BUCKETS_CONFIG.is_file():
        with contextlib.suppress(PlanError):
            ready = load_zero_settings(SMALL_BUCKETS_CONFIG, model.hidden)
            if dataclasses.replace(ready, source=zero.source) == smaller:
                return ready
    return dataclasses.replace(
        smaller, edit='with "allgather_bucket_size": 5e7 and "reduce_bucket_size": 5e7'
    )


def smaller_micro_batch(
    model: ModelFacts, zero: ZeroSettings, run: Run, machine: Machine
) -> Change | None:
    """The biggest smaller micro-batch that fits, with the accumulation that keeps the batch."""
    for candidate in smaller_micro_batches(run):
        found = plan(model, zero, candidate, machine)
        if found.fits:
            return Change(
                f"smaller micro-batch: {candidate.micro_batch} x {candidate.grad_accum} accumulation steps",
                found,
            )
    return None


def cheapest_change(
    model: ModelFacts, zero: ZeroSettings, run: Run, machine: Machine
) -> Change | None:
    """The first change that fits, tried from cheapest to dearest.

    In the order the issue and the guide give: a smaller micro-batch with more accumulation (same
    effective batch, only slower), smaller DeepSpeed buckets, the ZeRO-3 config (parameters
    offloaded too: much slower), then more GPUs, on this node and then on more nodes. A run
    planned without activation checkpointing first tries smaller micro-batches without it, then
    turns it back on and goes down the same list.
    """
    if not run.checkpointing:
        # Keep the user's choice of speed over memory while a smaller micro-batch allows it.
        change = smaller_micro_batch(model, zero, run, machine)
        if change is not None:
            return change
        checkpointed = dataclasses.replace(run, checkpointing=True)
        found = plan(model, zero, checkpointed, machine)
        back_on = "activation checkpointing back on (drop --gradient_checkpointing False)"
        if found.fits:
            return Change(back_on, found)
        change = cheapest_change(model, zero, checkpointed, machine)
        return None if change is None else Change(f"{back_on} + {change.what}", change.plan)
    change = smaller_micro_batch(model, zero, run, machine)
    if change is not None:
        return change
    micro = smaller_micro_batches(run)
    configs = [(zero, "")]
    small = small_bucket_settings(model, zero)
    if small is not None:
        configs.append((small, "5e7 buckets"))
        for candidate in [run, *micro]:
            found = plan(model, small, candidate, machine)
            if found.fits:
                return Change(_describe("5e7 buckets", run, candidate), found)
    if ZERO3_CONFIG.is_file() and zero.stage != 3:
        zero3 = load_zero_settings(ZERO3_CONFIG, model.hidden)
        configs.append((zero3, "ZeRO-3 with parameters and optimizer offloaded to CPU"))
        for candidate in [run, *micro]:
            found = plan(model, zero3, candidate, machine)
            if found.fits:
                return Change(_describe(configs[-1][1], run, candidate), found)
    layouts = sorted(
        {
            (g, n)
            for g in {run.gpus_per_node, 2, 4, 8}
            for n in {run.nodes, 2, 4, 8}
            if g >= run.gpus_per_node and n >= run.nodes
        }
        - {(run.gpus_per_node, run.nodes)},
        key=lambda layout: (layout[0] * layout[1], layout[1]),
    )
    for gpus_per_node, nodes in layouts:
        spread = with_gpus(run, gpus_per_node, nodes)
        for settings, why in configs:
            for candidate in [spread, *smaller_micro_batches(spread)]:
                found = plan(model, settings, candidate, machine)
                if found.fits:
                    layout = f"more GPUs: {plural(nodes, 'node')} x {plural(gpus_per_node, 'GPU')}"
                    return Change(
                        _describe(" + ".join(filter(None, [layout, why])), spread, candidate), found
                    )
    return None


def _describe(what: str, before: Run, after: Run) -> str:
    if after.micro_batch == before.micro_batch:
        return what
    return f"{what} + micro-batch {after.micro_batch} x {after.grad_accum} accumulation steps"


def command(model_spec: str, zero: ZeroSettings, run: Run) -> str:
    """The guide's launch command with this plan's flags."""
    launcher = "deepspeed"
    if run.nodes > 1:
        launcher += f" --hostfile hostfile --num_nodes={run.nodes}"
    launcher += f" --num_gpus={run.gpus_per_node}"
    return (
        f"{launcher} run_clm.py --deepspeed {zero.source} --model_name_or_path {model_spec} "
        f"--per_device_train_batch_size {run.micro_batch} --gradient_accumulation_steps {run.grad_accum} "
        f"--block_size {run.block_size} --{run.precision}"
        + ("" if run.checkpointing else " --gradient_checkpointing False")
    )


def describe_zero(zero: ZeroSettings) -> str:
    parts = [f"ZeRO stage {zero.stage}", f"optimizer offload {zero.offload_optimizer}"]
    if zero.stage == 3:
        parts.append(f"parameter offload {zero.offload_param}")
    else:
        parts.append(
            f"buckets allgather {count(zero.allgather_bucket_size)} / reduce {count(zero.reduce_bucket_size)}"
        )
    return ", ".join(parts)


def render(found: Plan) -> str:
    """The plan as a table a user can read: where the memory goes, and the verdict per resource."""
    model, run, machine = found.model, found.run, found.machine
    lines = [
        f"model    {model.name}: {model.params / 1e9:.2f}B parameters, {model.layers} layers, "
        f"hidden {model.hidden}, {model.heads} heads, vocab {model.vocab}",
        f"config   {found.zero.source}: {describe_zero(found.zero)}",
        f"run      {plural(run.nodes, 'node')} x {plural(run.gpus_per_node, 'GPU')}, "
        f"micro-batch {run.micro_batch} x {run.grad_accum} accumulation = {run.effective_batch} sequences "
        f"of {run.block_size} tokens per step, {run.precision}, "
        f"activation checkpointing {'on' if run.checkpointing else 'off'}",
        "",
    ]
    width = max(len(item.label) for item in (*found.gpu_items, *found.ram_items)) + 2
    for title, items, total, have, source, fits in (
        (
            "GPU memory, per GPU",
            found.gpu_items,
            found.gpu_total,
            machine.gpu,
            machine.gpu_source,
            found.gpu_fits,
        ),
        (
            "host RAM, per node",
            found.ram_items,
            found.ram_total,
            machine.ram,
            machine.ram_source,
            found.ram_fits,
        ),
    ):
        lines.append(f"{title:<{width}}{'GiB':>8}")
        lines.extend(f"  {item.label:<{width - 2}}{gib(item.size):>8}" for item in items)
        if have is None:
            verdict = f"no GPU here ({source}): pass --gpu_memory"
        else:
            verdict = f"of {gib(have)} GiB ({source}): {'fits' if fits else 'does NOT fit'}"
        lines.append(f"  {'total':<{width - 2}}{gib(total):>8}  {verdict}")
        lines.append("")
    return "\n".join(lines)


def this_machine(gpu_memory: int | None, ram: int | None) -> Machine:
    """The machine to compare with: the flags, else this machine's first GPU and its RAM."""
    gpu, gpu_source = gpu_memory, "--gpu_memory"
    if gpu is None:
        import torch

        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(0)
            gpu, gpu_source = properties.total_memory, f"this machine's {properties.name}"
        else:
            gpu_source = "this machine has none"
    ram_source = "--ram"
    if ram is None:
        import psutil

        ram, ram_source = psutil.virtual_memory().total, "this machine"
    return Machine(gpu=gpu, ram=ram, gpu_source=gpu_source, ram_source=ram_source)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Plan the GPU memory and host RAM a DeepSpeed fine-tuning run needs, from the "
        "model's config alone, and say whether it fits.",
        epilog="Sizes like 16GB mean GiB (2**30 bytes), as on GPU spec sheets. "
        "Exit status: 0 fits, 1 does not fit, 2 bad input.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model directory or config.json, or a published name: " + ", ".join(PUBLISHED_CONFIGS),
    )
    parser.add_argument(
        "--deepspeed", default="ds_config.json", help="DeepSpeed config JSON (default: %(default)s)"
    )
    parser.add_argument(
        "--per_device_train_batch_size",
        type=positive_int,
        default=8,
        help="micro-batch per GPU (default: %(default)s)",
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=1,
        help="micro-batches per optimizer step; kept in the suggestions' effective batch (default: %(default)s)",
    )
    parser.add_argument(
        "--block_size",
        type=positive_int,
        default=None,
        help="tokens per sequence (default: the model's positions, at most 1024, as run_clm.py does)",
    )
    parser.add_argument(
        "--num_gpus", type=positive_int, default=1, help="GPUs per node (default: %(default)s)"
    )
    parser.add_argument(
        "--num_nodes", type=positive_int, default=1, help="nodes (default: %(default)s)"
    )
    parser.add_argument(
        "--gpu_memory",
        type=parse_size,
        default=None,
        help="memory of one GPU, e.g. 16GB (default: this machine's GPU)",
    )
    parser.add_argument(
        "--ram",
        type=parse_size,
        default=None,
        help="host RAM per node, e.g. 78GB (default: this machine's)",
    )
    parser.add_argument(
        "--attn_implementation",
        choices=("auto", "eager", "sdpa"),
        default="auto",
        help="attention kernel to plan for; eager stores the attention scores as the 2021 runs did "
        "(default: what transformers picks for the model)",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        type=true_or_false,
        default=True,
        help="plan with activations recomputed in backward, as run_clm.py does by default; False "
        "plans the faster run that keeps them (default: %(default)s)",
    )
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument(
        "--fp16",
        dest="precision",
        action="store_const",
        const="fp16",
        help="16-bit float training, as in the guide (default)",
    )
    precision.add_argument(
        "--bf16",
        dest="precision",
        action="store_const",
        const="bf16",
        help="bfloat16 training (same sizes as fp16)",
    )
    parser.set_defaults(precision="fp16")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ds_path = Path(args.deepspeed)
        # Read the DeepSpeed JSON before the model so a broken config is reported at once.
        ds_config = read_json(ds_path)
        model = model_facts(args.model, args.attn_implementation)
        zero = zero_settings(ds_config, args.deepspeed, model.hidden)
        run = Run(
            micro_batch=args.per_device_train_batch_size,
            grad_accum=args.gradient_accumulation_steps,
            block_size=args.block_size or min(1024, model.max_positions),
            gpus_per_node=args.num_gpus,
            nodes=args.num_nodes,
            precision=args.precision,
            checkpointing=args.gradient_checkpointing,
        )
        machine = this_machine(args.gpu_memory, args.ram)
        found = plan(model, zero, run, machine)
        print(render(found))
        if found.fits:
            print(f"verdict: fits. {command(args.model, zero, run)}")
            if run.checkpointing:
                # Host RAM does not depend on checkpointing, so only the GPU is compared, and only
                # with room to spare: the activations are an estimate, and this is an option.
                faster = plan(model, zero, dataclasses.replace(run, checkpointing=False), machine)
                if faster.gpu_total <= 0.9 * machine.gpu:
                    print(
                        f"faster: it also fits without activation checkpointing ({gib(faster.gpu_total)} GiB "
                        "per GPU, 10% or more to spare), which skips the recomputed forward pass, a quarter of each step's "
                        "compute: add --gradient_checkpointing False"
                    )
            return 0
        if machine.gpu is None:
            print(
                "verdict: does not fit: there is no GPU here. Pass --gpu_memory (e.g. 16GB) to plan for one."
            )
            return 1
        change = cheapest_change(model, zero, run, machine)
    except PlanError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if change is None:
        print(
            "verdict: does not fit, and no change the planner tries fits (smaller micro-batch, 5e7 buckets, ZeRO-3, up to 8 nodes x 8 GPUs)."
        )
        return 1
    print(f"verdict: does NOT fit. Cheapest change that fits: {change.what}")
    if change.plan.zero.edit:
        print(f"  edit {change.plan.zero.source} {change.plan.zero.edit}")
    print(
        f"  needs {gib(change.plan.gpu_total)} GiB per GPU, {gib(change.plan.ram_total)} GiB RAM per node; "
        f"{change.plan.run.effective_batch} sequences per step"
    )
    print(f"  {command(args.model, change.plan.zero, change.plan.run)}")
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:
        # A reader like `head` closed the pipe early: the plan is not at fault, so no traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
