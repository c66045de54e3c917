"""Fine-tune a causal language model (GPT2-XL, GPT-Neo, Llama, Qwen, Mistral, ...) on your data.

The guide's way, through DeepSpeed (ZeRO-2, Adam offloaded to the CPU):

    deepspeed --num_gpus=1 run_clm.py --deepspeed ds_config.json --model_name_or_path gpt2-xl \
        --train_file train.csv --validation_file validation.csv --do_train --do_eval --fp16 ...

or a LoRA adapter on one GPU, merged into the saved model at the end:

    python run_clm.py --model_name_or_path Qwen/Qwen2.5-1.5B --use_peft --bf16 --train_file chats.jsonl ...

Top to bottom: parse and check the flags, read the data, load the model, train with checkpoints
that survive preemption, save a normal model folder and the metrics. The data side lives in
clm_data.py, checkpoints and the decisions all ranks share in checkpoints.py, DPO and KTO in
preference.py, what a run shows (held-out answers, the loss plot) in reports.py.
"""

import common  # first: it quiets what some libraries print when they are imported

# isort: split
import atexit
import difflib
import json
import logging
import math
import os
import signal
import socket
import sys
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorWithFlattening,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

import chats
import checkpoints
import clm_data
import deepspeed_json
import fused_loss
import preference
import reports
from checkpoints import GuardedTrainer
from common import UserError, arg, fail

PROG = "run_clm.py"
# accelerate warns that DeepSpeed's gradient accumulation differs from its own (which the Trainer
# keeps at 1 on purpose); accumulating 2 x 4 gives the same losses as 1 x 8, so it is noise here.
logging.getLogger("accelerate.accelerator").setLevel(logging.ERROR)
# peft 0.21 still reads transformers 5's deprecated `is_gradient_checkpointing`.
warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
# TRL 1.16's DPO/KTO switch checkpointing off for the reference pass by transformers 4's names.
warnings.filterwarnings(
    "ignore", "`gradient_checkpointing_(en|dis)able` is deprecated", FutureWarning
)
# On a CPU, accelerate sets the thread count itself and says so; nothing for a user to act on.
warnings.filterwarnings("ignore", "OMP_NUM_THREADS/MKL_NUM_THREADS unset", UserWarning)
# peft keeps grown embeddings with the adapter, as it should; run_clm.py says they grew.
warnings.filterwarnings("ignore", "Setting `save_embedding_layers` to `True`", UserWarning)
# DeepSpeed 0.19's ZeRO-3 calls collectives that torch 2.13 renamed: theirs to settle, not yours.
warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)


def say(message: str) -> None:
    common.say(PROG, message)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = arg(
        None, "Model to fine-tune: a hub name (gpt2-xl, Qwen/Qwen2.5-1.5B) or a local folder."
    )
    model_type: str | None = arg(
        None, "Train from scratch: a model type (gpt2, llama, ...) built from its default config."
    )
    config_overrides: str | None = arg(
        None, "With --model_type: config values to change, e.g. n_embd=10,n_head=2."
    )
    config_name: str | None = arg(None, "Config to use, if not the model's own.")
    tokenizer_name: str | None = arg(None, "Tokenizer to use, if not the one saved with the model.")
    cache_dir: str | None = arg(None, "Where downloaded models and datasets are kept.")
    model_revision: str = arg("main", "Branch, tag or commit of a hub model.")
    token: str | None = arg(None, "Hub token for private models (default: your saved login).")
    use_auth_token: bool = arg(False, "2021's name for using your saved hub login; see --token.")
    dtype: str = arg(
        "auto",
        "Precision to load the weights in: auto (as saved), bfloat16, float16 or float32 "
        "(2021: --torch_dtype).",
    )
    low_cpu_mem_usage: bool = arg(
        False, "Accepted for HF's script; transformers 5 always loads weights straight into place."
    )
    use_fast_tokenizer: bool = arg(
        True, "Use the Rust tokenizer; `--use_fast_tokenizer False` picks the Python one."
    )
    trust_remote_code: bool = arg(
        False, "Run Python code shipped in a model repository. Off unless you trust it."
    )


