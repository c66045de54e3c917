"""A DeepSpeed JSON as people still have it, made to agree with the command line.

The guide promised that the Trainer's flags (and its defaults) win over the optimizer and
scheduler numbers in the JSON; today's Trainer instead stops on any mismatch. So every value that
TrainingArguments owns becomes "auto", a scheduler block gives way to --lr_scheduler_type, 2021's
key names take today's form, and one line says what changed.
"""

import json
from pathlib import Path

from common import UserError, say

PROG = "run_clm.py"
# TrainingArguments owns these: a number in the DeepSpeed JSON gives way to the command line.
OWNED = {
    ("optimizer", "params", "lr"): "learning_rate",
    ("optimizer", "params", "betas"): ("adam_beta1", "adam_beta2"),
    ("optimizer", "params", "eps"): "adam_epsilon",
    ("optimizer", "params", "weight_decay"): "weight_decay",
    ("train_micro_batch_size_per_gpu",): "per_device_train_batch_size",
    ("gradient_accumulation_steps",): "gradient_accumulation_steps",
    ("gradient_clipping",): "max_grad_norm",
    ("fp16", "enabled"): "fp16",
    ("bf16", "enabled"): "bf16",
    ("train_batch_size",): None,  # per-GPU batch x accumulation x GPUs
}
# 2021 keys under zero_optimization that DeepSpeed renamed, and today's form.
RENAMED = {
    "cpu_offload": ("offload_optimizer", {"device": "cpu"}),
    "cpu_offload_params": ("offload_param", {"device": "cpu"}),
    "stage3_gather_fp16_weights_on_model_save": ("stage3_gather_16bit_weights_on_model_save", None),
}


def modern(path: str, values: dict, optim_given: bool) -> dict:
    """The DeepSpeed JSON with 2021 keys renamed and everything TrainingArguments owns left to it."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"--deepspeed {path}: no such file; use ds_config.json, ds_config_gptneo.json "
            "or ds_config_zero3.json."
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(
            f"--deepspeed {path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}."
        ) from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise UserError(
            f"--deepspeed {path}: not a JSON text file; point it at a DeepSpeed config."
        ) from None
    notes = []
    zero = config.get("zero_optimization", {})
    for old, (new, block) in RENAMED.items():
        if old in zero:
            value = zero.pop(old)
            if block is None:
                zero[new] = value
            elif value:
                zero.setdefault(new, block)
            notes.append(f'"{old}" is now "{new}"' + (f": {json.dumps(block)}" if block else ""))
    if optim_given and "optimizer" in config:
        raise UserError(
            f'--optim {values["optim"]} and the "optimizer" block of {path} both choose the optimizer; '
            'drop --optim, or use a DeepSpeed JSON without an "optimizer" block.'
        )
    if "scheduler" in config:
        notes.append(
            f"scheduler {config.pop('scheduler').get('type')} "
            f"-> --lr_scheduler_type {values['lr_scheduler_type']}"
        )
    for keys, owner in OWNED.items():
        *parents, last = keys
        block = config
        for key in parents:
            block = block.get(key, {}) if isinstance(block, dict) else {}
        if not isinstance(block, dict) or block.get(last, "auto") == "auto":
            continue
        wanted = [values[name] for name in owner] if isinstance(owner, tuple) else values.get(owner)
        if (
            owner is not None
            and block[last] != wanted
            and not (last == "enabled" and not block[last])
        ):
            notes.append(f"{'.'.join(keys)} {json.dumps(block[last])} -> {json.dumps(wanted)}")
        block[last] = "auto"
    if notes:
        say(
            PROG, f"--deepspeed {path}: the command line decides, not the JSON: {'; '.join(notes)}."
        )
    return config
