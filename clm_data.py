"""Training data for run_clm.py: read and check the files, then turn records into token ids.

A file holds one of three shapes of record, recognised by its fields:
- text: a .txt file, a CSV `text` column, or {"text": ...} records. By default all text runs
  together, an end-of-text token after each document, cut into blocks of --block_size tokens;
  --separate_examples (or --packing) makes each record its own example instead.
- prompt/completion: {"prompt": ..., "completion": ...} records (JSONL or CSV columns). The
  loss falls on the completion and the EOS that closes it (--completion_only_loss False: all).
- chat: {"messages": [{"role": ..., "content": ...}, ...]} records, rendered with the
  tokenizer's chat template (or chat_template.jinja, or --chat_template FILE). The loss falls on
  the assistant turns (--assistant_only_loss False: all).
"""

from __future__ import annotations

import codecs
import copy
import csv
import hashlib
import inspect
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import torch
from datasets.fingerprint import Hasher
from jinja2 import TemplateError

import chats
import preference
from common import UserError, arg, say

PROG = "run_clm.py"
EXTENSIONS = {".csv": "csv", ".txt": "txt", ".json": "json", ".jsonl": "json"}
DEFAULT_CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")
FEATURES = {
    "text": datasets.Features(
        {
            "text": datasets.Value("string"),
            "start": datasets.Value("bool"),
            "end": datasets.Value("bool"),
        }
    ),
    "completion": datasets.Features(
        {"prompt": datasets.Value("string"), "completion": datasets.Value("string")}
    ),
    # As JSON: tool calls' arguments and tool schemas have no fixed Arrow type.
    "chat": datasets.Features(
        {"messages": datasets.Value("string"), "tools": datasets.Value("string")}
    ),
    **preference.FEATURES,
}
# Long texts are tokenized as pieces of about this many characters, cut where the tokenizer
# would end a token anyway: the same ids, spread by the Rust tokenizer over every core.
PIECE_CHARS = 1 << 16
PIECES_PER_CALL = 64
# A document that cannot be cut exactly is read whole; past this Arrow cannot hold it.
WHOLE_DOCUMENT_LIMIT = 1 << 30
# Pre-tokenizer regexes (Llama 3's and Qwen2's) that isolate a newline between two non-spaces.
NEWLINE_SAFE_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


@dataclass
class DataArguments:
    dataset_name: str | None = arg(
        None,
        "A dataset instead of files: a hub name (when online), a local dataset folder, or "
        "a folder written by Dataset.save_to_disk.",
    )
    dataset_config_name: str | None = arg(
        None, "The configuration of --dataset_name, if it has several."
    )
    train_file: str | None = arg(
        None,
        "Training data: .txt, .csv (a `text` column, or `prompt` and `completion`), or "
        ".json/.jsonl records with text, prompt/completion or messages.",
    )
    validation_file: str | None = arg(
        None,
        "Evaluation data, same formats. Without it, --do_eval holds out part of the train data.",
    )
    validation_split_percentage: int = arg(
        5,
        "Percent of training blocks or examples held out for eval when there is no validation data.",
    )
    block_size: int | None = arg(
        None, "Tokens per block or example. Default and maximum: the model's context, at most 1024."
    )
    separate_examples: bool = arg(
        False,
        "Each CSV row, .txt paragraph or JSON record of text is its own example (truncated, "
        "padded) instead of running into the next.",
    )
    packing: bool = arg(
        False,
        "Examples share a batch row without padding, each with its own positions, where the "
        "model's attention supports it (implies --separate_examples for text).",
    )
    completion_only_loss: bool = arg(
        True, "Prompt/completion data: train on the completions only (False: on all)."
    )
    assistant_only_loss: bool = arg(
        True, "Chat data: train on the assistant turns only (False: on all)."
    )
    chat_template: str | None = arg(
        None,
        "A Jinja chat template file for chat data; default: the tokenizer's own, else chat_template.jinja.",
    )
    keep_linebreaks: bool = arg(
        True,
        "False: each line of a .txt file is its own document, without its line break (as HF's script).",
    )
    eos_between_rows: bool = arg(
        False,
        "--dataset_name text: an end-of-text token after each row. Default: rows run together as "
        "the tokenizer encodes them, as in HF's script (right for wikitext's lines).",
    )
    show_examples: int = arg(
        0,
        "Print the first N training examples as the model will see them, trained text between "
        "[[ and ]], and exit before any weights load.",
    )
    streaming: bool = arg(False, "Not supported: the data is tokenized once and cached.")
    overwrite_cache: bool = arg(False, "Tokenize again instead of reusing the datasets cache.")
    preprocessing_num_workers: int | None = arg(
        None, "Processes for tokenizing; default one, whose Rust tokenizer already uses every core."
    )
    max_train_samples: int | None = arg(None, "Use only this many training blocks or examples.")
    max_eval_samples: int | None = arg(None, "Use only this many evaluation blocks or examples.")

    @property
    def examples(self) -> bool:
        return self.separate_examples or self.packing


