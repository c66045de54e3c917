"""Sample text from a fine-tuned causal language model, one prompt at a time.

Command-line compatible with the Hugging Face example the guide calls:

    python run_generation.py --model_type=gpt2 --model_name_or_path=finetuned --length 200

Runs on the GPU when there is one, else on the CPU, in the dtype the model was saved in (--dtype
to choose). Without --prompt, the prompt is asked for on the terminal, or read from standard
input when that is a pipe or a file. With --chat the prompt is a user message and the answer alone
is printed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from common import UserError, fail, note
from generation import (
    DTYPES,
    chat_template,
    choose_device,
    continuation,
    decoding_kwargs,
    encode,
    end_token_ids,
    fit_new_tokens,
    load_model,
    max_positions,
    model_inputs,
    new_token_ids,
    non_negative_float,
    non_negative_int,
    pad_token_id,
    positive_float,
    positive_int,
    probability,
    render,
)

PROG = "run_generation.py"


def build_parser() -> argparse.ArgumentParser:
    """The command line of the Hugging Face example, plus --dtype, --chat and --trust_remote_code."""
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
        help="model directory written by run_clm.py (--output_dir), its LoRA adapter folder "
        "(--output_dir/adapter), or a hub model id",
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
        "Without it (or --chat) exactly --length tokens are generated; with it a sequence also "
        "ends at the model's end-of-text token.",
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
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="precision to run in (default: auto, the dtype the model was saved in); float16 "
        "on a CPU runs in float32, with a note",
    )
    parser.add_argument(
        "--fp16",
        action="store_true",
        help="the Hugging Face example's spelling of --dtype float16",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="treat the prompt as a user message: render it with the tokenizer's chat template "
        "(or the repo's chat_template.jinja), stop at the end of the answer, print the answer only",
    )
    parser.add_argument(
        "--no_thinking",
        action="store_true",
        help="with --chat: prompt a thinking model (Qwen3 and its peers) with thinking off, so it answers at once",
    )
    parser.add_argument(
        "--system",
        default=None,
        help="with --chat: a system message put before the prompt",
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
    # One line on stderr, like every other bad input, instead of usage plus the error.
    parser.error = lambda message: fail(PROG, f"{message} (see --help)")
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


def check_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other, caught before a model loads."""
    if args.temperature == 0 and args.num_return_sequences > 1:
        raise UserError(
            "--temperature 0 (greedy) gives the same text every time: use --num_return_sequences 1"
        )
    if args.fp16 and args.dtype not in ("auto", "float16"):
        raise UserError(f"--fp16 and --dtype {args.dtype} disagree; give one of them")
    if args.system is not None and not args.chat:
        raise UserError("--system is a chat message: add --chat")


def prepare(args: argparse.Namespace) -> tuple[Any, Any, list[int], str, str | None]:
    """Model, tokenizer, ids of prefix + prompt, the prompt as given, and the chat template."""
    dtype, asked_as = ("float16", "--fp16") if args.fp16 else (args.dtype, f"--dtype {args.dtype}")
    # The model first, as the Hugging Face example did: a wrong path is reported before the
    # user has typed a prompt for nothing.
    device = choose_device(args.use_cpu)
    model, tokenizer = load_model(
        PROG, args.model_name_or_path, device, dtype, args.trust_remote_code, asked_as
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
    if not args.chat:
        return model, tokenizer, encode(tokenizer, args.prefix + prompt), prompt, None
    template = chat_template(tokenizer, not args.no_thinking)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    text = render(tokenizer, template, [*system, {"role": "user", "content": prompt}])
    return model, tokenizer, encode(tokenizer, args.prefix + text), prompt, template


def new_token_budget(wanted: int, prompt_length: int, model: Any) -> int:
    """--length, lowered (with a note) to what the model's context holds after the prompt."""
    limit = max_positions(model)
    length = fit_new_tokens(wanted, prompt_length, limit)
    if length < 1:
        raise UserError(
            f"the prompt is {prompt_length} tokens, the model reads at most {limit}; shorten it"
        )
    if length < wanted:
        note(PROG, f"--length lowered to {length}: the model reads at most {limit} tokens")
    return length


def generate(args: argparse.Namespace) -> list[str]:
    """Load, sample and print; returns the texts as printed."""
    check_flags(args)
    model, tokenizer, prompt_ids, prompt, template = prepare(args)
    length = new_token_budget(args.length, len(prompt_ids), model)
    end_ids = end_token_ids(model, tokenizer, template)
    # Without a stop token or a chat the user asked for `length` tokens: no end before that.
    min_new = 0 if args.stop_token or args.chat else length
    torch.manual_seed(args.seed)  # transformers.set_seed would import peft: seconds, for nothing
    with torch.no_grad():
        sequences = model.generate(
            **model_inputs(prompt_ids, model.device),
            max_new_tokens=length,
            min_new_tokens=min_new,
            eos_token_id=end_ids,
            num_return_sequences=args.num_return_sequences,
            pad_token_id=pad_token_id(tokenizer),
            **decoding_kwargs(args.temperature, args.k, args.p, args.repetition_penalty),
        )

    texts = []
    for number, sequence in enumerate(sequences, start=1):
        ids = new_token_ids(sequence, len(prompt_ids), set(end_ids))
        new_text = cut_at_stop(continuation(tokenizer, prompt_ids, ids), args.stop_token)
        # A chat shows the answer alone; a continuation is shown after its prompt.
        text = new_text.strip() if args.chat else prompt + new_text
        print(f"=== GENERATED SEQUENCE {number} ({len(ids)} new tokens) ===")
        print(text, flush=True)
        texts.append(text)
    return texts


def main(argv: list[str] | None = None) -> list[str]:
    """Entry point; `argv` defaults to the command line. Returns the generated texts, as the
    Hugging Face example's main() does (its tests call it)."""
    args = build_parser().parse_args(argv)
    try:
        return generate(args)
    except UserError as err:
        fail(PROG, str(err))
    except KeyboardInterrupt:
        # Ctrl-C is how a user gives up on a long generation: no traceback for that.
        print(file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