@dataclass
class LoraArguments:
    use_peft: bool = arg(
        False, "Train a LoRA adapter instead of every weight; it is merged into the saved model."
    )
    lora_r: int = arg(16, "LoRA rank.")
    lora_alpha: int = arg(32, "LoRA scaling: the update is alpha/r times the product.")
    lora_dropout: float = arg(0.05, "Dropout on the LoRA path.")
    lora_target_modules: list[str] | None = arg(
        None,
        "Layer names to adapt (e.g. q_proj v_proj); default: every linear layer of each block.",
    )
    load_in_4bit: bool = arg(
        False,
        "QLoRA: the base model in 4 bits (NF4, double quantization, bf16 compute). CUDA only.",
    )


@dataclass
class RunArguments:
    overwrite_output_dir: bool = arg(
        False, "Start from scratch even if --output_dir holds checkpoints or a finished model."
    )
    max_nonfinite_steps: int = arg(
        20, "Stop when the loss is NaN or infinite this many micro-steps in a row (0: never)."
    )
    eval_answers: int = arg(
        3, "At each evaluation, answer this many held-out prompts in the log (0: none)."
    )


ARGUMENTS = (
    ModelArguments, LoraArguments, clm_data.DataArguments, RunArguments,
    preference.PreferenceArguments, TrainingArguments,
)  # fmt: skip
# Old spellings people still paste, and today's names.
ALIASES = {
    "--evaluation_strategy": "--eval_strategy",
    "--max_val_samples": "--max_eval_samples",
    "--torch_dtype": "--dtype",
}

# ---------------------------------------------------------------- arguments, checked in one place