# ---------------------------------------------------------------- where a long text may be cut


def cut_rule(tokenizer) -> str | None:
    """The character before (" ") or after ("\\n") which a long text may be cut without
    changing its token ids, or None when no cut is known to be exact for this tokenizer.

    A cut must fall where the whole text's pre-tokenizer ends a token anyway, with nothing
    that adds text at the start of each call (a prefix space) or looks across the cut:
    - "\\n": byte-level BPE (GPT-2, Llama 3, Qwen2) whose pre-tokenizer isolates a newline
      that has a non-space character on both sides;
    - " ": SentencePiece-style Metaspace, which starts a token at every space, either by
      splitting there or because no token of the vocabulary holds a "▁" past its start.
    Normalizers that work character by character (NFC, NFKC) cannot reach across either.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return None
    # Their settings alone: the whole tokenizer's JSON holds the vocabulary, megabytes to parse.
    normalizer, pre = (
        json.loads(part.__getstate__()) if part is not None else {}
        for part in (backend.normalizer, backend.pre_tokenizer)
    )
    if (normalizer or {"type": "NFC"})["type"] not in ("NFC", "NFKC"):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    rule = None
    byte_level = kinds == ["ByteLevel"] and steps[0].get("use_regex")
    split_then_bytes = (
        kinds == ["Split", "ByteLevel"]
        and steps[0]["pattern"].get("Regex") in NEWLINE_SAFE_SPLITS
        and steps[0]["behavior"] == "Isolated"
        and not steps[0]["invert"]
    )
    if (byte_level or split_then_bytes) and not steps[-1]["add_prefix_space"]:
        rule = "\n"
    elif kinds == ["Metaspace"] and steps[0]["replacement"] == "▁":
        mid_word = any("▁" in token[1:] for token in backend.get_vocab())
        rule = " " if steps[0].get("split", True) or not mid_word else None
    # An added token that swallows a neighbour or holds the cut character could span a cut.
    for token in tokenizer.added_tokens_decoder.values():
        if rule and (token.lstrip or token.rstrip or rule in token.content or "▁" in token.content):
            return None
    return rule


def next_cut(text: str, rule: str, start: int) -> int:
    """The first exact cut position at or after `start`, or -1: at a lone `rule` character
    with a non-space character on each side (after a newline, before a space)."""
    at = text.find(rule, start)
    while at != -1 and not (
        0 < at < len(text) - 1 and not text[at - 1].isspace() and not text[at + 1].isspace()
    ):
        at = text.find(rule, at + 1)
    if at == -1:
        return -1
    return at + 1 if rule == "\n" else at


def pieces(text: str, rule: str | None, size: int = 0) -> list[str]:
    """`text` as pieces of about `size` (default PIECE_CHARS) characters, cut where `rule` allows."""
    if rule is None:
        return [text]
    size = size or PIECE_CHARS
    found, start = [], 0
    while len(text) - start > size:
        cut = next_cut(text, rule, start + size)
        if cut == -1:
            break
        found.append(text[start:cut])
        start = cut
    found.append(text[start:])
    return found


# ---------------------------------------------------------------- reading files


def check_file(path: str) -> str:
    """The reader for `path`, after checking it exists, is UTF-8 and holds text (streamed)."""
    file = Path(path)
    kind = EXTENSIONS.get(file.suffix.lower())
    if kind is None:
        raise UserError(
            f"{path}: unsupported file type; use .txt, .csv (column `text`, or `prompt` and "
            "`completion`) or .json/.jsonl."
        )
    if not file.is_file():
        raise UserError(f"{path}: no such file.")
    decoder, offset, has_text = codecs.getincrementaldecoder("utf-8")(), 0, False
    try:
        with open(file, "rb") as stream:
            while chunk := stream.read(1 << 24):
                has_text = has_text or bool(decoder.decode(chunk).strip())
                offset += len(chunk)
            decoder.decode(b"", final=True)
    except OSError as error:
        raise UserError(f"{path}: cannot read it ({error.strerror}).") from None
    except UnicodeDecodeError as error:
        raise UserError(
            f"{path}: not UTF-8 (bad byte at offset {offset + error.start}); convert it, e.g. "
            "`iconv -f latin1 -t utf-8`, or run text2csv.py with --encoding."
        ) from None
    if not has_text:
        raise UserError(f"{path}: the file is empty; put your training text in it.")
    return kind


def txt_records(path: str, rule: str | None, paragraphs: bool, keep_linebreaks: bool):
    """A .txt file as text records: one document read in pieces, its paragraphs, or its lines."""
    with open(path, encoding="utf-8-sig") as stream:
        if paragraphs or not keep_linebreaks:
            block: list[str] = []
            for line in [*stream, ""]:
                if not keep_linebreaks:
                    if line.strip():
                        yield {"text": line.rstrip("\n"), "start": True, "end": True}
                elif line.strip():
                    block.append(line)
                elif block:
                    yield {"text": "".join(block).strip("\n"), "start": True, "end": True}
                    block = []
            return
        yield from document(
            iter(lambda: stream.read(PIECE_CHARS * PIECES_PER_CALL), ""), rule, path
        )


def document(chunks: Iterable[str], rule: str | None, where: str):
    """One document, given as successive chunks of its text, as text records of pieces cut where
    `rule` allows (BOS before the first, EOS after the last): no Arrow cell holds more than a few
    pieces, and Arrow's 2 GiB limit on one is never reached. Without a rule it is read whole."""
    carry, first = "", True
    for chunk in chunks:
        carry += chunk
        if rule is None:
            if len(carry) > WHOLE_DOCUMENT_LIMIT:
                raise UserError(
                    f"{where}: over {WHOLE_DOCUMENT_LIMIT >> 30} GiB in one document, and this "
                    "tokenizer's ids would change if it were cut; split it into documents "
                    "(`python text2csv.py --split blank_line`) and pass --separate_examples."
                )
            continue
        *done, carry = pieces(carry, rule)
        for piece in done:
            yield {"text": piece, "start": first, "end": False}
            first = False
    yield {"text": carry, "start": first, "end": True}


