"""Fine-tune a causal language model (GPT2-XL, GPT-Neo, ...) on your text with the HF Trainer.

Launch it the way the guide does, through DeepSpeed:

    deepspeed --num_gpus=1 run_clm.py --deepspeed ds_config.json --model_name_or_path gpt2-xl \
        --train_file train.csv --validation_file validation.csv --do_train --do_eval --fp16 \
        --output_dir finetuned ...

Top to bottom: parse flags, read and tokenize the data, load the model, train with
checkpoints that survive preemption, write a normal model directory plus metrics.
"""

import hashlib
import inspect
import json
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import tokenizers
import torch
import transformers
from datasets.fingerprint import Hasher
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

PROG = "run_clm.py"
# A checkpoint directory counts as resumable only once this file exists in it (written last).
COMPLETE_MARKER = "checkpoint-complete"
FINAL_MARKER = "all_results.json"
EXTENSIONS = {".csv": "csv", ".txt": "text", ".json": "json", ".jsonl": "json"}


class UserError(Exception):
    """Bad input: reported as one line naming the input and the fix, never as a traceback."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "Model to fine-tune: a hub name (gpt2-xl, EleutherAI/gpt-neo-2.7B) or a local model folder."
        }
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use, if not the one saved with the model."}
    )
    use_fast_tokenizer: bool = field(
        default=True,
        metadata={
            "help": "Use the Rust tokenizer; `--use_fast_tokenizer False` picks the Python one."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run Python code shipped in a model repository. Off unless you trust the repository."
        },
    )


@dataclass
class DataArguments:
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: .csv with a `text` column, .txt, or .json/.jsonl with `text`."
        },
    )
    validation_file: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation data, same formats. Without it, --do_eval holds out part of the train file."
        },
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={
            "help": "Percent of training blocks held out for eval when no --validation_file is given."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per training example. Default and maximum: the model's context (1024 for GPT-2)."
        },
    )
    separate_examples: bool = field(
        default=False,
        metadata={
            "help": "Treat each CSV row, .txt paragraph or JSON record as its own example (truncated, padded) "
            "instead of concatenating all text into blocks."
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Tokenize again instead of reusing the datasets cache."}
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for tokenizing. Default: one per CPU core, at most 8."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only this many training blocks (for quick runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only this many evaluation blocks (for quick runs)."}
    )


@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start from scratch even if --output_dir holds checkpoints or a finished model."
        },
    )
    max_nonfinite_steps: int = field(
        default=20,
        metadata={
            "help": "Stop when the loss is NaN or infinite this many micro-steps in a row (0: never)."
        },
    )
    evaluation_strategy: str | None = field(
        default=None,
        metadata={
            "help": "Old name of --eval_strategy (removed from transformers), kept for the guide."
        },
    )


def fail(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if is_main_process():
        print(f"[{PROG}] {message}", flush=True)


# ---------------------------------------------------------------- arguments


def parse_args(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, RunArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, RunArguments, TrainingArguments))
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (see `python {PROG} --help`)")
    values = vars(namespace)

    old_eval_strategy = values.pop("evaluation_strategy")
    if old_eval_strategy is not None:
        values["eval_strategy"] = old_eval_strategy
    # The guide's whole point: recompute activations instead of storing them, unless told otherwise.
    if values["activation_checkpointing"] is None and values["gradient_checkpointing"] is None:
        values["activation_checkpointing"] = True
    if values["fp16"] and values["bf16"]:
        fail(
            "--fp16 and --bf16 both given; pick one (--bf16 on Ampere or newer GPUs, --fp16 on older ones)."
        )
    if not torch.cuda.is_available():
        if values["fp16"]:
            say("warning: --fp16 needs a CUDA GPU and none is here; training in fp32 instead.")
            values["fp16"] = False
        # Tells the Trainer the ranks are CPU processes: without it bf16 is refused and a
        # several-rank run miscounts the world size.
        values["use_cpu"] = True
    if values["deepspeed"]:
        check_deepspeed_config(values["deepspeed"])

    built = []
    for dtype in (ModelArguments, DataArguments, RunArguments, TrainingArguments):
        kwargs = {f.name: values[f.name] for f in fields(dtype) if f.init and f.name in values}
        try:
            built.append(dtype(**kwargs))
        except ValueError as error:
            fail(str(error).splitlines()[0])
    return tuple(built)


def check_deepspeed_config(path: str) -> None:
    if path.lstrip().startswith("{"):
        return
    config = Path(path)
    if not config.is_file():
        fail(
            f"--deepspeed {path}: no such file; use ds_config.json (GPT2-XL) or ds_config_gptneo.json (GPT-Neo)."
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        fail(
            f"--deepspeed {path}: not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}."
        )
    except UnicodeDecodeError:
        fail(f"--deepspeed {path}: not a UTF-8 text file; point it at a DeepSpeed JSON config.")


# ---------------------------------------------------------------- data


def check_data_file(flag: str, path: str) -> str:
    """The datasets builder name for `path`, after checking the file is there and readable."""
    file = Path(path)
    if file.suffix.lower() not in EXTENSIONS:
        raise UserError(
            f"{flag} {path}: unsupported file type; use .csv (column `text`), .txt or .json/.jsonl."
        )
    if not file.is_file():
        raise UserError(f"{flag} {path}: no such file.")
    try:
        head = file.read_bytes()
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot read it ({error.strerror}).") from None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(
            f"{flag} {path}: not UTF-8 (bad byte at offset {error.start}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8`, or run text2csv.py with --encoding."
        ) from None
    if not text.strip():
        raise UserError(f"{flag} {path}: the file is empty; put your training text in it.")
    return EXTENSIONS[file.suffix.lower()]


def load_texts(data: DataArguments) -> datasets.DatasetDict:
    """Read the train/validation files into a DatasetDict with one column, `text`."""
    files = {"train": data.train_file, "validation": data.validation_file}
    flags = {"train": "--train_file", "validation": "--validation_file"}
    splits = {}
    for split, path in files.items():
        if path is None:
            continue
        builder = check_data_file(flags[split], path)
        options = {}
        if builder == "text":
            # One .txt file is one document, byte for byte; a paragraph each in separate-examples mode.
            options["sample_by"] = "paragraph" if data.separate_examples else "document"
        if builder == "csv":
            # pandas would turn a line that reads "NA" or "null" into a missing value.
            options["keep_default_na"] = False
        try:
            dataset = datasets.load_dataset(
                builder, data_files={split: path}, split=split, **options
            )
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            raise UserError(
                f"{flags[split]} {path}: could not be parsed as {builder} ({error})."
            ) from None
        if "text" not in dataset.column_names:
            raise UserError(
                f"{flags[split]} {path}: no `text` column (it has: {', '.join(dataset.column_names)}); "
                "rename the column to `text` or make the file with text2csv.py."
            )
        dataset = dataset.select_columns(["text"])
        if dataset.features["text"] != datasets.Value("string"):
            # A column of numbers is still text to us.
            dataset = dataset.cast_column("text", datasets.Value("string"))
        dataset = dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))
        if len(dataset) == 0:
            raise UserError(f"{flags[split]} {path}: holds no text; put your training text in it.")
        splits[split] = dataset
    return datasets.DatasetDict(splits)


def pick_block_size(requested: int | None, model_positions: int) -> int:
    if requested is None:
        return min(1024, model_positions)
    if requested < 1:
        raise UserError(f"--block_size {requested}: must be a positive number of tokens.")
    if requested > model_positions:
        say(
            f"warning: --block_size {requested} exceeds the model's {model_positions} positions; using {model_positions}."
        )
        return model_positions
    return requested


# GPT-2's byte-level BPE never merges across a line break that has text on both sides, so a long
# document can be encoded as a batch of such line-aligned pieces: the same tokens, spread by the
# Rust tokenizer over every core instead of one. Pieces this long make the per-piece cost nil.
PIECE_CHARS = 1 << 16
PIECES_PER_CALL = 64


def line_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just after a newline that has a
    non-space character on both sides (GPT-2's pre-tokenizer ends a token on both sides of it)."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = text.find("\n", start + size)
        while cut != -1 and (
            text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()
        ):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> tuple[str, bool]:
    """A hash of the tokenizer for the datasets cache, and whether line_pieces() is exact for it.

    Hashing the tokenizer's JSON takes milliseconds; letting `datasets` pickle the tokenizer to
    hash the map function takes about a second on every run, whatever the data size.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer), False
    pre = json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer else {}
    # An added token that swallows the space before it, or holds a newline, could span a cut.
    added = tokenizer.added_tokens_decoder.values()
    exact = (
        backend.normalizer is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex") is True
        and pre.get("add_prefix_space") is False
        and not any(token.lstrip or "\n" in token.content for token in added)
    )
    # split_special_tokens lives outside the backend's JSON but changes the ids.
    settings = f"{tokenizers.__version__} {getattr(tokenizer, 'split_special_tokens', False)}"
    text = backend.to_str() + settings
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], exact


