"""What run_generation.py and run_generate_neo.py share.

Both scripts answer the same questions before they can sample: where to run (GPU or CPU), in which
precision, whether the path they were given is a model (or LoRA adapter) folder written by
run_clm.py, how a prompt or a conversation becomes token ids, and where a generation ends. Each
answer lives here once.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from chats import folded
from common import UserError, note, number

# stdout holds the generated text and stderr our own notes: the loading bars would be a third voice.
hf_logging.disable_progress_bar()

DEFAULT_CHAT_TEMPLATE = Path(__file__).resolve().with_name("chat_template.jinja")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
ADAPTER_CONFIG = "adapter_config.json"

positive_int = number(int, 1)
non_negative_int = number(int, 0)
non_negative_float = number(float, 0)
positive_float = number(float, 0, above=True)
probability = number(float, 0, 1, above=True)


def choose_device(use_cpu: bool) -> torch.device:
    """The GPU when there is one and the user did not ask for the CPU."""
    if use_cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def choose_dtype(
    prog: str, device: torch.device, wanted: str, saved: torch.dtype, who: str
) -> torch.dtype:
    """The dtype asked for, or the one the model was saved in; float32 where the device lacks it.

    A CPU has no usable float16, a pre-Ampere GPU no bfloat16. `who` starts the note that says so:
    the flag that asked ("--fp16"), or "finetuned is saved in float16, which".
    """
    dtype = saved if wanted == "auto" else DTYPES[wanted]
    if dtype == torch.float16 and device.type == "cpu":
        needs = "a GPU; running in float32 on the CPU"
    elif (
        dtype == torch.bfloat16
        and device.type == "cuda"
        and not torch.cuda.is_bf16_supported(including_emulation=False)
    ):
        needs = "an Ampere or newer GPU; running in float32"
    else:
        return dtype
    note(prog, f"{who} needs {needs}")
    return torch.float32


def looks_like_local_path(name: str) -> bool:
    """True for names that can only mean a path here; "gpt2" or "org/model" may be hub ids."""
    if os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(("/", os.sep)):
        return True
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_model_dir(path: Path, name: str) -> None:
    """Raise UserError unless `path` holds a model (or adapter) config and a tokenizer."""
    if not any((path / config).is_file() for config in ("config.json", ADAPTER_CONFIG)):
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


def base_model(source: str) -> str:
    """Where the model's config is: a LoRA adapter folder names its base model."""
    adapter = Path(source) / ADAPTER_CONFIG
    if not adapter.is_file():
        return source
    if importlib.util.find_spec("peft") is None:
        raise UserError(
            f"{source} is a LoRA adapter, which needs the peft package: pip install peft, "
            "or pass the merged model folder that run_clm.py wrote above it"
        )
    return json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]


def load_model(
    prog: str,
    name: str,
    device: torch.device,
    dtype: str,
    trust_remote_code: bool,
    asked_as: str,
) -> tuple[Any, Any]:
    """Load the causal LM (or base model + LoRA adapter) and its tokenizer, ready for generate().

    `dtype` is "auto" (the dtype the model was saved in) or a key of DTYPES, asked for by the
    flag `asked_as` (for the note when the device cannot run it).
    """
    source, is_local = resolve_source(name)
    remote = {"trust_remote_code": trust_remote_code}
    try:
        # Config and tokenizer first: they are small, so a bad hub id fails before gigabytes load.
        config = AutoConfig.from_pretrained(base_model(source), **remote)
        tokenizer = AutoTokenizer.from_pretrained(source, **remote)
        saved = getattr(config, "dtype", None) or torch.float32
        who = asked_as if dtype != "auto" else f"{name} is saved in {dtype_name(saved)}, which"
        chosen = choose_dtype(prog, device, dtype, saved, who)
        # Said only once the model is known to exist: its weights may take minutes to load.
        note(prog, f"loading {name} on {device.type} in {dtype_name(chosen)}")
        # device_map writes the weights straight to the chosen device, so a GPU run never holds
        # a second copy in RAM. An adapter folder loads its base model and then the adapter.
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=chosen, device_map=device.type, **remote
        )
    except (OSError, ValueError, KeyError) as err:
        # OSError: missing weights, unreachable hub. ValueError: not a causal LM, or remote code
        # that needs --trust_remote_code. KeyError: an adapter config without its base model.
        where = name if is_local else f"{name} (not a local directory, tried as a hub model id)"
        raise UserError(f"cannot load {where}: {err}") from err
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


def encode(tokenizer: Any, text: str) -> list[int]:
    """The prompt's ids with the tokenizer's special tokens (Llama's BOS) added once.

    A chat template may already write the BOS text; the tokenizer would then add a second BOS.
    An empty prompt starts from the BOS (or end-of-text) token.
    """
    bos = tokenizer.bos_token
    ids = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError("the prompt is empty and the tokenizer has no BOS token to start from")
    return [start]


def model_inputs(ids: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([ids], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def new_token_ids(sequence: torch.Tensor, prompt_length: int, end_ids: set[int]) -> list[int]:
    """The continuation's ids, ending before the first end-of-text token (padding follows it)."""
    ids = sequence[prompt_length:].tolist()
    for position, token in enumerate(ids):
        if token in end_ids:
            return ids[:position]
    return ids


def continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text `new_ids` add after the prompt.

    Decoded on their own, SentencePiece tokenizers (Llama) drop the space the first one starts with.
    """
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    whole = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if whole.startswith(before):
        return whole[len(before) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


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


def end_token_ids(model: Any, tokenizer: Any, chat_template: str | None = None) -> list[int]:
    """Every id that ends a sequence: the model's, the tokenizer's, and in a chat the template's."""
    configured = model.generation_config.eos_token_id
    ids = [*(configured if isinstance(configured, list) else [configured]), tokenizer.eos_token_id]
    if chat_template is not None:
        ids.append(end_of_turn(tokenizer, chat_template))
    return sorted({token for token in ids if token is not None})


def pad_token_id(tokenizer: Any) -> int | None:
    """GPT-2, GPT-Neo and Llama have no padding token; the end-of-text token stands in, as usual."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def chat_template(tokenizer: Any, thinking: bool = True) -> str:
    """The tokenizer's own template, else the repo's, which run_clm.py also trains with. Without
    thinking, the template sees enable_thinking=false, the switch of Qwen3's and its peers'."""
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")
    return template if thinking else "{%- set enable_thinking = false -%}" + template


def render(tokenizer: Any, template: str, messages: list[dict], answer_next: bool = True) -> str:
    """The conversation as the model reads it, ending where the assistant's answer starts."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=answer_next
        )
    except TemplateError as err:
        if messages and messages[0]["role"] == "system":  # Gemma 1/2: as run_clm.py trained it
            return render(tokenizer, template, folded(messages), answer_next)
        # Some templates refuse turns out of order: the user's input, not ours.
        raise UserError(f"the chat template refused the conversation: {err}") from err


def end_of_turn(tokenizer: Any, template: str) -> int | None:
    """The special token the template closes an assistant turn with (ChatML's <|im_end|>), if any."""
    mark = "PROBE_ANSWER"
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}]
    text = render(tokenizer, template, probe, answer_next=False)
    if mark not in text:
        return None
    tail = text[text.rindex(mark) + len(mark) :]
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    return next((token for token in ids if token in special), None)