def parse_args(argv: list[str]):
    parser = HfArgumentParser(ARGUMENTS)
    if len(argv) == 1 and argv[0].endswith(".json"):  # HF's scripts take the flags as one file
        argv = json_argv(argv[0])
    argv = [
        ALIASES.get(arg.split("=")[0], arg.split("=")[0]) + arg[len(arg.split("=")[0]) :]
        for arg in argv
    ]
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [f"--{f.name}" for group in ARGUMENTS for f in fields(group)] + list(ALIASES)
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (see `python {PROG} --help`)"
        raise UserError(f"unrecognized argument {flag}{hint}")
    values = vars(namespace)
    given = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
    # The guide's whole point: recompute activations instead of storing them, unless told otherwise.
    if values["activation_checkpointing"] is None and values["gradient_checkpointing"] is None:
        values["activation_checkpointing"] = True
    # A NaN loss shows as NaN in the log; the guard below stops the run if it persists.
    if "--logging_nan_inf_filter" not in given:
        values["logging_nan_inf_filter"] = False
    if values["fp16"] and values["bf16"]:
        raise UserError(
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
        values["deepspeed"] = deepspeed_json.modern(values["deepspeed"], values, "--optim" in given)
    built = []
    for group in ARGUMENTS:
        kwargs = {f.name: values[f.name] for f in fields(group) if f.init and f.name in values}
        try:
            built.append(group(**kwargs))
        except ValueError as error:
            raise UserError(str(error).splitlines()[0]) from None
    # TRL's preference trainers start far lower than a supervised run (1e-6, not 5e-5).
    built[ARGUMENTS.index(preference.PreferenceArguments)].learning_rate_given = "--learning_rate" in given  # fmt: skip
    validate(*built)
    return tuple(built)


def json_argv(path: str) -> list[str]:
    """A JSON object of flags as the command line it stands for, checked like one."""
    try:
        flags = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read it ({str(error).splitlines()[0]}).") from None
    if not isinstance(flags, dict):
        raise UserError(
            f'{path}: write the flags as one JSON object, {{"output_dir": "out", ...}}.'
        )
    argv = []
    for key, value in flags.items():
        if value is not None:
            argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def validate(model_args, lora, data, run, _preference, training) -> None:
    """Every combination of flags that cannot work, refused before anything loads."""
    if not (model_args.model_name_or_path or model_args.model_type):
        raise UserError("--model_name_or_path is required (or --model_type to train from scratch).")
    if model_args.config_overrides and model_args.model_name_or_path:
        raise UserError(
            "--config_overrides builds a new model: use it with --model_type, not --model_name_or_path."
        )
    if model_args.model_type and not (model_args.model_name_or_path or model_args.tokenizer_name):
        raise UserError("--model_type trains from scratch and needs --tokenizer_name.")
    if model_args.model_type and not model_args.model_name_or_path and lora.use_peft:
        raise UserError(
            "--use_peft adapts a trained model: pass --model_name_or_path, not --model_type."
        )
    if model_args.use_auth_token:
        say(
            "warning: --use_auth_token is deprecated; your saved hub login is used (or pass --token)."
        )
        model_args.token = model_args.token or True
    if model_args.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {model_args.dtype}: use auto, bfloat16, float16 or float32.")
    if data.streaming:
        raise UserError(
            "--streaming is not supported: run_clm.py tokenizes the data once and caches it; drop the flag."
        )
    if training.do_train and not (data.train_file or data.dataset_name):
        raise UserError("--do_train needs --train_file (.txt, .csv or .jsonl) or --dataset_name.")
    if training.do_eval and not (data.train_file or data.validation_file or data.dataset_name):
        raise UserError("--do_eval needs --validation_file or --train_file.")
    if training.deepspeed and training.save_only_model:
        raise UserError(
            "--save_only_model with --deepspeed writes checkpoints a run cannot resume from (no "
            "optimizer states); drop --save_only_model."
        )
    optimizer = str(getattr(training.optim, "value", training.optim))
    bitsandbytes = (
        lora.load_in_4bit or "bnb" in optimizer or "8bit" in optimizer or "paged" in optimizer
    )
    if bitsandbytes and not torch.cuda.is_available():
        what = "--load_in_4bit" if lora.load_in_4bit else f"--optim {optimizer}"
        raise UserError(
            f"{what} needs a CUDA GPU (bitsandbytes); none is here. Drop it to train on this machine."
        )
    if lora.load_in_4bit and not lora.use_peft:
        raise UserError("--load_in_4bit trains a LoRA adapter on a 4-bit model: add --use_peft.")
    if lora.load_in_4bit and training.deepspeed:
        raise UserError(
            "--load_in_4bit with --deepspeed: QLoRA runs on one GPU without DeepSpeed; drop --deepspeed "
            "and launch with `python run_clm.py`."
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------- the model


def hub_options(args: ModelArguments) -> dict:
    return {
        "cache_dir": args.cache_dir,
        "revision": args.model_revision,
        "token": args.token,
        "trust_remote_code": args.trust_remote_code,
    }


def check_model_source(source: str, flag: str) -> None:
    local = Path(source)
    if (
        local.is_dir()
        and not (local / "config.json").is_file()
        and not (local / "tokenizer_config.json").is_file()
    ):
        raise UserError(
            f"{flag} {source}: folder has no config.json; point it at a saved model folder "
            "(or a hub name such as gpt2-xl)."
        )
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise UserError(f"{flag} {source}: no such folder.")


def load_tokenizer(args: ModelArguments):
    source = args.tokenizer_name or args.model_name_or_path
    flag = "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path"
    check_model_source(source, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, use_fast=args.use_fast_tokenizer, **hub_options(args)
        )
    except (OSError, ValueError) as error:
        raise UserError(
            f"{flag} {source}: cannot load its tokenizer ({str(error).splitlines()[0]})."
        ) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{flag} {source}: the tokenizer has no end-of-text token.")
    return tokenizer


def load_config(args: ModelArguments, tokenizer):
    """The model's config: read (a few KB), or for --model_type built with the overrides."""
    source = args.model_name_or_path
    if source is not None:
        check_model_source(source, "--model_name_or_path")
        try:
            config = AutoConfig.from_pretrained(args.config_name or source, **hub_options(args))
        except (OSError, ValueError) as error:
            raise UserError(
                f"--model_name_or_path {source}: cannot load it ({str(error).splitlines()[0]})."
            ) from None
        custom = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not custom:
            raise UserError(
                f"--model_name_or_path {source}: not a causal language model ({config.model_type}); "
                "use GPT-2, GPT-Neo, Llama, Qwen, Mistral, Gemma, Phi or another causal LM."
            )
        return config
    config = AutoConfig.for_model(args.model_type)
    if args.config_overrides:
        config.update_from_string(args.config_overrides)
    # A new model stops where its tokenizer's text ends, not at the config class's default.
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name) is not None:
            setattr(config, name, getattr(tokenizer, name))
    return config


def load_model(args: ModelArguments, lora: LoraArguments, training, tokenizer, config):
    source = args.model_name_or_path
    try:
        if source is None:
            say(
                f"training a new {args.model_type} from scratch: {config.to_json_string(use_diff=True)}"
            )
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=args.trust_remote_code
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                dtype=training_dtype(args, lora, training),
                quantization_config=quantization(lora),
                **hub_options(args),
            )
    except (OSError, ValueError) as error:  # not a causal LM was refused with the config
        raise UserError(
            f"--model_name_or_path {source}: cannot load it ({str(error).splitlines()[0]})."
        ) from None
    # A tokenizer with more ids than the model has embeddings (another family's, or added
    # tokens) would index past them: grow them, as HF's script does. vocab_size, because ZeRO-3
    # has already split the weights.
    if len(tokenizer) > model.config.get_text_config().vocab_size:
        say(
            f"the tokenizer has {len(tokenizer)} ids and the model "
            f"{model.config.get_text_config().vocab_size} embeddings: adding the missing ones."
        )
        model.resize_token_embeddings(len(tokenizer))
    # Recomputed activations and a KV cache do not mix; training never needs the cache.
    model.config.use_cache = False
    model.loss_type = "ForCausalLM"  # what transformers falls back to anyway, with a warning
    # The loss from chunks of the LM head over the trained positions, never every position's
    # fp32 logits (GPT2-XL's are 1.6 GB at the guide's batch); before peft wraps the forward.
    fused_loss.fuse_loss(model)
    if lora.use_peft:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if lora.load_in_4bit:
            model = prepare_model_for_kbit_training(model, training.activation_checkpointing)
        adapter = LoraConfig(
            r=lora.lora_r,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            target_modules=lora.lora_target_modules or "all-linear",
            # GPT-2's layers (Conv1D) hold their weights transposed; peft needs to be told.
            fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, adapter)
        except ValueError as error:
            raise UserError(f"--lora_target_modules: {str(error).splitlines()[0]}") from None
        trainable, total = model.get_nb_trainable_parameters()
        say(
            f"LoRA r={lora.lora_r} alpha={lora.lora_alpha}: {trainable:,} trainable parameters "
            f"of {total:,} ({100 * trainable / total:.2f}%)"
        )
    return model


