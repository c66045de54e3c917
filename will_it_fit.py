#!/usr/bin/env python
"""Will it fit? Plan a fine-tuning run's GPU memory and host RAM from the model's config alone.

Takes run_clm.py's flags or a whole pasted training command, builds the model on the meta device
(no weights are read), prints what the run needs per GPU and per node against this machine (or
--gpu_memory / --ram) and, when it does not fit, the cheapest change that does. What each figure
counts, and why: docs/planner.md. Sizes are GiB, as DeepSpeed and nvidia-smi count them.
"""

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import psutil

from common import UserError, fail, number, preference_shape, true_or_false
from memory_plan import (
    DTYPES,
    GIB,
    HERE,
    Machine,
    Model,
    Plan,
    Run,
    count,
    model_facts,
    offloads,
    plan,
    published,
    read_json,
    zero_settings,
)

PROG = "will_it_fit.py"
# GPUs x nodes to spread a run over: fewest GPUs first, filling a node before adding one.
LAYOUTS = sorted(itertools.product((1, 2, 4, 8), repeat=2), key=lambda g: (g[0] * g[1], -g[0]))


def parse_size(text: str) -> int:
    """Bytes in 16GB, 16GiB, 16 (GiB), 16160MiB or 1.5TB: cards sell "16 GB" meaning 16 GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text, flags=re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 16GB)")
    power = "kmgt".index(match.group(2).lower() or "g") + 1
    return int(float(match.group(1)) * 2 ** (10 * power))


def plural(n: int, what: str) -> str:
    """A layout as a person says it: "1 node", "2 nodes"."""
    return f"{n} {what}{'s' * (n > 1)}"


def join(*parts: str) -> str:
    """Changes combined, as the advice names them."""
    return " + ".join(part for part in parts if part)


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
    if run.preference and not (run.peft or run.precompute_ref):  # the reference goes first
        freed = "the reference scores the data once, then is freed (--precompute_ref_log_probs)"
        for what, changed in setups(model, replace(run, precompute_ref=True)):
            yield join(freed, what), changed
        return
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
        (run.precompute_ref, "--precompute_ref_log_probs"),
        (passed, shlex.join(passed)),
    ]
    return " ".join([launcher, *(flag for wanted, flag in flags if wanted)])


def render(found: Plan, machine: Machine, passed: list[str]) -> str:
    """The plan as a table a user can read: where the memory goes, and the verdict per resource."""
    model, run, zero, c = found.model, found.run, found.run.zero, found.model.config
    kind = "QLoRA" if run.four_bit else "LoRA" if run.peft else "full fine-tune"
    kind += f" ({count(run.trained(model))} trainable, r={run.lora_r})" * run.peft
    optimizer = run.optim or ("DeepSpeed Adam" if zero else "AdamW")
    if run.preference:  # what the --train_file's records make of the run
        method = "DPO, each pair's chosen and rejected together" if run.preference == "preference" else "KTO"  # fmt: skip
        reference = "the adapter switched off" if run.peft else "precomputed" if run.precompute_ref else "a frozen copy"  # fmt: skip
        kind += f", {method}, reference {reference}"
    shape = f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}"
    lines = [
        f"model    {model.name}: {model.params / 1e9:.2f}B parameters, {shape},"
        f" weights in {run.weights(model)}, {c._attn_implementation} attention",
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
    if run.preference:
        ignored.remove("--train_file")
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
    add("--precompute_ref_log_probs", **on, dest="precompute_ref", default=False, help="DPO/KTO")
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


def data_shape(passed: list[str]) -> str | None:
    """DPO pairs or KTO labels when the command's --train_file (if it is here) holds them."""
    path = next((Path(b) for a, b in itertools.pairwise(passed) if a == "--train_file"), None)
    if path is None or not path.is_file():
        return None
    with open(path, encoding="utf-8-sig") as stream:
        first = next((line for line in stream if line.strip()), "")
    if path.suffix == ".csv":
        return preference_shape(dict.fromkeys(next(csv.reader([first]), [])))
    with contextlib.suppress(json.JSONDecodeError):
        return preference_shape(json.loads(first))
    return None


def main(argv: list[str] | None = None) -> int:
    """Print the plan and the verdict: exit status 0 when it fits, 1 when not."""
    # DeepSpeed's estimators are arithmetic: on a laptop it need not look for a GPU and warn.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args, passed = parse_args(sys.argv[1:] if argv is None else argv)
    # Read the DeepSpeed JSON before the model so a broken config is reported at once.
    raw = read_json(Path(args.deepspeed)) if args.deepspeed else None
    targets = tuple(args.lora_target_modules or ())
    model = model_facts(args.model, args.attn_implementation, targets, args.dtype)
    args.zero = args.deepspeed and zero_settings(raw, args.deepspeed, model.config.hidden_size)
    # As run_clm.py: the model's positions, at most 1024.
    args.block_size = args.block_size or min(1024, model.config.max_position_embeddings)
    args.preference = data_shape(passed)
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
