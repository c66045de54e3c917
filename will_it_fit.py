#!/usr/bin/env python
"""Will it fit? Plan a fine-tuning run's GPU memory and host RAM from the model's config alone.

Takes run_clm.py's flags or a whole pasted training command, builds the model on the meta device
(no weights are read), prints what the run needs per GPU and per node against this machine (or
--gpu_memory / --ram) and, when it does not fit, the cheapest change that does. What each figure
counts, and why: docs/planner.md. Sizes are GiB, as DeepSpeed and nvidia-smi count them.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shlex
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from functools import cache
from pathlib import Path
from typing import Any

import psutil

from common import UserError, fail, number, true_or_false

PROG, GIB = "will_it_fit.py", 2**30
HERE = Path(__file__).absolute().parent  # not resolved: a linked copy names its own ds_configs
# What measurements see and no formula gives: per GPU the CUDA context, workspaces and allocator
# slack; per training process Python, torch, the CUDA libraries and the data.
CUDA_CONTEXT, RUNTIME_RAM = 1 * GIB, 3 * GIB
# NF4 with double quantization: 4 bits, an 8-bit scale per 64 weights, an fp32 one per 256 scales.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
# GPUs x nodes to spread a run over: fewest GPUs first, filling a node before adding one.
LAYOUTS = sorted(itertools.product((1, 2, 4, 8), repeat=2), key=lambda g: (g[0] * g[1], -g[0]))
# Activation bytes a block keeps per token, in 16 bits, per unit of the hidden size h and of the
# MLP width i; k and v (4 * their width) and eager attention's scores come on top. "frozen": per
# h, what a LoRA run's frozen layers no longer keep for weight gradients (with the MLP's 2*i).
# GPT-style blocks: Korthikanti et al. 2022 (4.1), 5 bytes a score. Llama-style ones (SwiGLU, a
# Python RMSNorm that keeps fp32 copies, no dropout): measured, 6 a score.
BLOCKS = {"gpt": dict(h=14, i=4, score=5, frozen=6), "gated": dict(h=20, i=8, score=6, frozen=8)}
Items = dict[str, int]  # the lines of a plan: what, and its bytes
Zero = Any  # DeepSpeed's DeepSpeedZeroConfig, imported only when a plan needs DeepSpeed
Machine = tuple[int | None, int]  # one GPU's bytes (None: no GPU here), one node's RAM


@dataclass(frozen=True)
class Model:
    """A model's sizes as the plan needs them, counted on the meta device."""

    name: str
    config: Any  # transformers' config: hidden_size, num_hidden_layers, vocab_size, ...
    dtype: str  # what the weights load in
    params: int  # a tied weight once, as DeepSpeed counts
    quantizable: int  # the linear weights bitsandbytes stores in 4 bits (all but lm_head's)
    head: int  # lm_head's weight
    largest: int  # the biggest module's own parameters, as DeepSpeed's ZeRO-3 estimator wants
    block_params: int
    gated: bool  # Llama-style blocks (a gate_proj): BLOCKS["gated"]
    lora_per_rank: int  # adapter parameters per unit of LoRA rank on the targeted layers
    lora_inputs: int  # the targeted layers' input widths, summed over one block


@dataclass(frozen=True)
class Run:
    """The training run, in run_clm.py's terms (the parser's dest names are these fields)."""

    micro_batch: int
    grad_accum: int
    block_size: int
    gpus_per_node: int
    nodes: int
    precision: str  # fp16, bf16, or fp32 when neither flag is given
    checkpointing: bool = True
    deepspeed: str | None = None  # the config file, as typed; None: no DeepSpeed
    zero: Zero | None = None  # its ZeRO settings
    peft: bool = False
    four_bit: bool = False
    lora_r: int = 16
    lora_dropout: float = 0.05
    optim: str | None = None  # None: the Trainer's default AdamW

    @property
    def total_gpus(self) -> int:  # ZeRO partitions over all of them
        return self.gpus_per_node * self.nodes

    @property
    def effective_batch(self) -> int:  # what a change must keep: the sequences per step
        return self.micro_batch * self.grad_accum * self.total_gpus

    def trained(self, model: Model) -> int:  # what gets gradients and optimizer states
        return model.lora_per_rank * self.lora_r if self.peft else model.params


