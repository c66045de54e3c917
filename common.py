"""What every script shares: bad input as one line and exit status 2, and messages from rank 0.

A `UserError` carries a message that names the file or flag at fault and the fix. Scripts raise
it anywhere and turn it into `<script>: error: <message>` once, at the top.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from typing import Any, NoReturn

# peft imports bitsandbytes, and transformers imports peft, whenever they are installed. On a CPU
# bitsandbytes then warns about fused kernels it cannot fetch, in every script that loads a model.
for _library in ("bitsandbytes", "kernels"):
    logging.getLogger(_library).setLevel(logging.ERROR)


# Preference records: the fields that make each shape (preference.py trains them, the planner
# plans them).
PREFERENCE_SHAPES = {
    "preference": ("prompt", "chosen", "rejected"),  # DPO
    "labelled": ("prompt", "completion", "label"),  # KTO
}


def preference_shape(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:  # the prompt may be implicit, inside both
        return "preference"
    return "labelled" if all(n in record for n in PREFERENCE_SHAPES["labelled"]) else None


class UserError(Exception):
    """Bad input: reported as one line naming the input and the fix, never as a traceback."""


def arg(default: Any, help: str) -> Any:
    """A dataclass field for HfArgumentParser: its default and its --help text."""
    return dataclasses.field(default=default, metadata={"help": help})


def one_line(text: str) -> str:
    """Library messages span lines; the user gets them as one."""
    return " ".join(str(text).split())


def fail(prog: str, message: str) -> NoReturn:
    """Exit with status 2 and a single line on stderr, the way argparse reports bad arguments."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def is_main_process() -> bool:
    """Rank 0 of a launch (or the only process): the one that talks to the user."""
    return int(os.environ.get("RANK", "0")) == 0


def say(prog: str, message: str, *, every_rank: bool = False) -> None:
    """A progress line on stdout, printed once per run rather than once per GPU."""
    if every_rank or is_main_process():
        print(f"[{prog}] {message}", flush=True)


def note(prog: str, message: str) -> None:
    """A remark on stderr, so that stdout holds nothing but the script's product."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def number(kind: type, low: float, high: float | None = None, above: bool = False):
    """An argparse type for an int or float in [low, high] (or above `low` when `above`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (value <= low if above else value < low) or (high is not None and value > high):
            bound = f"above {low}" if above else f"at least {low}"
            raise argparse.ArgumentTypeError(
                f"must be {bound}{f' and at most {high}' if high is not None else ''}, got {text}"
            )
        return value

    return parse


def true_or_false(text: str) -> bool:
    """The Trainer's spelling of a boolean flag value: True/False, also yes/no and 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not True or False")
