"""Sample text from a fine-tuned causal language model, one prompt at a time.

Command-line compatible with the Hugging Face example the guide calls:

    python run_generation.py --model_type=gpt2 --model_name_or_path=finetuned --length 200

Runs on the GPU when there is one, else on the CPU. Without --prompt, the prompt is asked for on
the terminal, or read from standard input when that is a pipe or a file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from transformers import set_seed

from generation import (
    UserError,
    choose_device,
    choose_dtype,
    decoding_kwargs,
    encode_prompt,
    end_token_ids,
    fail,
    fit_new_tokens,
    load_model,
    max_positions,
    non_negative_float,
    non_negative_int,
    note,
    pad_token_id,
    positive_float,
    positive_int,
    probability,
)

PROG = "run_generation.py"


def build_parser() -> argparse.ArgumentParser:
    """The command line of the Hugging Face example, plus --trust_remote_code."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text from a causal language model directory (e.g. run_clm.py's "
        "--output_dir). Each sequence is printed under a '=== GENERATED SEQUENCE n ===' header.",
    )
    parser.add_argument(
        "--model_type",
        default=None,
        help="gpt2, gpt_neo, ... Kept for compatibility: the model directory's config decides, "
        "and a different value only prints a note.",
    )
    parser.add_argument(
        "--model_name_or_path",
        required=True,
        help="model directory written by run_clm.py (--output_dir), or a hub model id",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="text to continue; when missing it is asked for on the terminal (or read from "
        "standard input when that is not a terminal). An empty prompt starts from nothing.",
    )
    parser.add_argument(
        "--length",
        type=positive_int,
        default=20,
        help="number of new tokens to generate after the prompt (default: 20); lowered to what "
        "the model's context can hold",
    )
    parser.add_argument(
        "--stop_token",
        default=None,
        help="cut each text at the first occurrence of this string, e.g. '<|endoftext|>'. "
        "Without it exactly --length tokens are generated; with it a sequence also ends at the "
        "model's end-of-text token.",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=1.0,
        help="sampling temperature (default: 1.0); 0 means greedy decoding",
    )
    parser.add_argument(
        "--repetition_penalty",
        type=positive_float,
        default=1.0,
        help="penalty for tokens already present; 1.0 means none (default: 1.0)",
    )
    parser.add_argument(
        "--k",
        type=non_negative_int,
        default=0,
        help="top-k sampling: keep the k likeliest tokens; 0 keeps all (default: 0)",
    )
    parser.add_argument(
        "--p",
        type=probability,
        default=0.9,
        help="top-p (nucleus) sampling: keep the likeliest tokens whose probabilities add up "
        "to p (default: 0.9)",
    )
    parser.add_argument(
        "--prefix",
        default="",
        help="text put before the prompt for the model to read, left out of the printed text",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=42,
        help="random seed; the same seed, prompt and device give the same text (default: 42)",
    )
    parser.add_argument(
        "--num_return_sequences",
        type=positive_int,
        default=1,
        help="how many sequences to sample for the prompt (default: 1)",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="run in float16 on the GPU; ignored, with a note, on the CPU",
    )
    parser.add_argument(
        "--use_cpu",
        action="store_true",
        help="run on the CPU even when a GPU is available",
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow a hub model to run its own Python code (off by default: only for models you trust)",
    )
    return parser


def read_prompt(given: str | None) -> str:
    """The --prompt value, else the terminal's answer, else all of standard input."""
    if given is not None:
        return given
    if sys.stdin.isatty():
        return input("Model prompt >>> ")
    # A pipe or file may hold several lines: all of them are the prompt, minus the final newline.
    text = sys.stdin.read()
    if not text:
        raise EOFError
    return text.removesuffix("\n").removesuffix("\r")


def cut_at_stop(text: str, stop_token: str | None) -> str:
    """Text up to the stop token, or all of it when the stop token does not occur."""
    if stop_token:
        position = text.find(stop_token)
        if position >= 0:
            return text[:position]
    return text


def new_token_ids(sequence: torch.Tensor, prompt_length: int, end_ids: set[int]) -> list[int]:
    """The continuation's ids, ending before the first end-of-text token (padding follows it)."""
    ids = sequence[prompt_length:].tolist()
    for position, token in enumerate(ids):
        if token in end_ids:
            return ids[:position]
    return ids


def prepare(args: argparse.Namespace) -> tuple[Any, Any, dict[str, torch.Tensor], str]:
    """Model, tokenizer, encoded prefix + prompt, and the prompt as the user gave it."""
    device = choose_device(args.use_cpu)
    dtype = choose_dtype(device, args.fp16)
    if args.fp16 and dtype != torch.float16:
        note(PROG, "--fp16 needs a GPU; running in float32 on the CPU")
    # The model first, as the Hugging Face example did: a wrong path is reported before the
    # user has typed a prompt for nothing.
    model, tokenizer = load_model(
        PROG, args.model_name_or_path, device, dtype, args.trust_remote_code
    )
    actual_type = model.config.model_type
    if args.model_type and args.model_type != actual_type:
        note(
            PROG,
            f"--model_type={args.model_type}, but {args.model_name_or_path} holds a "
            f"{actual_type} model; using {actual_type}",
        )
    try:
        prompt = read_prompt(args.prompt)
    except EOFError as err:
        raise UserError(
            "no prompt: standard input ended before one was given (use --prompt)"
        ) from err
    return model, tokenizer, encode_prompt(tokenizer, args.prefix + prompt, device), prompt


def new_token_budget(wanted: int, prompt_length: int, model: Any) -> int:
    """--length, lowered (with a note) to what the model's context holds after the prompt."""
    limit = max_positions(model)
    length = fit_new_tokens(wanted, prompt_length, limit)
    if length < 1:
        raise UserError(f"the prompt is {prompt_length} tokens, the model reads at most {limit}")
    if length < wanted:
        note(PROG, f"--length lowered to {length}: the model reads at most {limit} tokens")
    return length


def generate(args: argparse.Namespace) -> int:
    """Load, sample and print; returns the exit status."""
    if args.temperature == 0 and args.num_return_sequences > 1:
        raise UserError(
            "--temperature 0 (greedy) gives the same text every time: use --num_return_sequences 1"
        )
    model, tokenizer, inputs, prompt = prepare(args)
    prompt_length = inputs["input_ids"].shape[1]
    length = new_token_budget(args.length, prompt_length, model)
    # Without a stop token the user asked for `length` tokens: hold back end-of-text until then.
    min_new = 0 if args.stop_token else length
    set_seed(args.seed)
    with torch.no_grad():
        sequences = model.generate(
            **inputs,
            max_new_tokens=length,
            min_new_tokens=min_new,
            num_return_sequences=args.num_return_sequences,
            pad_token_id=pad_token_id(tokenizer),
            **decoding_kwargs(args.temperature, args.k, args.p, args.repetition_penalty),
        )

    end_ids = end_token_ids(model, tokenizer)
    for number, sequence in enumerate(sequences, start=1):
        ids = new_token_ids(sequence, prompt_length, end_ids)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        print(f"=== GENERATED SEQUENCE {number} ({len(ids)} new tokens) ===")
        print(prompt + cut_at_stop(text, args.stop_token), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; `argv` defaults to the command line."""
    args = build_parser().parse_args(argv)
    try:
        return generate(args)
    except UserError as err:
        fail(PROG, str(err))
    except KeyboardInterrupt:
        # Ctrl-C is how a user gives up on a long generation: no traceback for that.
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