@dataclass(frozen=True)
class Plan:
    """A run's needs, item by item, and whether they fit the machine."""

    model: Model
    run: Run
    gpu_items: Items
    ram_items: Items
    gpu_total: int
    ram_total: int
    fits: bool


def parse_size(text: str) -> int:
    """Bytes in 16GB, 16GiB, 16 (GiB), 16160MiB or 1.5TB: cards sell "16 GB" meaning 16 GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 16GB)")
    power = "kmgt".index(match.group(2).lower() or "g") + 1
    return int(float(match.group(1)) * 2 ** (10 * power))


def count(value: float) -> str:
    """2e8 -> "2e8", 6553600 -> "6.55e6": as DeepSpeed configs write sizes."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e")


def plural(n: int, what: str) -> str:
    """A layout as a person says it: "1 node", "2 nodes"."""
    return f"{n} {what}{'s' * (n > 1)}"


def join(*parts: str) -> str:
    """Changes combined, as the advice names them."""
    return " + ".join(part for part in parts if part)


def read_json(path: Path) -> Any:
    """A JSON file, or a one-line error naming it and, for a syntax error, the line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror or 'cannot read it'}; check the path") from None
    except ValueError as exc:  # malformed JSON, or not text at all
        line, why = getattr(exc, "lineno", 1), getattr(exc, "msg", exc)
        raise UserError(f"{path}, line {line}: not valid JSON ({why}); fix it") from None


@cache
def published() -> dict[str, Any]:
    """published_configs.json: the published models' config fields, the optimizers' states."""
    return read_json(HERE / "published_configs.json")


def find_config(spec: str) -> tuple[str, dict]:
    """A model directory's or config.json's fields, or a published model's, by name."""
    # A local directory wins over a hub name, as it does for from_pretrained and run_clm.py.
    path = Path(spec) / "config.json" if Path(spec).is_dir() else Path(spec)
    if path.is_file():
        return spec, read_json(path)
    # The hub moved OpenAI's checkpoints under an organisation; the name after one is enough.
    wanted = spec.lower().removeprefix("openai-community/")
    for name, config in published()["models"].items():
        if wanted in (name.lower(), name.lower().rsplit("/")[-1]):
            return name, dict(config)
    names = ", ".join(published()["models"])
    raise UserError(f"unknown model {spec!r}: give a model directory, a config.json, or: {names}")


def lora_sizes(model: Any, targets: tuple[str, ...]) -> tuple[int, int]:
    """Adapter parameters per unit of rank, and the adapted layers' input widths in one block,
    as peft's own rules pick the layers ("all-linear": run_clm.py's default). Adds the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    adapter = LoraConfig(r=1, target_modules=list(targets) or "all-linear", task_type="CAUSAL_LM")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = get_peft_model(model, adapter)
    except ValueError as exc:
        raise UserError(f"--lora_target_modules: {str(exc).splitlines()[0]}") from None
    inputs = sum(m.in_features for m in lora.modules() if hasattr(m, "lora_A"))
    return lora.get_nb_trainable_parameters()[0], inputs // model.config.num_hidden_layers


@cache  # building the adapter on 200-odd layers takes peft most of a second
def model_facts(spec: str, attention: str, targets: tuple[str, ...], dtype: str) -> Model:
    """A model directory's, config.json's or published name's sizes, counted on the meta device."""
    name, data = find_config(spec)
    # Heavy imports wait until the cheap input checks passed, so a typo is reported at once.
    import torch
    from torch.nn import Linear, ModuleList
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    # A config without a dtype comes from an fp32 checkpoint, as GPT-2's.
    saved = [data.pop(key, None) for key in ("dtype", "torch_dtype")]
    dtype = next((d for d in saved if d in DTYPES), "float32") if dtype == "auto" else dtype
    chosen = {} if attention == "auto" else {"attn_implementation": attention}
    try:
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        with torch.device("meta"):  # the config builds it, and no weights are allocated
            model = AutoModelForCausalLM.from_config(config, **chosen)
    except (AttributeError, ValueError, TypeError, KeyError, ImportError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{spec}: not a causal LM config transformers can build ({why})") from None
    block = max((m for m in model.modules() if isinstance(m, ModuleList)), key=len)[0]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, (Linear, Conv1D)))
    head = model.get_output_embeddings().weight.numel()
    params, block_params = (sum(p.numel() for p in m.parameters()) for m in (model, block))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    gated = any(path.endswith("gate_proj") for path, _ in block.named_modules())
    sizes = (params, linear - head, head, largest, block_params, gated)
    return Model(name, model.config, dtype, *sizes, *lora_sizes(model, targets))  # lora: last


