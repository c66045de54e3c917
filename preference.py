"""Preference tuning on TRL's trainers: DPO on pairs of a better and a worse answer, KTO on
single answers marked good or bad.

Records, as text or as lists of messages (TRL's conversational form, rendered with the model's
chat template):
- {"prompt": ..., "chosen": ..., "rejected": ...} trains with DPO;
- {"prompt": ..., "completion": ..., "label": true|false} trains with KTO.
They are checked here, kept as JSON in Arrow, and handed to TRL as it reads them. The run
around the trainer (resume, stop, NaN guard, disk check, LoRA merge) is run_clm.py's.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import datasets

import chats
from checkpoints import Guarded
from common import PREFERENCE_SHAPES, UserError, arg, preference_shape, say

PROG = "run_clm.py"

SHAPES = PREFERENCE_SHAPES  # the fields of each shape; clm_data.py reads them here
TRAINERS = {"preference": "DPO", "labelled": "KTO"}
FEATURES = {
    shape: datasets.Features(
        {name: datasets.Value("bool" if name == "label" else "string") for name in names}
    )
    for shape, names in SHAPES.items()
}
# What TRL 1.16's trainers compute (DPOTrainer fails on another only once training starts).
LOSSES = {
    "preference": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                   "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    "labelled": ("sigmoid", "kto", "apo_zero_unpaired"),  # sigmoid, the flag's default, is kto
}  # fmt: skip
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}


shape_of = preference_shape


def checked(record: dict, where: str, shape: str) -> dict:
    """One record with its texts (or messages) checked, the texts stored as JSON."""
    if shape == "preference" and "prompt" not in record:  # the hub's common form: whole chats
        from trl.data_utils import extract_prompt

        record = extract_prompt(record)
    prompt = record["prompt"]
    names = ("chosen", "rejected") if shape == "preference" else ("completion",)
    answers = [record[name] for name in names]
    conversational = isinstance(prompt, list)
    for name, value in zip(names, answers, strict=True):
        if conversational:
            if not isinstance(value, list):
                raise UserError(
                    f"{where}: the prompt is a list of messages, so {name} must be one too "
                    '([{"role": "assistant", "content": ...}]).'
                )
            chats.checked({"messages": prompt + value}, where)  # roles, contents, tool calls
        elif not isinstance(prompt, str) or not isinstance(value, str):
            raise UserError(
                f"{where}: prompt and {name} must both be strings, or both lists of messages."
            )
        if not value or (isinstance(value, str) and not value.strip()):
            raise UserError(f"{where}: {name} is empty; give every prompt its answer.")
    if shape == "preference" and answers[0] == answers[1]:
        raise UserError(f"{where}: chosen and rejected are the same; a pair must differ.")
    row = {"prompt": json.dumps(prompt), **{n: json.dumps(v) for n, v in zip(names, answers, strict=True)}}  # fmt: skip
    if shape == "labelled":
        label = record["label"]
        label = LABELS.get(label.strip().lower() if isinstance(label, str) else label)
        if label is None:
            raise UserError(f"{where}: label must be true or false, not {record['label']!r}.")
        row["label"] = label
    return row


def shape_of_sets(sets: dict[str, datasets.Dataset]) -> str | None:
    """The run's record shape, "preference" (DPO) or "labelled" (KTO), or None for the others."""
    found = {shape_of(dict.fromkeys(split.column_names)) for split in sets.values()}
    if len(found) > 1:
        raise UserError(
            "--train_file and --validation_file hold records of different shapes; keep one shape."
        )
    return found.pop() if found else None


def check(shape: str, options, packing: bool) -> None:
    """The flags against the trainer the data chose, before any weights load."""
    if packing:
        raise UserError(
            f"--packing: {TRAINERS[shape]} records are batched by TRL, not packed; drop the flag."
        )
    if options.loss_type not in LOSSES[shape]:
        raise UserError(
            f"--loss_type {options.loss_type}: {TRAINERS[shape]} (chosen by the records) takes "
            f"one of {', '.join(LOSSES[shape])}."
        )


def show(split: datasets.Dataset, tokenizer, count: int) -> None:
    """The first `count` records as TRL renders them for training (--show_examples)."""
    from trl.data_utils import maybe_apply_chat_template

    for number, row in enumerate(split.select(range(min(count, len(split)))), start=1):
        rendered = maybe_apply_chat_template(row, tokenizer)
        print(f"--- example {number} ---")
        for name in ("prompt", "chosen", "rejected", "completion", "label"):
            if name in row:
                print(f"[{name}] {rendered.get(name, row[name])}")


def for_trl(split: datasets.Dataset) -> datasets.Dataset:
    """The records as TRL reads them: strings, or lists of messages."""
    texts = [n for n in split.column_names if n != "label"]
    return split.map(lambda row: {n: json.loads(row[n]) for n in texts})


@dataclasses.dataclass
class PreferenceArguments:
    beta: float = arg(
        0.1, "DPO/KTO: how far the model may move from the reference (lower: further)."
    )
    loss_type: str = arg(
        "sigmoid",
        "DPO's loss: sigmoid, ipo, hinge, robust and the rest DPOTrainer offers. KTO: kto or "
        "apo_zero_unpaired (sigmoid means kto).",
    )
    precompute_ref_log_probs: bool = arg(
        False, "Score the data with the reference model once before training, then free it."
    )
    desirable_weight: float = arg(1.0, "KTO: the weight of answers labelled true.")
    undesirable_weight: float = arg(1.0, "KTO: the weight of answers labelled false.")
    learning_rate_given: bool = dataclasses.field(default=True, init=False)  # not a flag


def trainer(shape: str, model, training, options: PreferenceArguments, max_length: int, **kwargs):
    """TRL's DPO or KTO trainer, its config built from the run's TrainingArguments."""
    import trl

    name = TRAINERS[shape]
    config_class = getattr(trl, f"{name}Config")
    settings = {
        f.name: getattr(training, f.name)
        for f in dataclasses.fields(training)
        if f.init and f.name in {g.name for g in dataclasses.fields(config_class)}
    }
    extra: dict[str, Any] = {
        "beta": options.beta,
        "precompute_ref_log_probs": options.precompute_ref_log_probs,
        "max_length": max_length,
    }
    if not options.learning_rate_given:
        extra["learning_rate"] = config_class.learning_rate
        say(PROG, f"--learning_rate not given: {name} trains at TRL's default, {config_class.learning_rate:g}.")  # fmt: skip
    if name == "DPO":
        extra["loss_type"] = [options.loss_type]
    else:
        extra.update(
            loss_type="kto" if options.loss_type == "sigmoid" else options.loss_type,
            desirable_weight=options.desirable_weight,
            undesirable_weight=options.undesirable_weight,
            # KTO's KL term pairs each answer with its neighbour in a fixed order (TRL's rule).
            train_sampling_strategy="sequential",
        )
    config = config_class(**{**settings, **extra})  # the flags were checked by check()
    guarded = type(f"Guarded{name}Trainer", (Guarded, getattr(trl, f"{name}Trainer")), {})
    return guarded(model=model, args=config, **kwargs)
