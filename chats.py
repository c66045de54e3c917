"""Chat records to token ids and a loss mask, under the chat template the model family ships.

The loss falls on what the assistant says, as the whole conversation renders it, up to and
including the token that ends its turn, so the model learns to stop. TRL keeps, for the families
whose templates re-render history (Qwen3, Phi-3.5, DeepSeek-V3, gpt-oss, Nemotron, ...), a
training twin with `{% generation %}` markers around each assistant turn; transformers then gives
the mask of those spans over the conversation tokenized whole. A template that TRL has no twin
for but that renders a chat as a series of prefixes (Llama 3.1, Mistral, a plain ChatML) gets the
same mask from renders of the chat's prefixes. Either way the ids are those of the whole render,
as the model sees them at inference.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from jinja2 import TemplateError
from trl.chat_template_utils import get_training_chat_template, has_generation_markers

from common import UserError

ROLES = ("system", "user", "assistant", "tool")
PROBE = [
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "And Faustus?"},
    {"role": "assistant", "content": "Marlowe."},
]
NOT_PREFIX = (
    "the chat template re-renders earlier turns and TRL has no training version of it; pass "
    "--chat_template FILE with {% generation %} ... {% endgeneration %} around each assistant "
    "turn (docs/data.md)"
)


def checked(record: dict, where: str) -> dict:
    """A chat record (messages, or TRL's conversational prompt and completion) checked, stored as
    JSON: tool calls' arguments and tool schemas have no fixed Arrow type. UserError names `where`."""
    if "messages" not in record:  # TRL's conversational prompt/completion: the prompt is context
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(completion, list):
            raise UserError(f"{where}: prompt and completion must both be lists of messages.")
        record = {**record, "messages": [{**m, "weight": 0} if isinstance(m, dict) and m.get("role") == "assistant" else m for m in prompt] + completion}  # fmt: skip
    messages, tools = record["messages"], record.get("tools")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}.")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            role = turn.get("role") if isinstance(turn, dict) else turn
            raise UserError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}.")
        if turn.get("weight", 1) not in (0, 1):
            raise UserError(f"{where}: a message's weight must be 0 (not trained) or 1.")
        calls = turn.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise UserError(f"{where}: tool_calls must be a list of {{type, function}} calls.")
        if not (isinstance(turn.get("content"), str) or calls):
            raise UserError(f"{where}: every message needs a string `content` (or tool_calls).")
    if not any(turn["role"] == "assistant" for turn in messages):
        raise UserError(f"{where}: no assistant message, so nothing to learn; add the answer.")
    if tools is not None and not isinstance(tools, list):
        raise UserError(f"{where}: tools must be a list of function schemas.")
    # Fields a template does not know stay; None (what Arrow gives absent fields) goes.
    clean = [{k: v for k, v in turn.items() if v is not None} for turn in messages]
    return {"messages": json.dumps(clean), "tools": json.dumps(tools or [])}


@dataclass(frozen=True)
class ChatFormat:
    template: str  # what records render with
    marked: bool  # it has {% generation %} markers: transformers computes the mask
    fold_system: bool  # the family has no system role (Gemma 1 and 2)


def render(tokenizer, form: ChatFormat, messages: list[dict], prompt: bool = False, tools=None):
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=form.template, tokenize=False,
        add_generation_prompt=prompt,
    )  # fmt: skip


def chat_format(tokenizer, template: str) -> ChatFormat:
    """How to render and mask chats for this template, checked once on a probe chat."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            "chat data needs the fast tokenizer (its character offsets place the loss); "
            "drop --use_fast_tokenizer False."
        )
    probe = copy.copy(tokenizer)
    probe.chat_template = template
    marked = has_generation_markers(template)
    if not marked:
        try:
            twin = get_training_chat_template(probe)
        except (ValueError, TemplateError, TypeError):
            twin = None  # none kept for this family: the prefix renders must do
        template, marked = (twin, True) if twin else (template, False)
    form = ChatFormat(template, marked, fold_system=False)
    system = [{"role": "system", "content": "Answer in a word."}]
    try:
        render(tokenizer, form, system + PROBE)
    except TemplateError:
        form = ChatFormat(template, marked, fold_system=True)
    try:
        encode(tokenizer, form, system + PROBE)
    except TemplateError as error:
        raise UserError(f"the chat template fails on a plain chat ({error.message}).") from None
    return form


def folded(messages: list[dict]) -> list[dict]:
    """A system message as the head of the first user turn, as Gemma's documentation advises."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{"role": "user", "content": system}, *rest]


def prefix_spans(
    tokenizer, form: ChatFormat, messages: list[dict], tools
) -> list[tuple[int, range]]:
    """Each assistant turn's index and characters in the whole render, from renders of the
    chat's prefixes."""
    spans, done = [], ""
    for at, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head = render(tokenizer, form, messages[:at], True, tools)
        upto = render(tokenizer, form, messages[: at + 1], False, tools)
        if not (head.startswith(done) and upto.startswith(head)):
            raise UserError(NOT_PREFIX)
        spans.append((at, range(len(head), len(upto))))
        done = upto
    if not render(tokenizer, form, messages, False, tools).startswith(done):
        raise UserError(NOT_PREFIX)
    return spans


def encode(tokenizer, form: ChatFormat, messages: list[dict], tools=None):
    """(ids, trained) for one chat: the ids of its whole render, and which of them are trained:
    the assistant turns', less those marked `"weight": 0` (OpenAI's way to keep a turn as
    context only)."""
    messages = folded(messages) if form.fold_system else messages
    skip = {at for at, turn in enumerate(messages) if turn.get("weight", 1) == 0}
    if form.marked:
        out = tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=form.template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        ids, trained = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if not skip:
            return ids, trained
    text = render(tokenizer, form, messages, False, tools)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = prefix_spans(tokenizer, form, messages, tools)

    def inside(start: int, end: int, wanted) -> bool:
        return any(start < span.stop and end > span.start for at, span in spans if wanted(at))

    offsets = encoding["offset_mapping"]
    if not form.marked:
        trained = [inside(start, end, lambda at: True) for start, end in offsets]
    trained = [on and not inside(start, end, skip.__contains__) for on, (start, end) in zip(trained, offsets, strict=True)]  # fmt: skip
    return list(encoding["input_ids"]), trained


def turn_end(tokenizer, form: ChatFormat, last: bool = False) -> int | None:
    """The token that ends an assistant turn (<|im_end|>, <|eot_id|>, ...): the last trained one
    of a probe chat that is not whitespace, if it is one of the tokenizer's own added tokens.
    `last`: of the chat's last turn, which gpt-oss ends otherwise (<|return|>, not <|end|>)."""
    probe = PROBE[:2] if last else [*PROBE[:2], {"role": "user", "content": "Thanks."}]
    ids, trained = encode(tokenizer, form, probe)
    added = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    for token, on in zip(reversed(ids), reversed(trained), strict=True):
        if on and tokenizer.decode([token]).strip():
            return token if token in added else None
    return None


def stop_at_turn_end(generation, tokenizer) -> None:
    """Saved as end-of-sequence ids too, so plain generate(), pipelines and vLLM stop where
    the trained turn ends, as this repo's scripts do."""
    form = chat_format(tokenizer, tokenizer.chat_template)
    stops = generation.eos_token_id
    stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
    for end in (turn_end(tokenizer, form), turn_end(tokenizer, form, last=True)):
        if end is not None and end not in stops:
            stops = [*stops, end]
    generation.eos_token_id = stops or None