def zero_settings(config: Any, source: str, hidden: int) -> Zero:
    """A DeepSpeed config's ZeRO settings as DeepSpeed itself reads them (its defaults, its 2021
    names), after resolving the "auto" sizes as transformers' Trainer does."""
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (2, 3):
        raise UserError(f"{source}: ZeRO stage {stage!r}: the planner covers stages 2 and 3")
    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": 0.9 * hidden**2}
    settings = {k: int(auto[k]) if v == "auto" and k in auto else v for k, v in zero.items()}
    # DeepSpeed's logger writes to the stdout it finds at import: keep the plan alone there.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        try:
            return DeepSpeedZeroConfig(**settings)
        except ValueError as exc:  # pydantic's ValidationError: the setting, and why
            why = " ".join(str(exc).splitlines()[1:3])
            raise UserError(f"{source}: zero_optimization: {why}") from None


def offloads(zero: Zero) -> tuple[str, str]:
    """Where ZeRO keeps the optimizer states and the parameters: "none", "cpu" or "nvme"."""
    devices = [o.device if o else "none" for o in (zero.offload_optimizer, zero.offload_param)]
    return devices[0], devices[1] if zero.stage == 3 else "none"  # ZeRO-2 has no parameter offload


def deepspeed_items(model: Model, run: Run) -> tuple[Items, Items]:
    """(per GPU, per node): DeepSpeed's model states, its buffers as its code sizes them, saving."""
    import deepspeed.runtime.zero.stage3 as zero3
    import deepspeed.runtime.zero.stage_1_and_2 as zero2

    zero, stage, n = run.zero, run.zero.stage, run.trained(model)
    layout = {"num_gpus_per_node": run.gpus_per_node, "num_nodes": run.nodes}
    # nvme offload still stages through host memory; the estimators know "offloaded or not".
    offload, params = (device != "none" for device in offloads(zero))
    if stage == 2:
        cpu, gpu = zero2.estimate_zero2_model_states_mem_needs(n, **layout, cpu_offload=offload)
    else:  # the Trainer loads a model under ZeRO-3 with deepspeed.zero.Init, hence zero_init
        layout.update(cpu_offload=offload, cpu_offload_params=params, zero_init=True)
        cpu, gpu, _ = zero3.estimate_zero3_model_states_mem_needs(n, model.largest, **layout)
    label = f"model states (DeepSpeed estimate_zero{stage}_model_states_mem_needs)"
    gpu_items, ram_items = {label: gpu}, {label: cpu}
    if run.peft:  # the estimators count the adapter; the frozen base is 16-bit, ZeRO-3 splits it
        frozen = 2 * model.params // (run.total_gpus if stage == 3 else 1)
        where, share = (ram_items, run.gpus_per_node) if params else (gpu_items, 1)
        where["frozen 16-bit weights"] = frozen * share
    # 16-bit buffers; overlap_comm double-buffers the gradients.
    copies, bucket = 1 + zero.overlap_comm, zero.reduce_bucket_size
    buffers = {f"gradient buckets ({copies} x reduce_bucket_size {count(bucket)})": copies * bucket}
    if stage == 2:  # offloaded gradients pass through a buffer the size of the largest parameter
        bucket = zero.allgather_bucket_size
        buffers[f"all-gather bucket (allgather_bucket_size {count(bucket)})"] = bucket
        buffers[f"offload staging buffer ({count(model.largest)})"] = model.largest * offload
    else:  # weights in use are gathered: those prefetched, and the block being computed
        bucket = zero.prefetch_bucket_size
        buffers[f"parameter prefetch (stage3_prefetch_bucket_size {count(bucket)})"] = bucket
        buffers["one block's parameters gathered"] = model.block_params
    gpu_items.update({what: 2 * size for what, size in buffers.items() if size})
    # Saving gathers the 16-bit weights to write model.safetensors.
    whole = stage == 2 or zero.gather_16bit_weights_on_model_save
    saved = 2 * model.params // (1 if whole else run.total_gpus)
    ram_items["16-bit weights gathered while saving"] = saved
    return gpu_items, ram_items


