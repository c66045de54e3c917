"""What run_generation.py and run_generate_neo.py share.

Both scripts answer the same questions before they can sample: where to run (GPU or CPU), in which
precision, whether the path they were given is a model directory written by run_clm.py, and how
the sampling flags map onto `model.generate()`. Each answer lives here once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

# AutoTokenizer can build a tokenizer from any one of these sets of files.
TOKENIZER_FILE_SETS: tuple[tuple[str, ...], ...] = (
    ("tokenizer.json",),
    ("vocab.json", "merges.txt"),
    ("tokenizer_config.json",),
    ("tokenizer.model",),
)
TOKENIZER_FILES_WANTED = (
    "tokenizer.json, vocab.json + merges.txt, tokenizer_config.json or tokenizer.model"
)


class UserError(Exception):
    """A path, model or prompt we cannot work with, explained in one line for the user."""


def one_line(text: str) -> str:
    """Library messages span lines; the user gets them as one."""
    return " ".join(text.split())


def fail(prog: str, message: str) -> NoReturn:
    """Exit with status 2 and a single line on stderr, the way argparse reports bad arguments."""
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    raise SystemExit(2)


def note(prog: str, message: str) -> None:
    """Tell the user something on stderr, so that stdout holds nothing but generated text."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def choose_device(use_cpu: bool) -> torch.device:
    """The GPU when there is one and the user did not ask for the CPU."""
    if use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def choose_dtype(device: torch.device, half: bool) -> torch.dtype:
    """float16 only on a GPU: CPUs run it slowly or not at all, so they always get float32."""
    if half and device.type == "cuda":
        return torch.float16
    return torch.float32


def looks_like_local_path(name: str) -> bool:
    """True for names that can only mean a path here; "gpt2" or "org/model" may be hub ids."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)):
        return True
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model_dir(path: Path, name: str) -> None:
    """Raise UserError unless `path` holds a model config and a tokenizer, as run_clm.py saves them."""
    if not (path / "config.json").is_file():
        raise UserError(
            f"{name} has no config.json, so it is not a model directory "
            "(pass the --output_dir that run_clm.py wrote)"
        )
    if not any(all((path / f).is_file() for f in files) for files in TOKENIZER_FILE_SETS):
        raise UserError(f"{name} has no tokenizer files (expected {TOKENIZER_FILES_WANTED})")


def resolve_source(name: str) -> tuple[str, bool]:
    """Return what to pass to from_pretrained and whether it is a local directory.

    Checking the directory first turns the common mistakes (a typo, a checkpoint file, a folder
    without tokenizer) into one clear line instead of a loader traceback.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        check_model_dir(path, name)
        return str(path), True
    if path.exists():
        raise UserError(f"{name} is a file, not a model directory")
    if looks_like_local_path(name):
        raise UserError(f"{name}: no such directory")
    return name, False


def load_model(
    prog: str, name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[Any, Any]:
    """Load the causal LM and its tokenizer from a model directory or hub id, ready for generate()."""
    source, is_local = resolve_source(name)
    # Said only once the path looks right: a big model takes minutes to load, a typo should not.
    note(prog, f"loading {name} on {device.type} in {str(dtype).removeprefix('torch.')}")
    try:
        # The tokenizer first: it is small, so a bad hub id fails before gigabytes of weights load.
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        # transformers 5 always builds the model on the meta device and fills it from the
        # checkpoint (the old low_cpu_mem_usage); device_map writes the weights straight to the
        # chosen device, so a GPU run never holds a second copy in RAM.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, device_map=device.type, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        # OSError: missing weights, unreachable hub. ValueError: not a causal LM, or remote
        # code that needs --trust_remote_code. Both are about the input, not a bug here.
        where = name if is_local else f"{name} (not a local directory, tried as a hub model id)"
        raise UserError(f"cannot load {where}: {one_line(str(err))}") from err
    model.eval()
    return model, tokenizer


def max_positions(model: Any) -> int | None:
    """How many tokens the model can attend to, when its config says so."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def fit_new_tokens(wanted: int, prompt_tokens: int, limit: int | None) -> int:
    """Shrink `wanted` so prompt and continuation fit the model's positions (may return <= 0)."""
    if limit is None:
        return wanted
    return min(wanted, limit - prompt_tokens)


def encode_prompt(tokenizer: Any, text: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Token ids and attention mask for one prompt; an empty prompt starts from the BOS token."""
    encoding = tokenizer(text, return_tensors="pt")
    if encoding["input_ids"].shape[1] == 0:
        start = (
            tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        )
        if start is None:
            raise UserError("the prompt is empty and the tokenizer has no BOS token to start from")
        ids = torch.tensor([[start]])
        encoding = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {key: value.to(device) for key, value in encoding.items()}


def decoding_kwargs(
    temperature: float, top_k: int, top_p: float, repetition_penalty: float = 1.0
) -> dict[str, Any]:
    """generate() arguments for the sampling flags; temperature 0 means greedy decoding."""
    if temperature == 0:
        # Greedy: passing the sampling knobs as well would only make transformers warn.
        return {"do_sample": False, "repetition_penalty": repetition_penalty}
    return {
        "do_sample": True,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "repetition_penalty": repetition_penalty,
    }


def end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a sequence: generate() stops at the model's, the tokenizer may add one."""
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return ids


def pad_token_id(tokenizer: Any) -> int | None:
    """GPT-2 and GPT-Neo have no padding token; the end-of-text token stands in, as usual."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a number of at least 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number above 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def probability(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value
