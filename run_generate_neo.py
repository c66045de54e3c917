"""Prompt a fine-tuned GPT-Neo (or any causal LM) interactively.

    python run_generate_neo.py finetuned

Each prompt gets 400 new tokens, sampled at temperature 0.9, printed as they are generated. Runs
in float16 on a GPU and in float32 on a CPU. An empty line is skipped; `exit`, end of input
(Ctrl-D) or Ctrl-C at the prompt quit; Ctrl-C during a generation stops just that generation.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from transformers import TextStreamer, set_seed

from generation import (
    UserError,
    choose_device,
    choose_dtype,
    decoding_kwargs,
    encode_prompt,
    fail,
    fit_new_tokens,
    load_model,
    max_positions,
    non_negative_float,
    non_negative_int,
    note,
    pad_token_id,
    positive_int,
    probability,
)

PROG = "run_generate_neo.py"
PROMPT = "Model prompt >>> "
QUIT_WORDS = frozenset({"exit", "quit"})


def build_parser() -> argparse.ArgumentParser:
    """Flags for the interactive loop; the defaults are those of the guide's original script."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Interactively prompt a causal language model (e.g. run_clm.py's "
        "--output_dir). Empty lines are skipped; 'exit', Ctrl-D or Ctrl-C quit.",
    )
    parser.add_argument(
        "model",
        help="model directory written by run_clm.py (--output_dir), or a hub model id such "
        "as EleutherAI/gpt-neo-2.7B",
    )
    parser.add_argument(
        "--length",
        type=positive_int,
        default=400,
        help="new tokens to generate after each prompt (default: 400); lowered to what the "
        "model's context can hold",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.9,
        help="sampling temperature (default: 0.9); 0 means greedy decoding, the same text every time",
    )
    parser.add_argument(
        "--top_p",
        type=probability,
        default=1.0,
        help="top-p (nucleus) sampling; 1.0 keeps all tokens (default: 1.0)",
    )
    parser.add_argument(
        "--top_k",
        type=non_negative_int,
        default=50,
        help="top-k sampling; 0 keeps all tokens (default: 50, what generate() used for the "
        "original script)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed, set once at start, for repeatable sessions (default: none)",
    )
    parser.add_argument(
        "--use_cpu",
        action="store_true",
        help="run on the CPU even when a GPU is available",
    )
    parser.add_argument(
        "--fp32",
        action="store_true",
        help="keep float32 on the GPU too (default there: float16; the CPU always uses float32)",
    )
    parser.add_argument(
        "--deepspeed",
        action="store_true",
        help="wrap the model with deepspeed.init_inference (kernel injection on a GPU only)",
    )
    parser.add_argument(
        "--no_kernel_inject",
        action="store_true",
        help="with --deepspeed on a GPU: skip DeepSpeed's fused kernels (the CPU never uses them)",
    )
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow a hub model to run its own Python code (off by default: only for models you trust)",
    )
    return parser


def wrap_with_deepspeed(model: Any, dtype: torch.dtype, kernel_inject: bool) -> Any:
    """Return the model as DeepSpeed inference prepared it (the engine's .module)."""
    try:
        # Imported here: DeepSpeed is optional for sampling and slow to import.
        import deepspeed
    except ImportError as err:
        raise UserError(f"--deepspeed needs the deepspeed package: {err}") from err
    # dtype must be given: DeepSpeed's default is float16, which it refuses on a CPU.
    engine = deepspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=kernel_inject)
    return engine.module


def stream_one(model: Any, tokenizer: Any, prompt: str, args: argparse.Namespace) -> None:
    """Generate a continuation of `prompt`, printing prompt and tokens as they come."""
    inputs = encode_prompt(tokenizer, prompt, model.device)
    prompt_length = inputs["input_ids"].shape[1]
    limit = max_positions(model)
    length = fit_new_tokens(args.length, prompt_length, limit)
    if length < 1:
        note(PROG, f"prompt skipped: it is {prompt_length} tokens, the model reads at most {limit}")
        return
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(
            **inputs,
            # As the original script: always the full length, end-of-text held back until then.
            max_new_tokens=length,
            min_new_tokens=length,
            pad_token_id=pad_token_id(tokenizer),
            streamer=streamer,
            **decoding_kwargs(args.temperature, args.top_k, args.top_p),
        )


def prompt_loop(model: Any, tokenizer: Any, args: argparse.Namespace) -> int:
    """Read prompts until exit, end of input or Ctrl-C; returns the exit status."""
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            # Leave the terminal on a fresh line after the unanswered prompt.
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text.lower() in QUIT_WORDS:
            return 0
        try:
            stream_one(model, tokenizer, text, args)
        except KeyboardInterrupt:
            # Ctrl-C in the middle of 400 tokens means "enough of this one", not "reload the model".
            print("\n(generation stopped)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; `argv` defaults to the command line."""
    args = build_parser().parse_args(argv)
    device = choose_device(args.use_cpu)
    dtype = choose_dtype(device, half=not args.fp32)
    try:
        model, tokenizer = load_model(PROG, args.model, device, dtype, args.trust_remote_code)
        if args.deepspeed:
            kernel_inject = device.type == "cuda" and not args.no_kernel_inject
            model = wrap_with_deepspeed(model, dtype, kernel_inject)
            injection = "on" if kernel_inject else "off"
            note(PROG, f"model wrapped by deepspeed.init_inference (kernel injection {injection})")
    except UserError as err:
        fail(PROG, str(err))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    if args.seed is not None:
        set_seed(args.seed)
    note(PROG, "type a prompt and press Enter; 'exit', Ctrl-D or Ctrl-C quits")
    return prompt_loop(model, tokenizer, args)


if __name__ == "__main__":
    sys.exit(main())
