"""What a fine-tuning run needs, item by item, in GPU memory and in host RAM.

From a model's config alone (the model is built on the meta device: no weights are read or
allocated), the run's settings in run_clm.py's terms, and DeepSpeed's own estimators of model
states. will_it_fit.py compares a plan with a machine and names changes; docs/planner.md says
what each item counts and why. Bytes per parameter, weights + gradients + optimizer states:
- DeepSpeed: its estimators (ZeRO-2 with the optimizer offloaded: 2 on the GPU, 24 in RAM);
  for LoRA they count the adapter, and the frozen 16-bit base adds 2.
- no DeepSpeed, full fine-tune: the weights' dtype w four times over for AdamW (weights,
  gradients, two moments at w each: 4w); run_clm.py loads them in fp32 (16 bytes) unless --dtype
  asks for 16 bits; plus autocast's 16-bit copy of fp32 weights.
- LoRA: the frozen base at w, and 16 for each adapter parameter (peft keeps it in fp32).
- QLoRA: 0.516 for each NF4 weight, 4 for the rest (peft upcasts it).
- 8-bit optimizers: 2 for each trained parameter's states; paged ones count in host RAM.
"""

import contextlib
import json
import sys
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import deepspeed_json
from common import UserError

GIB = 2**30
HERE = Path(__file__).absolute().parent  # not resolved: a linked copy names its own ds_configs
# What measurements see and no formula gives: per GPU the CUDA context, workspaces and allocator
# slack; per training process Python, torch, the CUDA libraries and the data.
CUDA_CONTEXT, RUNTIME_RAM = 1 * GIB, 3 * GIB
# NF4 with double quantization: 4 bits, an 8-bit scale per 64 weights, an fp32 one per 256 scales.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
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
    dtype: str = "auto"  # --dtype as given
    preference: str | None = None  # "preference" (DPO) or "labelled" (KTO): the data's records
    precompute_ref: bool = False  # --precompute_ref_log_probs: no reference model while training

    def weights(self, model: "Model") -> str:
        """The dtype the weights train in: fp32 for a full fine-tune without DeepSpeed, unless
        --dtype names another (run_clm.training_dtype); the load dtype otherwise."""
        full = not (self.peft or self.deepspeed or self.four_bit) and self.dtype == "auto"
        return "float32" if full else model.dtype

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


def count(value: float) -> str:
    """2e8 -> "2e8", 6553600 -> "6.55e6": as DeepSpeed configs write sizes."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e")


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
    # DeepSpeed's logger writes to the stdout it finds at import: keep the plan alone there.
    with contextlib.redirect_stdout(sys.stderr):
        return deepspeed_json.zero_config(zero, source, hidden)


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
    """(per GPU, per node) without DeepSpeed. The Trainer trains the weights in their load dtype
    (fp32 for a full fine-tune unless --dtype says; --fp16/--bf16 only autocast); peft keeps the
    adapter in fp32."""
    dtype = run.weights(model)
    w, n = DTYPES[dtype], run.trained(model)
    if run.four_bit:  # peft's prepare_model_for_kbit_training upcasts what stayed 16-bit to fp32
        gpu = {"4-bit NF4 weights": int(NF4_BYTES * model.quantizable)}
        gpu["unquantized weights, upcast to fp32"] = 4 * (model.params - model.quantizable)
    else:
        gpu = {f"{'frozen ' * run.peft}weights ({dtype})": w * model.params}
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
    # DPO runs each pair's chosen and rejected answers in one batch: twice the sequences.
    pairs = 2 if run.preference == "preference" else 1
    c, tokens = model.config, pairs * run.micro_batch * run.block_size
    layers = c.num_hidden_layers
    # 16-bit under autocast or DeepSpeed, or in a 16-bit model; fp32 otherwise.
    act = 2 if run.precision != "fp32" or run.zero or DTYPES[run.weights(model)] == 2 else 4
    per_token = block_bytes(model, run, act)
    if run.checkpointing:
        # QLoRA: peft's fp32 embeddings make the residual stream between blocks fp32.
        states = (layers + 1) * tokens * c.hidden_size * (4 if run.four_bit else act)
        items = {"checkpointed hidden states": states}
        items["one block recomputed in backward"] = tokens * per_token
    else:
        items = {f"all {layers} blocks' activations, not checkpointed": layers * tokens * per_token}
    from fused_loss import CHUNK_BYTES

    # The loss (fused_loss.py): one chunk's fp32 logits, their softmax and a 16-bit copy; the
    # trained positions' hidden states and their gradient; the head's fp32 gradient if it trains.
    loss = 3 * CHUNK_BYTES + 2 * tokens * c.hidden_size * act + 4 * model.head * (not run.peft)
    items["loss, the LM head a chunk at a time"] = loss
    return items


def plan(model: Model, run: Run, machine: Machine) -> Plan:
    """Everything one run needs per GPU and per node, item by item, against the machine."""
    positions = model.config.max_position_embeddings
    if run.block_size > positions:
        why = f"is longer than {model.name}'s {positions} positions; lower --block_size"
        raise UserError(f"block size {run.block_size} {why}")
    gpu, ram = deepspeed_items(model, run) if run.zero else plain_items(model, run)
    if run.preference and not (run.peft or run.precompute_ref):
        # TRL's frozen reference: the weights again, in the dtype the policy trains in (16 bits
        # under DeepSpeed); ZeRO-3 splits it like the policy, and offloads it with the weights.
        w = 2 if run.zero else DTYPES[run.weights(model)]
        stage3 = run.zero is not None and run.zero.stage == 3
        ref = w * model.params // (run.total_gpus if stage3 else 1)
        label = "reference model (a frozen copy, TRL's)"
        if stage3 and offloads(run.zero)[1] != "none":
            ram[label] = ref * run.gpus_per_node
        else:
            gpu[label] = ref
    gpu.update(activation_items(model, run))
    gpu["CUDA context, workspaces, allocator slack"] = CUDA_CONTEXT
    ram["Python, torch, CUDA libraries, data"] = RUNTIME_RAM * run.gpus_per_node
    gpu_total, ram_total = sum(gpu.values()), sum(ram.values())
    fits = machine[0] is not None and gpu_total <= machine[0] and ram_total <= machine[1]
    return Plan(model, run, gpu, ram, gpu_total, ram_total, fits)