def csv_records(path: str):
    csv.field_size_limit(sys.maxsize)  # a whole book in one cell is what text2csv.py writes
    with open(path, encoding="utf-8-sig", newline="") as stream:
        reader = csv.DictReader(stream)
        try:
            for row in reader:
                yield reader.line_num, row
        except csv.Error as error:
            raise UserError(f"{path}: line {reader.line_num}: not valid CSV ({error}).") from None


def json_records(path: str):
    with open(path, encoding="utf-8-sig") as stream:
        head = stream.read(1 << 16).lstrip()
        stream.seek(0)
        if head.startswith("["):
            try:
                records = json.load(stream)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}: line {error.lineno}: broken JSON ({error.msg}); fix that line."
                ) from None
            yield from ((f"record {n}", r) for n, r in enumerate(records, start=1))
            return
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(
                    f"{path}: line {number}: broken JSON ({error.msg}); each line must be one JSON object."
                ) from None


def shape_of(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if preference.shape_of(record):  # before prompt/completion: a labelled answer has both
        return preference.shape_of(record)
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:  # as lists of messages: TRL's chat form
        return "chat" if isinstance(record["prompt"], list) else "completion"
    return "text" if "text" in record else None


def checked(record: Any, where: str, shape: str) -> dict:
    """One record of the file's shape, with its strings checked; UserError naming `where`."""
    found = shape_of(record)
    if found is None:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{where}: none of the known fields (text; prompt and completion; messages; prompt, "
            f"chosen and rejected; prompt, completion and label), it has: "
            f"{fields}; rename the fields or make the file with text2csv.py."
        )
    if found != shape:
        raise UserError(
            f"{where}: a {found} record in a file of {shape} records; keep one shape per file."
        )
    if shape == "text":
        return {"text": str(record["text"] or ""), "start": True, "end": True}
    if shape == "completion":
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise UserError(f"{where}: prompt and completion must be strings.")
        if not completion.strip():
            raise UserError(f"{where}: the completion is empty; give every prompt its answer.")
        return {"prompt": prompt, "completion": completion}
    if shape in preference.SHAPES:
        return preference.checked(record, where, shape)
    return chats.checked(record, where)


def generate(
    path: str, kind: str, shape: str, rule, paragraphs: bool, keep_linebreaks: bool, stamp, code
):
    """The records of one file (`stamp`, its size and time, and `code` key the datasets cache)."""
    if kind == "txt":
        yield from txt_records(path, rule, paragraphs, keep_linebreaks)
        return
    records = csv_records(path) if kind == "csv" else json_records(path)
    step = PIECE_CHARS * PIECES_PER_CALL
    for at, record in records:
        where = f"{path}: {at if kind == 'json' else f'line {at}'}"
        row = checked(record, where, shape)
        if shape == "text" and not row["text"].strip():
            continue  # an empty cell is no document
        if shape != "text" or paragraphs:
            yield row
        else:  # running text: a whole book in one cell is cut as a .txt is
            text = row["text"]
            yield from document(
                (text[i : i + step] for i in range(0, len(text), step)), rule, where
            )


def file_shape(path: str, kind: str) -> str:
    """The shape of a file's records, from its CSV header or first JSON record."""
    if kind == "txt":
        return "text"
    if kind == "csv":
        with open(path, encoding="utf-8-sig", newline="") as stream:
            header = next(csv.reader(stream), [])
        shape = shape_of(dict.fromkeys(header))
        if shape in (None, "chat"):
            raise UserError(
                f"{path}: no `text` column, nor `prompt` and `completion` (it has: {', '.join(header)}); "
                "rename the columns or make the file with text2csv.py."
            )
        return shape
    for where, record in json_records(path):
        shape = shape_of(record)
        if shape is None:
            checked(record, f"{path}: {where}", "text")
        return shape
    raise UserError(f"{path}: holds no records; put your training data in it.")


def read_split(flag: str, path: str, data: DataArguments, rule: str | None) -> datasets.Dataset:
    try:
        kind = check_file(path)
        shape = file_shape(path, kind)
        stat = Path(path).stat()
        # The absolute path, size and time key the datasets cache; messages name `path`.
        kwargs = {
            "path": path,
            "kind": kind,
            "shape": shape,
            "rule": rule,
            "paragraphs": data.examples,
            "keep_linebreaks": data.keep_linebreaks,
            "stamp": (str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns),
            "code": Hasher.hash(
                [
                    inspect.getsource(f)
                    for f in (
                        generate,
                        txt_records,
                        document,
                        checked,
                        pieces,
                        chats.checked,
                        preference.checked,
                    )
                ]
            ),
        }
        try:
            dataset = datasets.Dataset.from_generator(
                generate, gen_kwargs=kwargs, features=FEATURES[shape]
            )
        except datasets.exceptions.DatasetGenerationError as error:
            if isinstance(error.__cause__, UserError):
                raise error.__cause__ from None
            raise
        if len(dataset) == 0:
            raise UserError(f"{path}: holds no text; put your training text in it.")
    except UserError as error:
        raise UserError(f"{flag} {error}") from None
    return dataset


def hub_splits(data: DataArguments, model_args) -> dict[str, datasets.Dataset]:
    """--dataset_name: a save_to_disk folder, a local dataset folder, or a hub dataset."""
    name = data.dataset_name
    try:
        if (Path(name) / "dataset_dict.json").is_file() or (Path(name) / "state.json").is_file():
            loaded = datasets.load_from_disk(name)
        else:
            loaded = datasets.load_dataset(
                name,
                data.dataset_config_name,
                cache_dir=model_args.cache_dir,
                token=model_args.token,
            )
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
        raise UserError(f"--dataset_name {name}: cannot load it ({error}).") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    splits = {}
    for split, wanted in (("train", "train"), ("validation", "validation"), ("validation", "test")):
        if wanted in loaded and split not in splits:
            dataset = loaded[wanted]
            shape = shape_of(dataset[0] if len(dataset) else dict.fromkeys(dataset.column_names))
            if shape is None:
                raise UserError(
                    f"--dataset_name {name}: no `text`, `prompt`/`completion`, `messages` or "
                    "`chosen`/`rejected` column "
                    f"(it has: {', '.join(dataset.column_names)})."
                )
            columns = list(FEATURES[shape])
            if shape not in ("text", "completion"):  # checked as files' records, stored alike
                where = f"--dataset_name {name}: {wanted} row"
                dataset = dataset.map(
                    lambda row, at, where=where, shape=shape: checked(dict(row), f"{where} {at + 1}", shape),
                    with_indices=True, remove_columns=dataset.column_names,
                )  # fmt: skip
            if shape == "text":  # an empty row (a third of wikitext's) is no document
                dataset = dataset.filter(lambda rows: [bool(t) for t in rows["text"]], batched=True)
                dataset = dataset.map(lambda _: {"start": True, "end": True})
            splits[split] = dataset.select_columns(columns).cast(FEATURES[shape])
    if "train" not in splits:
        raise UserError(f"--dataset_name {name}: has no train split (it has: {', '.join(loaded)}).")
    return splits


def load_splits(data: DataArguments, tokenizer, model_args) -> dict[str, datasets.Dataset]:
    """The train and validation records, checked; shaped as FEATURES describes."""
    if data.dataset_name:
        return hub_splits(data, model_args)
    rule = cut_rule(tokenizer)
    files = {
        "train": ("--train_file", data.train_file),
        "validation": ("--validation_file", data.validation_file),
    }
    return {
        split: read_split(flag, path, data, rule) for split, (flag, path) in files.items() if path
    }


# ---------------------------------------------------------------- tokens


def special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text of its own accord (BOS for Llama)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for at in range(len(full) - len(bare) + 1):
        if full[at : at + len(bare)] == bare:
            return full[:at], full[at + len(bare) :]
    return [], []


def chat_template(tokenizer, data: DataArguments) -> str:
    if data.chat_template:
        path = Path(data.chat_template)
        if not path.is_file():
            raise UserError(f"--chat_template {path}: no such file; give a Jinja template file.")
        return path.read_text(encoding="utf-8")
    return tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE.read_text(encoding="utf-8")


def tokenize(
    splits: dict[str, datasets.Dataset], tokenizer, data: DataArguments, block_size: int, training
) -> dict[str, datasets.Dataset]:
    """Records to training rows: blocks of the running text, or one example per record with
    labels -100 wherever the loss should not fall (prompts, user turns, padding)."""
    # The tokenizer's own length limit means nothing here: long texts are cut into blocks later.
    # A copy, because the Trainer saves the caller's and user code relies on that limit.
    tokenizer = copy.copy(tokenizer)
    tokenizer.model_max_length = int(1e30)
    eos = tokenizer.eos_token_id
    rule = cut_rule(tokenizer)
    before, after = special_ends(tokenizer)
    closing = after if after[-1:] == [eos] else [*after, eos]
    # HF's script adds nothing to a dataset's rows, which are often lines of one document.
    text_end = after if data.dataset_name and not data.eos_between_rows else closing
    template = chat_template(tokenizer, data)
    chat = any("messages" in split.column_names for split in splits.values())
    form = chats.chat_format(tokenizer, template) if chat else None
    if form and form.fold_system:
        say(PROG, "the chat template has no system role: a system message opens the first user turn instead, as the family's documentation advises.")  # fmt: skip

    backend = getattr(tokenizer, "backend_tokenizer", None)

    def ids(texts: list[str]) -> list[list[int]]:
        if backend is None:  # a Python tokenizer (--use_fast_tokenizer False)
            return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        # The same ids as calling the tokenizer, without the character offsets it also computes.
        return [
            encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)
        ]

    def encode_text(batch: dict) -> dict:
        cut, owners = [], []
        for row, text in enumerate(batch["text"]):
            for piece in pieces(text, rule):
                cut.append(piece)
                owners.append(row)
        rows: list[list[np.ndarray]] = [[] for _ in batch["text"]]
        for first in range(0, len(cut), PIECES_PER_CALL):
            chunk = slice(first, first + PIECES_PER_CALL)
            for owner, piece_ids in zip(owners[chunk], ids(cut[chunk]), strict=True):
                rows[owner].append(np.asarray(piece_ids, dtype=np.int32))
        out = []
        for parts, start, end in zip(rows, batch["start"], batch["end"], strict=True):
            head = np.asarray(before if start else [], dtype=np.int32)
            tail = np.asarray(text_end if end else [], dtype=np.int32)
            out.append(np.concatenate([head, *parts, tail]))
        return {"input_ids": out}

    def encode_example(record: dict, at: int) -> dict:
        if "messages" in record:
            tools = json.loads(record["tools"]) or None
            try:
                tokens, trained = chats.encode(
                    tokenizer, form, json.loads(record["messages"]), tools
                )
            except TemplateError as error:
                raise UserError(
                    f"record {at + 1}: the chat template refuses it: {error.message}"
                ) from None
            if not data.assistant_only_loss:
                trained = [True] * len(tokens)
            # A template without the BOS text still gets the BOS the tokenizer puts first.
            bos = tokenizer.bos_token_id
            head = before if not (bos is not None and tokens[:1] == [bos]) else []
            input_ids = [*head, *tokens]
            labels = [-100] * len(head) + [
                t if on else -100 for t, on in zip(tokens, trained, strict=True)
            ]
            return cut_example(input_ids, labels)
        if "prompt" in record:
            segments = [(record["prompt"], False), (record["completion"], True)]
            only, head, tail = data.completion_only_loss, before, closing
        else:
            segments, only, head, tail = [(record["text"], True)], False, before, closing
        input_ids, labels = list(head), list(head) if not only else [-100] * len(head)
        for text, trained in segments:
            part = ids([text])[0] if text else []
            input_ids += part
            labels += part if trained or not only else [-100] * len(part)
        return cut_example(input_ids + tail, labels + tail)

    def cut_example(input_ids: list[int], labels: list[int]) -> dict:
        lost = any(label != -100 for label in labels[block_size:])
        return {"input_ids": input_ids[:block_size], "labels": labels[:block_size], "lost": lost}

    carry = [np.empty(0, dtype=np.int32)]  # the tokens of one batch that start the next block

    def group(table: pa.Table) -> dict:
        # Batches come in order, so carrying the tail over cuts the whole stream as one, while
        # memory stays that of a batch: only the stream's last partial block is dropped.
        ids = table.column("input_ids").combine_chunks().flatten().to_numpy()
        stream = np.concatenate([carry[0], ids])
        usable = len(stream) - len(stream) % block_size
        carry[0] = stream[usable:]
        blocks = stream[:usable].reshape(-1, block_size)
        return {"input_ids": blocks, "labels": blocks}

    code = Hasher.hash([inspect.getsource(f) for f in (pieces, next_cut, tokenize, chats)])
    # Everything the ids depend on: the tokenizer's JSON, and what tokenizer_config.json adds to
    # it (the end-of-text and BOS tokens put around texts and looked for in chats).
    settings = (
        tokenizer_identity(tokenizer),
        before,
        closing,
        text_end,
        tokenizer.bos_token,
        code,
        block_size,
        data.examples,
        template,
        data.completion_only_loss,
        data.assistant_only_loss,
    )
    done = {}
    for split, dataset in splits.items():
        options = {
            "load_from_cache_file": not data.overwrite_cache,
            "num_proc": data.preprocessing_num_workers,
        }
        fingerprint = Hasher.hash((dataset._fingerprint, settings))
        if data.examples or "text" not in dataset.column_names:
            try:
                rows = dataset.map(
                    encode_example,
                    with_indices=True,
                    remove_columns=dataset.column_names,
                    new_fingerprint=fingerprint,
                    desc="Tokenizing examples",
                    **options,
                )
            except UserError as error:
                raise UserError(f"{source(split, data)}: {error}") from None
            kept = rows.filter(lambda row: any(label != -100 for label in row["labels"][1:]))
            lost = sum(rows["lost"])
            if not len(kept):
                raise UserError(
                    f"{source(split, data)}: all {len(rows)} examples lose what they train past "
                    f"--block_size {block_size}; raise --block_size or shorten the examples."
                )
            if lost:
                say(
                    PROG,
                    f"{split}: {lost} of {len(rows)} example(s) lose trained tokens past --block_size "
                    f"{block_size}; {len(rows) - len(kept)} kept nothing to train and were dropped.",
                )
            done[split] = kept.remove_columns("lost")
            continue
        encoded = dataset.map(
            encode_text,
            batched=True,
            batch_size=64,
            remove_columns=dataset.column_names,
            new_fingerprint=fingerprint,
            desc="Tokenizing",
            **options,
        )
        check_enough_tokens(split, encoded, data, block_size)
        carry[0] = np.empty(0, dtype=np.int32)
        done[split] = (
            encoded.with_format("arrow")
            .map(
                group,
                batched=True,
                batch_size=256,
                load_from_cache_file=not data.overwrite_cache,
                new_fingerprint=Hasher.hash((encoded._fingerprint, settings)),
                desc=f"Grouping into blocks of {block_size}",
            )
            .with_format(None)
        )
    return done