def training_dtype(args: ModelArguments, lora: LoraArguments, training) -> str:
    """What the weights train in. A full fine-tune without DeepSpeed keeps them in fp32: the
    Trainer has no master copy, and an update under 1/256 of a 16-bit weight rounds away
    (--bf16/--fp16 still compute in 16 bits). DeepSpeed keeps its own fp32 copy; LoRA's adapter is fp32."""
    if lora.use_peft or training.deepspeed or not training.do_train:
        return args.dtype
    if args.dtype in ("bfloat16", "float16"):
        say(
            f"warning: --dtype {args.dtype} trains every weight in {args.dtype} with no fp32 copy, so "
            "small updates round away; drop --dtype to train in fp32 and save as the checkpoint was."
        )
        return args.dtype
    return "float32"


def saved_dtype(args: ModelArguments, config) -> torch.dtype:
    """--dtype, or under auto the dtype the checkpoint was saved in (a new model: fp32). Read
    from the config before the weights load: loading them in fp32 rewrites it."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    if args.model_name_or_path is None:
        return torch.float32
    dtype = getattr(torch, config.dtype) if isinstance(config.dtype, str) else config.dtype
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def quantization(lora: LoraArguments):
    if not lora.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def collator_for(model, tokenizer, data, examples: bool):
    if not examples:
        return default_data_collator
    if data.packing:
        if clm_data.supports_packing(model):
            return DataCollatorWithFlattening()
        say(
            f"--packing: {model.config.model_type}'s attention cannot keep packed examples apart; "
            "padding each batch instead."
        )
    return clm_data.PadToLongest(tokenizer.pad_token_id)


# ---------------------------------------------------------------- the end of a run


OOM_ADVICE = (
    "GPU out of memory: lower --per_device_train_batch_size and raise --gradient_accumulation_steps to keep "
    "the batch, set allgather_bucket_size/reduce_bucket_size to 5e7 in the DeepSpeed JSON, try "
    "ds_config_zero3.json or --use_peft, or check a setup first with will_it_fit.py."
)


def close_progress_bars(trainer: Trainer) -> None:
    """Close the progress bar now, or it redraws itself under the error message at exit."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def save_merged(model_args: ModelArguments, tokenizer, output_dir: Path, generation) -> None:
    """Merge the trained adapter into a fresh copy of the base model and save that (rank 0)."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # training is over: load the base whole, not split by ZeRO-3
    base = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=model_args.dtype, **hub_options(model_args)
    )
    if len(tokenizer) > base.config.get_text_config().vocab_size:  # peft saved the grown ones
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, output_dir / "adapter").merge_and_unload()
    merged.generation_config = generation  # the trained run's, with its stop tokens
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    say(f"LoRA adapter merged into {output_dir}; the adapter alone is in {output_dir / 'adapter'}")


# ---------------------------------------------------------------- main


def train_and_evaluate(model_args, lora, data, run, options, training) -> None:
    output_dir = Path(training.output_dir)
    if training.deepspeed and "RANK" not in os.environ:
        # `python run_clm.py --deepspeed ...`: one process and no launcher to say so, so
        # DeepSpeed would go looking for MPI. Tell it what a launcher would have.
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )  # fmt: skip
    if training.deepspeed:
        checkpoints.release_build_locks()  # before init_distributed: on CPUs it builds an op
        import deepspeed

        # Now, not when the Trainer starts: ZeRO-3 partitions the weights as they load, and
        # checks the batch against the world size it finds (1 before the ranks have met).
        deepspeed.init_distributed()
    reports.wandb_offline_unless_logged_in(training)
    plan, identity = checkpoints.ResumePlan(), checkpoints.run_identity(model_args, lora, data)
    if training.do_train:
        plan = checkpoints.resume_plan(
            output_dir, run.overwrite_output_dir, training.resume_from_checkpoint, identity
        )
    if plan.finished:  # a restart loop or a requeue that comes back after the end: all is well
        say(
            f"{output_dir} already holds this run's finished model; nothing to do. To train again, "
            "pass --overwrite_output_dir or choose another --output_dir."
        )
        return
    if plan.checkpoint:  # another number of GPUs? Before any weights load: converting takes memory
        checkpoints.reshape(training, Path(plan.checkpoint))

    # Data problems show up in seconds, before a multi-gigabyte model is loaded.
    tokenizer = load_tokenizer(model_args)
    with training.main_process_first(desc="reading data"):
        records = clm_data.load_splits(data, tokenizer, model_args)
    config = load_config(model_args, tokenizer)
    block_size = clm_data.pick_block_size(data.block_size, clm_data.model_positions(config))
    examples = data.examples or any("text" not in split.column_names for split in records.values())
    if examples and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tuning = preference.shape_of_sets(records)  # DPO or KTO records, or None
    if tuning:
        preference.check(tuning, options, data.packing)
    chat = any(
        "messages" in split.column_names or (tuning and split[0]["prompt"].startswith("["))
        for split in records.values()
    )
    if chat:  # saved with the model, so generation renders prompts the way training saw them
        tokenizer.chat_template = clm_data.chat_template(tokenizer, data)
    if tuning:  # TRL's trainers tokenize their records themselves
        sets = {split: preference.for_trl(rows) for split, rows in records.items()}
    else:
        with training.main_process_first(desc="tokenizing"):
            sets = clm_data.tokenize(records, tokenizer, data, block_size, training)
    if data.show_examples:  # before any weights load: a laptop can check a GPU run's data
        show = preference.show if tuning else clm_data.show_examples
        show(sets.get("train", sets.get("validation")), tokenizer, data.show_examples)
        return
    transformers.set_seed(training.seed)  # a new model's or adapter's first weights, as HF's
    keep = saved_dtype(model_args, config)
    model = load_model(model_args, lora, training, tokenizer, config)
    for settings in (model.config, model.generation_config):
        if settings.pad_token_id is None:  # else the Trainer aligns them, and says so
            settings.pad_token_id = tokenizer.pad_token_id
    if chat:
        chats.stop_at_turn_end(model.generation_config, tokenizer)
    if training.do_eval:
        sets = clm_data.split_for_eval(sets, data, training.seed)
    train_set = sets.get("train") if training.do_train else None
    eval_set = sets.get("validation") if training.do_eval else None
    if train_set is not None and data.max_train_samples:
        train_set = train_set.select(range(min(data.max_train_samples, len(train_set))))
    if eval_set is not None and data.max_eval_samples:
        eval_set = eval_set.select(range(min(data.max_eval_samples, len(eval_set))))

    checkpoints.check_shared_output_dir(output_dir, training)
    checkpoints.carry_out(plan)  # nothing is deleted before the data and the model are known good
    if training.do_train and plan.checkpoint is None and common.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.write_atomically(
            output_dir / checkpoints.RUN_FILE, json.dumps(identity, indent=1)
        )
    # Under ZeRO-3 a partitioned parameter reports 0 elements; ds_numel is its real size.
    if lora.use_peft:  # peft counts 4-bit weights at their real number, not their packed bytes
        trainable, parameters = model.get_nb_trainable_parameters()
    else:
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
        parameters, trainable = sum(n for n, _ in sizes), sum(n for n, grad in sizes if grad)
    if training.do_train:
        saved, width = (trainable, 4) if lora.use_peft else (parameters, model.dtype.itemsize)
        # Without checkpoints only the final weights are written.
        no_states = training.save_only_model or training.save_strategy == "no"
        deepspeed = bool(training.deepspeed) and training.save_strategy != "no"
        needed = checkpoints.checkpoint_bytes(
            saved, 0 if no_states else trainable, width, deepspeed
        )
        checkpoints.check_disk(output_dir, needed)
    say(
        f"model {model_args.model_name_or_path or model_args.model_type}: {parameters / 1e6:.1f}M parameters, "
        f"block {block_size} tokens, {len(train_set) if train_set is not None else 0} train / "
        f"{len(eval_set) if eval_set is not None else 0} eval {'examples' if examples else 'blocks'}"
    )
    if not (training.do_train or training.do_eval):
        say("nothing to do: pass --do_train and/or --do_eval.")
        return

    stopper, sealer = checkpoints.StopOnSignal(), checkpoints.Sealer(training.save_total_limit)
    training.save_total_limit = None  # the Sealer rotates, after sealing
    common_kwargs = {
        "train_dataset": train_set,
        "eval_dataset": eval_set,
        "processing_class": tokenizer,
        "callbacks": [stopper, sealer, reports.ReportEngine()],
    }
    if tuning:
        trainer = preference.trainer(tuning, model, training, options, block_size, **common_kwargs)
    else:
        trainer = GuardedTrainer(
            model=model,
            args=training,
            data_collator=collator_for(model, tokenizer, data, examples),
            **common_kwargs,
        )
    prompts = reports.held_out_prompts(eval_set, tokenizer, run.eval_answers)
    if prompts:
        trainer.add_callback(reports.ShowAnswers(prompts, tokenizer, trainer.callback_handler))
    trainer.guard = checkpoints.NonFiniteGuard(run.max_nonfinite_steps)
    trainer.add_callback(trainer.guard)

    results = {}
    if training.do_train:
        try:
            result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        except torch.OutOfMemoryError:
            close_progress_bars(trainer)
            raise UserError(f"{OOM_ADVICE} (at step {trainer.state.global_step})") from None
        except UserError:
            close_progress_bars(trainer)
            raise
        if stopper.reason:
            say(
                f"stopped at step {trainer.state.global_step}; checkpoint saved. Run the same "
                f"command again to resume. It was: {checkpoints.resume_command()}"
            )
            sys.exit(
                128
                + (
                    signal.SIGTERM
                    if stopper.reason == checkpoints.LAUNCHER_GONE
                    else stopper.reason
                )
            )
        keep = model.dtype if lora.use_peft or training.deepspeed else keep
        if keep != model.dtype:
            say(
                f"weights trained in {model.dtype}, saved in {keep} as the checkpoint was "
                "(--dtype float32 saves them as trained)."
            )
            model.to(keep)  # the eval below then measures what is saved
        trainer.save_model(str(output_dir / "adapter") if lora.use_peft else None)
        results = {**result.metrics, "train_samples": len(train_set)}
        trainer.log_metrics("train", results)
        trainer.save_metrics("train", results, combined=False)
        trainer.save_state()
        # A preference run's eval needs the reference: the adapter switched off, so not merged yet.
        if lora.use_peft and not training.deepspeed and not tuning:
            # The folder holds the adapter merged into the 16-bit base, which is not the model
            # that trained (QLoRA's was 4-bit): the eval below measures the merged one.
            if trainer.is_world_process_zero():
                save_merged(model_args, tokenizer, output_dir, model.generation_config)
            trainer.accelerator.wait_for_everyone()
            trainer.accelerator.free_memory()  # the trained model and its optimizer
            trainer.optimizer = trainer.lr_scheduler = model = None
            trainer.model = trainer.model_wrapped = AutoModelForCausalLM.from_pretrained(
                output_dir, dtype="auto"
            ).to(training.device)

    if training.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_set)
        if not tuning:  # a preference loss is no log-likelihood
            metrics["perplexity"] = (
                math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 700 else float("inf")
            )
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics, combined=False)
        results.update(metrics)

    if trainer.is_world_process_zero():
        if training.do_train and lora.use_peft and (training.deepspeed or tuning):
            save_merged(model_args, tokenizer, output_dir, model.generation_config)
        if training.do_train:
            reports.plot_losses(trainer.state.log_history, output_dir / "loss.png")
            say(f"loss curve: {output_dir / 'loss.png'}")
        # Last: only now is the run finished, so a crash before this leaves it resumable.
        checkpoints.write_atomically(
            output_dir / checkpoints.FINAL_MARKER, json.dumps(results, indent=4)
        )
    # Every rank leaves together: one that exits while rank 0 still writes the model can abort in
    # its communication threads' teardown ("terminate called without an active exception").
    checkpoints.wait_for_everyone()
    if torch.distributed.is_initialized():
        ranks = torch.distributed.get_world_size()
        torch.distributed.destroy_process_group()
        if ranks > 1:
            # Still, one two-rank ZeRO-3 run out of some twenty aborted as a rank's interpreter
            # tore down (same message, exit status 250), everything written. Python's exit hooks
            # (wandb, logging) run; the C++ teardown, with nothing left to do, is skipped.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        transformers.utils.logging.set_verbosity_warning()
        train_and_evaluate(*args)
    except UserError as error:
        fail(PROG, str(error))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