def tokenize(
    texts: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    data: DataArguments,
    block_size: int,
    training: TrainingArguments,
) -> datasets.DatasetDict:
    """Text to training examples: concatenated and cut into blocks, or one padded example per row."""
    workers = data.preprocessing_num_workers or min(8, os.cpu_count() or 1)
    eos = tokenizer.eos_token_id
    identity, exact_pieces = tokenizer_identity(tokenizer)

    def encode(batch: dict) -> dict:
        pieces, owners = [], []
        for row, text in enumerate(batch["text"]):
            for piece in line_pieces(text) if exact_pieces else [text]:
                pieces.append(piece)
                owners.append(row)
        rows: list[list[np.ndarray]] = [[] for _ in batch["text"]]
        # A few MB per call keeps every core busy and the Python lists of ids small.
        for first in range(0, len(pieces), PIECES_PER_CALL):
            chunk = slice(first, first + PIECES_PER_CALL)
            encoded = tokenizer(pieces[chunk], add_special_tokens=False)["input_ids"]
            for owner, ids in zip(owners[chunk], encoded, strict=True):
                rows[owner].append(np.asarray(ids, dtype=np.int32))
        # An end-of-text token closes every document so the model learns where one ends. NumPy
        # rows spare `datasets` a type check of every element of a Python list.
        end = np.array([eos], dtype=np.int32)
        return {"input_ids": [np.concatenate([*parts, end]) for parts in rows]}

    def group(table: pa.Table) -> dict:
        stream = table.column("input_ids").combine_chunks().flatten().to_numpy()
        usable = len(stream) - len(stream) % block_size
        blocks = stream[:usable].reshape(-1, block_size)
        # Writing to Arrow copies each column, so the two may share one array.
        return {"input_ids": blocks, "labels": blocks}

    def truncate(table: pa.Table) -> dict:
        rows = [row[:block_size] for row in table.column("input_ids").to_pylist()]
        return {
            "input_ids": rows,
            "labels": rows,
            "attention_mask": [[1] * len(row) for row in rows],
        }

    # The tokenizer's own length limit is meaningless here: long documents are cut into blocks later.
    tokenizer.model_max_length = int(1e30)
    # Cache keys made here, not by hashing the functions: the code, the tokenizer, the settings.
    version = Hasher.hash([inspect.getsource(code) for code in (line_pieces, tokenize)])
    shape = f"separate-{block_size}" if data.separate_examples else f"blocks-{block_size}"
    shaped = {}
    with training.main_process_first(desc="tokenizing"):
        for split, dataset in texts.items():
            rows = len(dataset)
            ids = dataset.map(
                encode,
                batched=True,
                batch_size=256,
                # Worker processes pay off only with many rows; one long row already uses every
                # core through its pieces.
                num_proc=workers if workers > 1 and rows >= 4 * workers else None,
                remove_columns=["text"],
                load_from_cache_file=not data.overwrite_cache,
                new_fingerprint=Hasher.hash((dataset._fingerprint, identity, eos, version)),
                desc="Tokenizing",
            )
            check_enough_tokens(split, ids, data, block_size)
            # One call over the whole split, so no tokens are dropped between map batches.
            shaped[split] = ids.with_format("arrow").map(
                truncate if data.separate_examples else group,
                batched=True,
                batch_size=None,
                load_from_cache_file=not data.overwrite_cache,
                new_fingerprint=Hasher.hash((ids._fingerprint, version, shape)),
                desc="Separate examples"
                if data.separate_examples
                else f"Grouping into blocks of {block_size}",
            )
    return datasets.DatasetDict(shaped).with_format(None)