def plain_items(model: Model, run: Run) -> tuple[Items, Items]:
    """(per GPU, per node) without DeepSpeed. The Trainer trains the weights in their load dtype,
    with no fp32 master copy (--fp16/--bf16 only autocast); peft keeps the adapter in fp32."""
    w, n = DTYPES[model.dtype], run.trained(model)
    if run.four_bit:  # peft's prepare_model_for_kbit_training upcasts what stayed 16-bit to fp32
        gpu = {"4-bit NF4 weights": int(NF4_BYTES * model.quantizable)}
        gpu["unquantized weights, upcast to fp32"] = 4 * (model.params - model.quantizable)
    else:
        gpu = {f"{'frozen ' * run.peft}weights ({model.dtype})": w * model.params}
    tw = 4 if run.peft else w  # bytes of a trained weight, and of its gradient
    if run.peft:
        gpu["LoRA adapter weights (fp32)"] = 4 * n
    gpu["gradients"] = tw * n
    # Each process reads the model into host RAM before the Trainer moves it to its GPU.
    ram = {"weights read while loading": w * model.params * run.gpus_per_node}
    optim = published()["optimizers"][run.optim or "adamw_torch"]
    # Paged optimizers' states live outside PyTorch's allocator, in host RAM when the GPU is full.
    states = optim["states"] * optim.get("bytes", tw) * n
    (ram if optim.get("paged") else gpu)[f"optimizer states ({run.optim or 'AdamW'})"] = states
    # Autocast caches a 16-bit copy of each fp32 weight trained (the adapter, or a float32 model)
    # for the forward pass; a frozen fp32 lm_head (GPT-2's, QLoRA's upcast one) is cast too.
    copied = n * (run.peft or w == 4) + model.head * (run.peft and (w == 4 or run.four_bit))
    if copied and run.precision != "fp32":
        gpu["16-bit copies autocast makes of fp32 weights"] = 2 * copied
    return gpu, ram


