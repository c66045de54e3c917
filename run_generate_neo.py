"""Prompt a fine-tuned GPT-Neo (or any causal LM) interactively.

    python run_generate_neo.py finetuned

Each prompt gets 400 new tokens, sampled at temperature 0.9, printed as they are generated, in the
dtype the model was saved in (float32 on a CPU for a float16 model). With --chat each line is a
user message, the conversation is kept, and only the answers are printed. An empty line is
skipped; `exit`, end of input (Ctrl-D) or Ctrl-C at the prompt quit; Ctrl-C during a generation
stops just that generation.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from transformers import TextStreamer

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
    positive_int,
    probability,
    render,
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
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="precision to run in (default: auto, the dtype the model was saved in); float16 "
        "on a CPU runs in float32, with a note",
    )
    parser.add_argument(
        "--fp32",
        action="store_const",
        const="float32",
        dest="dtype",
        help="the old spelling of --dtype float32",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each line is a user message in a conversation rendered with the tokenizer's chat "
        "template (or the repo's chat_template.jinja); answers end where the model ends them, "
        "and the oldest turns are dropped when the model's context fills up",
    )
    parser.add_argument(
        "--no_thinking",
        action="store_true",
        help="with --chat: prompt a thinking model (Qwen3 and its peers) with thinking off, so it answers at once",
    )
    parser.add_argument(
        "--system",
        default=None,
        help="with --chat: a system message that opens the conversation and is never dropped",
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
    # One line on stderr, like every other bad input, instead of usage plus the error.
    parser.error = lambda message: fail(PROG, f"{message} (see --help)")
    return parser


def wrap_with_deepspeed(model: Any, device: torch.device, kernel_inject: bool) -> Any:
    """Return the model as DeepSpeed inference prepared it (the engine's .module)."""
    # Left to guess, DeepSpeed picks the GPU even under --use_cpu, and says so on stdout.
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    try:
        # Imported here: DeepSpeed is optional for sampling and slow to import.
        import deepspeed
    except ImportError as err:
        raise UserError(f"--deepspeed needs the deepspeed package: {err}") from err
    # dtype must be given, the model's own: DeepSpeed's default is float16, which a CPU refuses.
    engine = deepspeed.init_inference(
        model, dtype=model.dtype, replace_with_kernel_inject=kernel_inject
    )
    return engine.module


def fit_conversation(
    tokenizer: Any, template: str, messages: list[dict], room: int | None
) -> list[int]:
    """Ids of the conversation, its oldest turns dropped from `messages` until at most `room`.

    The system message and the newest question always stay.
    """
    first = 1 if messages[0]["role"] == "system" else 0
    dropped = 0
    while True:
        ids = encode(tokenizer, render(tokenizer, template, messages))
        if room is None or len(ids) <= room or len(messages) - first < 3:
            break
        # A question and its answer go together, so the conversation still starts with a question.
        del messages[first : first + 2]
        dropped += 2
    if dropped:
        note(PROG, f"dropped the {dropped} oldest messages to make room for --length")
    return ids


def stream_one(
    model: Any, tokenizer: Any, prompt: str | list[dict], args: argparse.Namespace
) -> str | None:
    """Generate after `prompt`, printing as it comes, and return the new text (None if skipped).

    `prompt` is a text to continue, or with --chat the conversation so far, ending in the user's
    question; its oldest turns are dropped in place when it and --length outgrow the model.
    """
    limit = max_positions(model)
    template = chat_template(tokenizer, not args.no_thinking) if args.chat else None
    if template is None:
        ids = encode(tokenizer, prompt)
    else:
        ids = fit_conversation(tokenizer, template, prompt, limit and limit - args.length)
    length = fit_new_tokens(args.length, len(ids), limit)
    if length < 1:
        note(PROG, f"prompt skipped: it is {len(ids)} tokens, the model reads at most {limit}")
        return None
    end_ids = end_token_ids(model, tokenizer, template)
    # A chat shows the answer alone; a continuation is shown after its prompt.
    streamer = TextStreamer(tokenizer, skip_prompt=args.chat, skip_special_tokens=True)
    with torch.no_grad():
        sequences = model.generate(
            **model_inputs(ids, model.device),
            max_new_tokens=length,
            # As the original script, a continuation always gets the full length; an answer
            # ends where the model ends it.
            min_new_tokens=0 if args.chat else length,
            eos_token_id=end_ids,
            pad_token_id=pad_token_id(tokenizer),
            streamer=streamer,
            **decoding_kwargs(args.temperature, args.top_k, args.top_p),
        )
    new_ids = new_token_ids(sequences[0], len(ids), set(end_ids))
    return continuation(tokenizer, ids, new_ids).strip()


def prompt_loop(model: Any, tokenizer: Any, args: argparse.Namespace) -> int:
    """Read prompts until exit, end of input or Ctrl-C; returns the exit status."""
    history = [{"role": "system", "content": args.system}] if args.system is not None else []
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
        if args.chat:
            history.append({"role": "user", "content": text})
        try:
            answer = stream_one(model, tokenizer, history if args.chat else text, args)
        except KeyboardInterrupt:
            # Ctrl-C in the middle of 400 tokens means "enough of this one", not "reload the model".
            print("\n(generation stopped)", flush=True)
            answer = None
        if args.chat and answer is None:
            history.pop()  # an unanswered question would leave two user turns in a row
        elif args.chat:
            history.append({"role": "assistant", "content": answer})


def main(argv: list[str] | None = None) -> int:
    """Entry point; `argv` defaults to the command line."""
    args = build_parser().parse_args(argv)
    device = choose_device(args.use_cpu)
    try:
        if args.system is not None and not args.chat:
            raise UserError("--system is a chat message: add --chat")
        model, tokenizer = load_model(
            PROG, args.model, device, args.dtype, args.trust_remote_code, f"--dtype {args.dtype}"
        )
        if args.deepspeed:
            kernel_inject = device.type == "cuda" and not args.no_kernel_inject
            model = wrap_with_deepspeed(model, device, kernel_inject)
            injection = "on" if kernel_inject else "off"
            note(PROG, f"model wrapped by deepspeed.init_inference (kernel injection {injection})")
        if args.seed is not None:
            torch.manual_seed(args.seed)
        note(PROG, "type a prompt and press Enter; 'exit', Ctrl-D or Ctrl-C quits")
        # A chat template can still refuse the conversation here, on the first prompt.
        return prompt_loop(model, tokenizer, args)
    except UserError as err:
        fail(PROG, str(err))
    except KeyboardInterrupt:  # while loading: the loop handles its own
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