def tokenizer_identity(tokenizer) -> str:
    """A hash of the tokenizer for the datasets cache. Hashing its JSON takes milliseconds;
    letting `datasets` pickle the tokenizer takes about a second on every run."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    # split_special_tokens lives outside the backend's JSON but changes the ids.
    text = f"{backend.to_str()} {tokenizers.__version__} {getattr(tokenizer, 'split_special_tokens', False)}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_enough_tokens(
    split: str, ids: datasets.Dataset, data: DataArguments, block_size: int
) -> None:
    count = int(pc.sum(pc.list_value_length(ids.data.column("input_ids"))).as_py() or 0)
    if count < block_size:
        fitting = 1 << max(0, count.bit_length() - 1)
        raise UserError(
            f"{source(split, data)}: {count} tokens, fewer than one block of {block_size}; "
            f"add text or pass --block_size {fitting}."
        )


def source(split: str, data: DataArguments) -> str:
    """Where a split's records come from, as the user named it."""
    if data.dataset_name:
        return f"--dataset_name {data.dataset_name}"
    return {
        "train": f"--train_file {data.train_file}",
        "validation": f"--validation_file {data.validation_file}",
    }[split]


def model_positions(config) -> int:
    """How many tokens the model can attend to, whatever its config calls that."""
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