def check_enough_tokens(
    split: str, ids: datasets.Dataset, data: DataArguments, block_size: int
) -> None:
    if data.separate_examples:
        return
    count = int(pc.sum(pc.list_value_length(ids.data.column("input_ids"))).as_py() or 0)
    if count < block_size:
        fitting = 1 << (count.bit_length() - 1)
        flag, path = {
            "train": ("--train_file", data.train_file),
            "validation": ("--validation_file", data.validation_file),
        }[split]
        raise UserError(
            f"{flag} {path}: {count} tokens, fewer than one block of {block_size}; "
            f"add text or pass --block_size {fitting}."
        )


def split_for_eval(
    blocks: datasets.DatasetDict, data: DataArguments, seed: int
) -> datasets.DatasetDict:
    if "validation" in blocks:
        return blocks
    train = blocks["train"]
    if len(train) < 2:
        raise UserError(
            f"--train_file {data.train_file}: only {len(train)} block, too few to hold some out for --do_eval; "
            "pass --validation_file or a smaller --block_size."
        )
    held_out = max(1, len(train) * data.validation_split_percentage // 100)
    parts = train.train_test_split(test_size=held_out, seed=seed)
    return datasets.DatasetDict({"train": parts["train"], "validation": parts["test"]})


class PadToLongest:
    """Batches of separate examples: right-padded, with padding masked out of loss and attention."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for row in rows:
            gap = width - len(row["input_ids"])
            batch["input_ids"].append(row["input_ids"] + [self.pad_id] * gap)
            batch["attention_mask"].append(row["attention_mask"] + [0] * gap)
            batch["labels"].append(row["labels"] + [-100] * gap)
        return {key: torch.tensor(value) for key, value in batch.items()}


# ---------------------------------------------------------------- model


def load_model(args: ModelArguments, training: TrainingArguments):
    source = args.model_name_or_path
    local = Path(source)
    if local.is_dir() and not (local / "config.json").is_file():
        raise UserError(
            f"--model_name_or_path {source}: folder has no config.json; point it at a saved model folder "
            "(or a hub name such as gpt2-xl)."
        )
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise UserError(f"--model_name_or_path {source}: no such folder.")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer_name or source,
            use_fast=args.use_fast_tokenizer,
            trust_remote_code=args.trust_remote_code,
        )
    except OSError as error:
        raise UserError(
            f"--model_name_or_path {source}: cannot load it ({str(error).splitlines()[0]})."
        ) from None
    except ValueError as error:
        raise UserError(f"--model_name_or_path {source}: {str(error).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, trust_remote_code=args.trust_remote_code
        )
    except ValueError as error:
        raise UserError(
            f"--model_name_or_path {source}: not a causal language model ({config.model_type}); "
            "use a GPT-2, GPT-Neo or other causal LM."
        ) from error
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model_name_or_path {source}: the tokenizer has no end-of-text token.")
    # Recomputed activations and a KV cache do not mix; training never needs the cache.
    model.config.use_cache = False
    return model, tokenizer


def model_positions(config) -> int:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


# ---------------------------------------------------------------- checkpoints


def checkpoints_in(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest step first."""
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def seal(checkpoint: Path) -> None:
    """Mark a checkpoint complete once every file in it is on disk, so a power cut cannot fake one."""
    for path in sorted(checkpoint.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(checkpoint)
    scratch = checkpoint / f".{COMPLETE_MARKER}.tmp"
    scratch.write_text(
        "every file of this checkpoint was on disk when this was written\n", encoding="utf-8"
    )
    fsync_path(scratch)
    os.replace(scratch, checkpoint / COMPLETE_MARKER)
    fsync_path(checkpoint)


def prune(output_dir: Path, keep: int | None, protect: Path | None) -> None:
    """Drop the oldest complete checkpoints beyond --save_total_limit, never the newest one."""
    if not keep or keep <= 0:
        return
    complete = [c for c in checkpoints_in(output_dir) if is_complete(c)]
    for old in complete[: max(0, len(complete) - keep)]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


class SealingTrainer(Trainer):
    """A Trainer whose checkpoints are trusted for resuming only after every byte is on disk,
    and which refuses to go on training on a loss that stays NaN or infinite."""

    max_nonfinite_steps = 20
    nonfinite_in_a_row = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if bool(torch.isfinite(loss)):
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            if 0 < self.max_nonfinite_steps <= self.nonfinite_in_a_row:
                raise UserError(
                    f"the loss was NaN/inf for {self.nonfinite_in_a_row} steps in a row (step "
                    f"{self.state.global_step}); training on it would only ruin the model. Try --bf16 instead of "
                    "--fp16 (GPT-Neo overflows in fp16), a lower --learning_rate, or more --warmup_steps."
                )
        return loss

    def _save_checkpoint(self, model, trial) -> None:
        limit = self.args.save_total_limit
        # Rotation runs inside the parent; defer it so an older checkpoint survives until this one is sealed.
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            output_dir = Path(self.args.output_dir)
            checkpoint = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            seal(checkpoint)
            best = (
                Path(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None
            )
            prune(output_dir, limit, best)
        self.accelerator.wait_for_everyone()


class StopOnSignal(TrainerCallback):
    """SIGTERM (preemption) or Ctrl-C: finish the running step, checkpoint it, then stop."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._note)

    def _note(self, signum: int, _frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signum
        say(
            f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint."
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class ReportEngine(TrainerCallback):
    """Say which engine really trains, so a log shows ZeRO and the CPU optimizer are in use."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if getattr(args, "hf_deepspeed_config", None) is None or not is_main_process():
            return
        chain, layer = [], optimizer
        while layer is not None and len(chain) < 6:
            if type(layer).__name__ not in ("AcceleratedOptimizer", "DeepSpeedOptimizerWrapper"):
                chain.append(type(layer).__name__)
            layer = getattr(layer, "optimizer", None)
        zero = args.hf_deepspeed_config.config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none")
        say(
            f"DeepSpeed ZeRO stage {zero.get('stage', 0)}: {' over '.join(chain)}, "
            f"optimizer offloaded to {offload}"
        )


def resume_point(output_dir: Path, run: RunArguments, training: TrainingArguments) -> str | None:
    """The checkpoint to continue from, after clearing half-written ones; None to start fresh."""
    if training.resume_from_checkpoint:
        chosen = Path(training.resume_from_checkpoint)
        if not is_complete(chosen):
            raise UserError(
                f"--resume_from_checkpoint {chosen}: not a complete checkpoint (no {COMPLETE_MARKER} file); "
                "pick another checkpoint-N folder or drop the flag."
            )
        return str(chosen)
    if not output_dir.is_dir():
        return None
    found = checkpoints_in(output_dir)
    if run.overwrite_output_dir:
        if found:
            say(
                f"--overwrite_output_dir: deleting {len(found)} old checkpoint(s) in {output_dir}, starting fresh."
            )
        if is_main_process():
            for checkpoint in found:
                shutil.rmtree(checkpoint)
            # Without the old run's results, an interrupted fresh run resumes instead of being called finished.
            (output_dir / FINAL_MARKER).unlink(missing_ok=True)
        return None
    if (output_dir / FINAL_MARKER).is_file() and (output_dir / "config.json").is_file():
        raise UserError(
            f"--output_dir {output_dir}: already holds a finished model; pass --overwrite_output_dir to train "
            "it again from the start, or choose another --output_dir."
        )
    for checkpoint in found:
        if not is_complete(checkpoint) and is_main_process():
            say(f"removing {checkpoint}: it was being written when the last run stopped.")
            shutil.rmtree(checkpoint)
    complete = [c for c in found if is_complete(c)]
    if complete:
        say(f"resuming from {complete[-1]} (pass --overwrite_output_dir to start fresh).")
        return str(complete[-1])
    return None


def checkpoint_bytes(parameters: int, training: TrainingArguments, model_dtype_bytes: int) -> int:
    """Disk one checkpoint takes: HF weights, DeepSpeed's module copy, fp32 master weights and Adam moments."""
    weights = parameters * model_dtype_bytes
    if training.save_only_model:
        return weights
    optimizer = (
        parameters * 12
    )  # fp32 master weights + two Adam moments, whatever the compute precision
    module = parameters * (2 if (training.fp16 or training.bf16) else 4)
    return weights + module + optimizer


def check_disk(output_dir: Path, needed: int) -> None:
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(
            f"--output_dir {output_dir}: {free / 2**30:.1f} GiB free, one checkpoint needs about "
            f"{needed / 2**30:.1f} GiB; free space, point --output_dir at a bigger disk, "
            "or pass --save_only_model (no resumable optimizer state)."
        )


def wandb_offline_unless_logged_in(training: TrainingArguments) -> None:
    """`--report_to wandb` with no API key would crash at the first log: record offline instead."""
    if (
        "wandb" not in training.report_to
        or os.environ.get("WANDB_MODE")
        or os.environ.get("WANDB_API_KEY")
    ):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace"):
        return
    os.environ["WANDB_MODE"] = "offline"
    say(
        "wandb: no API key (run `wandb login` to log online); recording offline under ./wandb/. "
        "Upload it later with `wandb sync wandb/offline-run-*`."
    )


def plot_losses(log_history: list[dict], path: Path) -> None:
    """train and eval loss against step, so a finished run shows at a glance how it went."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")  # no screen on a training box
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(e["step"], e[key]) for e in log_history if key in e and math.isfinite(e[key])]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, label=label)
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title(path.parent.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


OOM_ADVICE = (
    "GPU out of memory: lower --per_device_train_batch_size and raise --gradient_accumulation_steps to keep "
    "the batch, set allgather_bucket_size/reduce_bucket_size to 5e7 in the DeepSpeed JSON, "
    "try ds_config_zero3.json, or check a setup first with will_it_fit.py."
)


def close_progress_bars(trainer: Trainer) -> None:
    """Close the progress bar now, or it redraws itself under the error message at exit."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


# ---------------------------------------------------------------- main


def train_and_evaluate(model_args, data, run, training) -> None:
    output_dir = Path(training.output_dir)
    wandb_offline_unless_logged_in(training)
    resume = resume_point(output_dir, run, training) if training.do_train else None

    if training.do_train and data.train_file is None:
        raise UserError(
            "--do_train needs --train_file (a .csv with a `text` column, a .txt or a .jsonl)."
        )
    if training.do_eval and data.train_file is None and data.validation_file is None:
        raise UserError("--do_eval needs --validation_file or --train_file.")
    # Data problems show up in seconds, before a multi-gigabyte model is loaded.
    texts = load_texts(data)
    model, tokenizer = load_model(model_args, training)
    block_size = pick_block_size(data.block_size, model_positions(model.config))
    if data.separate_examples and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    blocks = tokenize(texts, tokenizer, data, block_size, training)
    if training.do_eval:
        blocks = split_for_eval(blocks, data, training.seed)
    train_set = blocks.get("train")
    eval_set = blocks.get("validation") if training.do_eval else None
    if train_set is not None and data.max_train_samples:
        train_set = train_set.select(range(min(data.max_train_samples, len(train_set))))
    if eval_set is not None and data.max_eval_samples:
        eval_set = eval_set.select(range(min(data.max_eval_samples, len(eval_set))))

    # Under ZeRO-3 a partitioned parameter reports 0 elements; ds_numel is its real size.
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    if training.do_train:
        check_disk(output_dir, checkpoint_bytes(parameters, training, model.dtype.itemsize))
    say(
        f"model {model_args.model_name_or_path}: {parameters / 1e6:.1f}M parameters, block {block_size} tokens, "
        f"{len(train_set) if train_set is not None else 0} train / {len(eval_set) if eval_set is not None else 0} "
        "eval examples"
    )

    stopper = StopOnSignal()
    collator = (
        PadToLongest(tokenizer.pad_token_id) if data.separate_examples else default_data_collator
    )
    trainer = SealingTrainer(
        model=model,
        args=training,
        train_dataset=train_set if training.do_train else None,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[stopper, ReportEngine()],
    )

    trainer.max_nonfinite_steps = run.max_nonfinite_steps
    if training.do_train:
        try:
            result = trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError:
            close_progress_bars(trainer)
            raise UserError(f"{OOM_ADVICE} (at step {trainer.state.global_step})") from None
        except UserError:
            close_progress_bars(trainer)
            raise
        if stopper.received is not None:
            say(
                f"stopped by {signal.Signals(stopper.received).name} at step {trainer.state.global_step}; "
                "checkpoint saved. Run the same command again to resume."
            )
            sys.exit(128 + stopper.received)
        trainer.save_model()
        metrics = dict(result.metrics)
        metrics["train_samples"] = len(train_set)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()

    if training.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_set)
        metrics["perplexity"] = (
            math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
        )
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training.do_train and trainer.is_world_process_zero():
        plot_losses(trainer.state.log_history, output_dir / "loss.png")
        say(f"loss curve: {output_dir / 'loss.png'}")


def main(argv: list[str] | None = None) -> None:
    model_args, data, run, training = parse_args(sys.argv[1:] if argv is None else argv)
    transformers.utils.logging.set_verbosity_warning()
    try:
        train_and_evaluate(model_args, data, run, training)
    except UserError as error:
        fail(str(error))


if __name__ == "__main__":
    main()
