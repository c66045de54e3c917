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
# Settings that hold settings: each must be a JSON object.
SECTIONS = ("zero_optimization", "optimizer", "scheduler", "fp16", "bf16")
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
    check_sections(config, path)
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
    # Checked now, not in a traceback from deep inside DeepSpeed once the model has loaded.
    zero_config(zero, f"--deepspeed {path}", hidden=1)
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
        if parents[:1] == ["optimizer"] and "optimizer" not in config:
            continue  # no optimizer block: the Trainer's own, from --optim
        block = config
        for key in parents:
            block = block.setdefault(key, {})
        # A missing key is not filled in by the Trainer: DeepSpeed would use its own default.
        if block.setdefault(last, "auto") == "auto":
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


def check_sections(config, path: str) -> None:
    """The file, and each section of settings in it, must be a JSON object: {...}."""
    found = [("the file", config)]
    if isinstance(config, dict):
        found += [(f'"{key}"', config[key]) for key in SECTIONS if key in config]
        optimizer = config.get("optimizer")
        if isinstance(optimizer, dict) and "params" in optimizer:
            found.append(('"optimizer.params"', optimizer["params"]))
    for where, block in found:
        if not isinstance(block, dict):
            raise UserError(
                f"--deepspeed {path}: {where} must be a JSON object of settings ({{...}}), not "
                f"{json.dumps(block)[:40]}; compare with ds_config.json."
            )


def zero_config(zero: dict, source: str, hidden: int):
    """zero_optimization as DeepSpeed reads it (its defaults, its checks: DeepSpeedZeroConfig),
    with the "auto" bucket sizes the Trainer picks for a model of this hidden size."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    auto = {"reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": 0.9 * hidden**2}
    settings = {k: int(auto[k]) if v == "auto" and k in auto else v for k, v in zero.items()}
    try:
        return DeepSpeedZeroConfig(**settings)
    except ValueError as exc:  # pydantic's ValidationError: the setting, and why
        why = " ".join(str(exc).splitlines()[1:3])
        raise UserError(f"{source}: zero_optimization: {why}") from None