def pick_block_size(requested: int | None, model_positions: int) -> int:
    """--block_size, or the model's context up to 1024; never more than the model can attend to."""
    if requested is None:
        return min(1024, model_positions)
    if requested < 1:
        raise UserError(f"--block_size {requested}: must be a positive number of tokens.")
    if requested > model_positions:
        say(
            PROG,
            f"warning: --block_size {requested} exceeds the model's {model_positions} positions; "
            f"using {model_positions}.",
        )
        return model_positions
    return requested


def split_for_eval(sets: dict[str, datasets.Dataset], data: DataArguments, seed: int) -> dict:
    if "validation" in sets:
        return sets
    train = sets["train"]
    if len(train) < 2:
        raise UserError(
            f"--train_file {data.train_file}: only {len(train)} block, too few to hold some out for "
            "--do_eval; pass --validation_file or a smaller --block_size."
        )
    held_out = max(1, len(train) * data.validation_split_percentage // 100)
    parts = train.train_test_split(test_size=held_out, seed=seed)
    return {"train": parts["train"], "validation": parts["test"]}


class PadToLongest:
    """Batches of examples: right-padded, with padding masked out of the loss and attention."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            gap = width - len(row["input_ids"])
            batch["input_ids"].append(list(row["input_ids"]) + [self.pad_id] * gap)
            batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * gap)
            batch["labels"].append(list(row["labels"]) + [-100] * gap)
        return {key: torch.tensor(value) for key, value in batch.items()}


def supports_packing(model) -> bool:
    """Whether padding-free packing keeps examples apart in this model: the second of two
    examples packed in one row must give the logits it gives alone. Attention that reads the
    boundaries from position_ids does (flash attention, transformers' mask builder); some
    kernels (GPT-Neo's sdpa) and architectures (Mamba) do not."""
    weights = next(model.parameters())
    if weights.numel() == 0:  # partitioned by ZeRO-3: no weights here to check with
        return False
    ids = torch.arange(3, 11, device=weights.device)[None] % model.config.vocab_size
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=weights.device)
    training = model.training
    model.eval()  # dropout would make the two differ anyway
    with torch.no_grad():
        together = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 5:]
        alone = model(input_ids=ids[:, 5:], use_cache=False).logits[0]
    model.train(training)
    scale = alone.float().abs().max().item()
    return (together.float() - alone.float()).abs().max().item() <= 0.02 * scale + 1e-4


def show_examples(rows: datasets.Dataset, tokenizer, count: int) -> None:
    """The first `count` rows as text, each trained stretch between [[ and ]]."""
    for number, row in enumerate(rows.select(range(min(count, len(rows)))), start=1):
        pieces, run, trained = [], [], False
        for token, label in [*zip(row["input_ids"], row["labels"], strict=True), (None, None)]:
            if token is None or (label != -100) != trained:
                text = tokenizer.decode(run)
                pieces.append(f"[[{text}]]" if trained and run else text)
                run, trained = [], label != -100
            run.append(token)
        print(f"--- example {number} ({len(row['input_ids'])} tokens) ---\n{''.join(pieces)}")