def block_bytes(model: Model, run: Run, act: int) -> int:
    """Bytes autograd keeps per token for one block's backward, with `act`-byte activations."""
    c, k = model.config, BLOCKS["gated" if model.gated else "gpt"]
    h, heads, eager = c.hidden_size, c.num_attention_heads, c._attn_implementation == "eager"
    widths = (getattr(c, key, None) for key in ("n_inner", "intermediate_size", "ffn_dim"))
    i = next((int(width) for width in widths if width), 4 * h)
    # Eager attention repeats grouped k and v heads to the full width; sdpa keeps them as they are.
    groups = getattr(c, "num_key_value_heads", None) or heads
    kv = h if eager else groups * (getattr(c, "head_dim", None) or h // heads)
    fp32 = eager and c.model_type in ("gpt_neo", "gptj")  # +4*h, and 4 more bytes a score
    gelu_new = getattr(c, "activation_function", None) == "gelu_new"  # Python: 3 more MLP tensors
    kept = k["h"] * h + k["i"] * i + 4 * kv + 4 * h * fp32 + 6 * i * gelu_new
    kept += eager * (k["score"] + 4 * fp32) * heads * run.block_size
    kept -= run.peft * (k["frozen"] * h + 2 * i)
    # peft casts each adapted layer's input to fp32 and lora_A keeps it (16-bit under autocast),
    # with CUDA dropout's 1-byte mask.
    lora = 2 * (1 + (run.precision == "fp32")) + (run.lora_dropout > 0)
    return kept * act // 2 + run.peft * model.lora_inputs * lora


def activation_items(model: Model, run: Run) -> Items:
    """One micro-batch's activations: with checkpointing, the blocks' inputs and one block's."""
    c, tokens = model.config, run.micro_batch * run.block_size
    layers = c.num_hidden_layers
    # 16-bit under autocast or DeepSpeed, or in a 16-bit model; fp32 otherwise.
    act = 2 if run.precision != "fp32" or run.zero or DTYPES[model.dtype] == 2 else 4
    per_token = block_bytes(model, run, act)
    if run.checkpointing:
        # QLoRA: peft's fp32 embeddings make the residual stream between blocks fp32.
        states = (layers + 1) * tokens * c.hidden_size * (4 if run.four_bit else act)
        items = {"checkpointed hidden states": states}
        items["one block recomputed in backward"] = tokens * per_token
    else:
        items = {f"all {layers} blocks' activations, not checkpointed": layers * tokens * per_token}
    # The logits in 16 bits, the fp32 copy transformers' loss makes, and its fp32 log-softmax.
    logit = act + 4 * (act == 2) + 4
    items[f"logits and loss ({logit} bytes a logit)"] = tokens * c.vocab_size * logit
    return items


def plan(model: Model, run: Run, machine: Machine) -> Plan:
    """Everything one run needs per GPU and per node, item by item, against the machine."""
    positions = model.config.max_position_embeddings
    if run.block_size > positions:
        why = f"is longer than {model.name}'s {positions} positions; lower --block_size"
        raise UserError(f"block size {run.block_size} {why}")
    gpu, ram = deepspeed_items(model, run) if run.zero else plain_items(model, run)
    gpu.update(activation_items(model, run))
    gpu["CUDA context, workspaces, allocator slack"] = CUDA_CONTEXT
    ram["Python, torch, CUDA libraries, data"] = RUNTIME_RAM * run.gpus_per_node
    gpu_total, ram_total = sum(gpu.values()), sum(ram.values())
    fits = machine[0] is not None and gpu_total <= machine[0] and ram_total <= machine[1]
    return Plan(model, run, gpu, ram, gpu_total, ram_total, fits)


def deepspeed_options(model: Model, run: Run) -> list[tuple[str, Run]]:
    """The shipped DeepSpeed configs that cut the run's memory, in the guide's order."""
    # DeepSpeed trains in 16 bits, with the Adam its shipped configs name.
    sixteen = {"precision": "fp16" if run.precision == "fp32" else run.precision, "optim": None}

    def shipped(name: str) -> Run:  # the config named as typed from the current directory
        path = os.path.relpath(HERE / name)
        zero = zero_settings(read_json(HERE / name), path, model.config.hidden_size)
        return replace(run, deepspeed=path, zero=zero, **sixteen)

    base = run if run.zero else shipped("ds_config.json")
    options = [] if run.zero else [("DeepSpeed ZeRO-2 with the optimizer offloaded to CPU", base)]
    # The guide's fix for tight GPUs, 5e7 buckets, is all ds_config_gptneo.json changes.
    small = shipped("ds_config_gptneo.json")
    buckets = {k: getattr(small.zero, k) for k in ("reduce_bucket_size", "allgather_bucket_size")}
    if base.zero != small.zero and base.zero.model_copy(update=buckets) == small.zero:
        options.append((join(*(what for what, _ in options), "5e7 buckets"), small))
    if base.zero.stage != 3:
        zero3 = shipped("ds_config_zero3.json")
        options.append(("ZeRO-3 with parameters and optimizer offloaded to CPU", zero3))
    return options


def spread(run: Run, gpus: int, nodes: int) -> Run:
    """The run on more GPUs, each taking its share of the effective batch, rounded up."""
    per_gpu = math.ceil(run.effective_batch / (gpus * nodes))
    micro = max(m for m in range(1, min(run.micro_batch, per_gpu) + 1) if per_gpu % m == 0)
    layout = {"gpus_per_node": gpus, "nodes": nodes}
    return replace(run, **layout, micro_batch=micro, grad_accum=per_gpu // micro)


def setups(model: Model, run: Run) -> Iterator[tuple[str, Run]]:
    """Changes to the run as (what, run), cheapest first, as the guide and the issues order them:
    QLoRA for a LoRA run, DeepSpeed's ZeRO-2 offload, 5e7 buckets, ZeRO-3, then more GPUs."""
    yield "", run
    if not run.checkpointing:  # kept off while a smaller micro-batch fits: first_fit tries those
        back_on = "activation checkpointing back on (drop --gradient_checkpointing False)"
        for what, changed in setups(model, replace(run, checkpointing=True)):
            yield join(back_on, what), changed
        return
    if run.four_bit:  # QLoRA runs on one GPU without DeepSpeed
        return
    if run.peft and not run.zero:
        yield "QLoRA: the base model in 4 bits (--load_in_4bit)", replace(run, four_bit=True)
    options = deepspeed_options(model, run)
    yield from options
    # Without DeepSpeed each GPU holds everything: more of them help only with a config.
    options = [("", run)] * bool(run.zero) + options
    for gpus, nodes in LAYOUTS:
        if gpus * nodes > run.total_gpus and gpus >= run.gpus_per_node and nodes >= run.nodes:
            layout = f"more GPUs: {plural(nodes, 'node')} x {plural(gpus, 'GPU')}"
            yield from ((join(layout, what), spread(r, gpus, nodes)) for what, r in options)


def first_fit(model: Model, run: Run, machine: Machine) -> tuple[str, Plan] | None:
    """The cheapest change ("" if none) that fits, and its plan. Each is tried with smaller
    micro-batches and more accumulation too, so that a step still sees as many sequences."""
    for what, base in setups(model, run):
        for micro in (m for m in range(base.micro_batch, 0, -1) if base.micro_batch % m == 0):
            accum = base.grad_accum * base.micro_batch // micro
            found = plan(model, replace(base, micro_batch=micro, grad_accum=accum), machine)
            if found.fits:
                smaller = f"smaller micro-batch: {micro} x {accum} accumulation steps"
                return join(what, smaller if micro < run.micro_batch else ""), found
    return None


def command(run: Run, args: argparse.Namespace, passed: list[str]) -> str:
    """The training command for this run, with the user's other flags passed along."""
    if run.zero:
        hosts = f"--hostfile hostfile --num_nodes={run.nodes} " * (run.nodes > 1)
        launcher = f"deepspeed {hosts}--num_gpus={run.gpus_per_node} run_clm.py"
        launcher += f" --deepspeed {run.deepspeed}"
    elif run.total_gpus > 1:
        nodes = f"--nnodes={run.nodes} " * (run.nodes > 1)
        launcher = f"torchrun {nodes}--nproc_per_node={run.gpus_per_node} run_clm.py"
    else:
        launcher = "python run_clm.py"
    targets = args.lora_target_modules or []
    flags = [  # only what differs from run_clm.py's defaults, as a user would type it
        (True, f"--model_name_or_path {args.model}"),
        (run.peft, "--use_peft"),
        (run.peft and run.lora_r != 16, f"--lora_r {run.lora_r}"),
        (run.peft and run.lora_dropout != 0.05, f"--lora_dropout {run.lora_dropout:g}"),
        (run.peft and targets, shlex.join(["--lora_target_modules", *targets])),
        (run.four_bit, "--load_in_4bit"),
        (True, f"--per_device_train_batch_size {run.micro_batch}"),
        (True, f"--gradient_accumulation_steps {run.grad_accum} --block_size {run.block_size}"),
        (run.precision != "fp32", f"--{run.precision}"),
        (args.dtype != "auto", f"--dtype {args.dtype}"),
        (run.optim, f"--optim {run.optim}"),
        (not run.checkpointing, "--gradient_checkpointing False"),
        (passed, shlex.join(passed)),
    ]
    return " ".join([launcher, *(flag for wanted, flag in flags if wanted)])


def render(found: Plan, machine: Machine, passed: list[str]) -> str:
    """The plan as a table a user can read: where the memory goes, and the verdict per resource."""
    model, run, zero, c = found.model, found.run, found.run.zero, found.model.config
    kind = "QLoRA" if run.four_bit else "LoRA" if run.peft else "full fine-tune"
    kind += f" ({count(run.trained(model))} trainable, r={run.lora_r})" * run.peft
    optimizer = run.optim or ("DeepSpeed Adam" if zero else "AdamW")
    shape = f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}"
    lines = [
        f"model    {model.name}: {model.params / 1e9:.2f}B parameters, {shape},"
        f" weights in {model.dtype}, {c._attn_implementation} attention",
        f"train    {kind}, {'DeepSpeed' if zero else 'no DeepSpeed'}, optimizer {optimizer}",
    ]
    if zero:
        states, weights = offloads(zero)
        where = f"offload optimizer {states}, params {weights}"
        lines.append(f"config   {run.deepspeed}: ZeRO stage {zero.stage}, {where}")
    batch = f"micro-batch {run.micro_batch} x {run.grad_accum} accumulation = {run.effective_batch}"
    lines.append(
        f"run      {plural(run.nodes, 'node')} x {plural(run.gpus_per_node, 'GPU')}, {batch}"
        f" sequences of {run.block_size} tokens per step, {run.precision},"
        f" activation checkpointing {'on' if run.checkpointing else 'off'}"
    )
    ignored = [arg.split("=")[0] for arg in passed if arg.startswith("--")]
    if ignored:
        lines.append(f"ignored  {' '.join(ignored)} (no effect on memory)")
    width = max(map(len, [*found.gpu_items, *found.ram_items])) + 2
    for title, items, total, have in (
        ("GPU memory, per GPU", found.gpu_items, found.gpu_total, machine[0]),
        ("host RAM, per node", found.ram_items, found.ram_total, machine[1]),
    ):
        lines += ["", f"{title:<{width}}{'GiB':>8}"]
        lines += [f"  {label:<{width - 2}}{size / GIB:>8.2f}" for label, size in items.items()]
        verdict = "no GPU here: pass --gpu_memory"
        if have:
            verdict = f"of {have / GIB:.2f} GiB: {'fits' if total <= have else 'does NOT fit'}"
        lines.append(f"  {'total':<{width - 2}}{total / GIB:>8.2f}  {verdict}")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    """run_clm.py's flags that change memory, and the planner's own; dests are Run's fields."""
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[1])
    p.epilog = "Exit status: 0 fits, 1 does not fit, 2 bad input."
    p.error = lambda message: fail(PROG, f"{message} (see python {PROG} --help)")
    add = p.add_argument
    on = {"type": true_or_false, "nargs": "?", "const": True, "metavar": "BOOL"}  # as HF has it
    add("--model_name_or_path", "--model", dest="model", required=True, help="folder or name")
    add("--deepspeed", help="DeepSpeed config JSON (default: none, a plain run_clm.py run)")
    add("--fp16", **on, default=False, help="16-bit autocast, or DeepSpeed's fp16")
    add("--bf16", **on, default=False, help="bf16 autocast, or DeepSpeed's bf16")
    add("--gradient_checkpointing", **on, dest="checkpointing", default=True, help="False: faster")
    add("--use_peft", **on, dest="peft", default=False, help="train a LoRA adapter")
    add("--load_in_4bit", **on, dest="four_bit", default=False, help="QLoRA: the base in 4 bits")
    whole = number(int, 1)
    add("--per_device_train_batch_size", dest="micro_batch", type=whole, default=8)
    add("--gradient_accumulation_steps", dest="grad_accum", type=whole, default=1)
    add("--block_size", type=whole, help="default: the model's positions, at most 1024")
    add("--lora_r", type=whole, default=16)
    add("--lora_dropout", type=number(float, 0, 1), default=0.05)
    add("--lora_target_modules", nargs="+", help="default: every linear layer of each block")
    add("--optim", choices=published()["optimizers"], help="default: the Trainer's AdamW")
    add("--dtype", "--torch_dtype", choices=("auto", *DTYPES), default="auto", help="load dtype")
    add("--gpu_memory", type=parse_size, help="one GPU's, e.g. 16GB (default: this machine's)")
    add("--ram", type=parse_size, help="one node's, e.g. 64GB (default: this machine's)")
    add("--num_gpus", dest="gpus_per_node", type=whole, default=1, help="per node")
    add("--num_nodes", dest="nodes", type=whole, default=1)
    add("--attn_implementation", choices=("auto", "eager", "sdpa"), default="auto")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, from them or a pasted `deepspeed|torchrun|python ... run_clm.py ...` command,
    and the others as given; what run_clm.py would refuse is refused at once."""
    if argv and not argv[0].startswith("-"):  # a pasted command: its launcher counts the GPUs
        at = next((n for n, arg in enumerate(argv) if arg.endswith("run_clm.py")), None)
        if at is None:
            raise UserError(
                f"{argv[0]!r}: give the planner's flags, or a training command that runs run_clm.py"
            )
        launcher = " ".join(argv[:at])
        counts = re.findall(r"--(num_gpus|nproc_per_node|num_nodes|nnodes)[= ](\S+)", launcher)
        ours = {"nproc_per_node": "num_gpus", "nnodes": "num_nodes"}  # torchrun's names
        argv = [w for name, n in counts for w in (f"--{ours.get(name, name)}", n)] + argv[at + 1 :]
    args, passed = parser().parse_known_args(argv)
    args.precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
    ds, fp32 = args.deepspeed, "trains in fp32, which DeepSpeed's estimators do not cover"
    refused = {  # what run_clm.py refuses
        "--fp16 and --bf16 both given; pick one (bf16 on A100 and newer)": args.fp16 and args.bf16,
        "--load_in_4bit trains a LoRA adapter: add --use_peft": args.four_bit and not args.peft,
        "QLoRA runs on one GPU without DeepSpeed: drop --deepspeed": ds and args.four_bit,
        "--deepspeed's config names the optimizer: drop --optim": ds and args.optim,
        f"--deepspeed without --fp16 or --bf16 {fp32}; add one": ds and args.precision == "fp32",
    }
    if wrong := next((message for message, bad in refused.items() if bad), None):
        raise UserError(wrong)
    return args, passed


def advise(found: Plan, machine: Machine, args: argparse.Namespace, passed: list[str]) -> None:
    """Print the cheapest change that fits and, for a full fine-tune, the LoRA and QLoRA runs."""
    model, run = found.model, found.run
    cheapest = first_fit(model, run, machine)
    if cheapest is None:
        print("verdict: does NOT fit, and no change the planner tries fits.")
    ways = [("verdict: does NOT fit. Cheapest change that fits:", cheapest)]
    if not run.peft:  # adapters train less than every weight: offered, not chosen
        lora = replace(run, peft=True, deepspeed=None, zero=None)
        lora_way = first_fit(model, lora, machine)
        ways.append(("or a LoRA adapter instead of every weight (--use_peft):", lora_way))
        if lora_way and not lora_way[1].run.four_bit:  # LoRA's answer may be QLoRA already
            qlora = "or QLoRA, a LoRA adapter on the model in 4 bits (--use_peft --load_in_4bit):"
            ways.append((qlora, first_fit(model, replace(lora, four_bit=True), machine)))
    for title, (what, fit) in ((title, way) for title, way in ways if way):
        print(f"{title} {what or 'as it is'}")
        needs = f"{fit.gpu_total / GIB:.2f} GiB per GPU, {fit.ram_total / GIB:.2f} GiB RAM per node"
        print(f"  needs {needs}; {fit.run.effective_batch} sequences per step")
        print(f"  {command(fit.run, args, passed)}")


def main(argv: list[str] | None = None) -> int:
    """Print the plan and the verdict: exit status 0 when it fits, 1 when not."""
    args, passed = parse_args(sys.argv[1:] if argv is None else argv)
    # Read the DeepSpeed JSON before the model so a broken config is reported at once.
    raw = read_json(Path(args.deepspeed)) if args.deepspeed else None
    targets = tuple(args.lora_target_modules or ())
    model = model_facts(args.model, args.attn_implementation, targets, args.dtype)
    args.zero = args.deepspeed and zero_settings(raw, args.deepspeed, model.config.hidden_size)
    # As run_clm.py: the model's positions, at most 1024.
    args.block_size = args.block_size or min(1024, model.config.max_position_embeddings)
    run = Run(**{field.name: getattr(args, field.name) for field in fields(Run)})
    import torch

    gpu = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory
    machine = (args.gpu_memory or gpu or None, args.ram or psutil.virtual_memory().total)
    found = plan(model, run, machine)
    print(render(found, machine, passed))
    if found.fits:
        print(f"verdict: fits. {command(run, args, passed)}")
        # RAM does not depend on checkpointing; 10% spare, as the activations are an estimate.
        faster = run.checkpointing and plan(model, replace(run, checkpointing=False), machine)
        if faster and faster.gpu_total <= 0.9 * machine[0]:
            print(
                "faster: it also fits without activation checkpointing"
                f" ({faster.gpu_total / GIB:.2f} GiB per GPU, 10% or more to spare), which skips"
                " the recomputed forward pass, a quarter of each step's compute:"
                " add --gradient_checkpointing False"
            )
    elif machine[0] is None:
        print("verdict: does not fit: there is no GPU here. Pass --gpu_memory (e.g. 16GB).")
    else:
        advise(found, machine, args, passed)
    return 0 if found.fits else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        fail(PROG, str(error))
    except BrokenPipeError:  # a reader like `head` stopped early: the plan is not at fault
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
