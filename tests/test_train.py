"""The guide's training commands, run for real through the deepspeed launcher on tiny models."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Tokenizer, GPTNeoForCausalLM

from launch import losses, readme_blocks, replace_flag, run, run_clm_plain, shell_commands, workdir
from tiny import REPO

ENGINE_LINE = "DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over DeepSpeedCPUAdam, optimizer offloaded to cpu"
# Appended to the guide's commands so a tiny model finishes in seconds: limits only, no other change.
LIMITS = ["--max_steps", "3", "--block_size", "64", "--max_eval_samples", "8"]


def guide_command(model: str) -> list[str]:
    """The README's copy of a guide training command (the one naming this model)."""
    for block in readme_blocks("bash"):
        for argv in shell_commands(block):
            # The guide's full command has --overwrite_cache; the quick start's does not.
            if argv[:3] == ["deepspeed", "--num_gpus=1", "run_clm.py"] and {
                model,
                "--overwrite_cache",
            } <= set(argv):
                return argv
    raise AssertionError(f"README has no guide command for {model}")


def write_csvs(folder: Path, characters: int = 60_000) -> None:
    """train.csv / validation.csv from a slice of the Shakespeare example, via text2csv.py."""
    text = (REPO / "train.txt").read_text(encoding="utf-8")
    (folder / "train.txt").write_text(text[:characters], encoding="utf-8")
    shutil.copy(REPO / "validation.txt", folder / "validation.txt")
    done = run(["python", "text2csv.py"], cwd=folder)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_gpt2):
    """The guide's GPT2-XL command with gpt2-xl swapped for a tiny GPT-2, run once for several tests."""
    folder = workdir(tmp_path_factory.mktemp("guide-gpt2"))
    write_csvs(folder)
    argv = replace_flag(guide_command("gpt2-xl"), "--model_name_or_path", str(tiny_gpt2)) + LIMITS
    done = run(argv, cwd=folder)
    return folder, done


def test_guide_gpt2xl_command_trains_with_zero2_and_cpu_adam(gpt2_run):
    folder, done = gpt2_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert ENGINE_LINE in log
    assert "--fp16 needs a CUDA GPU and none is here; training in fp32 instead." in log
    out = folder / "finetuned"
    assert (
        out / "checkpoint-3" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ).is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    results = json.loads((out / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(
        torch.exp(torch.tensor(results["eval_loss"])).item(), rel=1e-4
    )
    assert results["train_samples"] > 0 and results["eval_samples"] == 8


def test_finetuned_folder_reloads_and_generates(gpt2_run):
    folder, _ = gpt2_run
    out = folder / "finetuned"
    assert (out / "model.safetensors").is_file()
    model = GPT2LMHeadModel.from_pretrained(out)
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.transformer.wte.weight, auto.transformer.wte.weight)
    tokenizer = GPT2Tokenizer.from_pretrained(out)
    prompt = tokenizer("ROMEO:", return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_guide_gptneo_command_trains(tmp_path, tiny_neo):
    folder = workdir(tmp_path)
    write_csvs(folder)
    argv = guide_command("EleutherAI/gpt-neo-2.7B")
    assert argv[argv.index("--deepspeed") + 1] == "ds_config_gptneo.json"
    argv = replace_flag(argv, "--model_name_or_path", str(tiny_neo)) + LIMITS
    done = run(argv, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ENGINE_LINE in done.stdout + done.stderr
    out = folder / "finetuned"
    assert (out / "checkpoint-3" / "global_step3").is_dir()
    model = GPTNeoForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt_neo"
    assert json.loads((out / "all_results.json").read_text())["eval_samples"] == 8


def block_calls_script(tmp_path: Path) -> Path:
    """run_clm.py with forward hooks counting how often each block's attention runs (recomputation included)."""
    script = tmp_path / "count_block_calls.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import run_clm

calls = []
load = run_clm.load_model

def counted(*args, **kwargs):
    model, tokenizer = load(*args, **kwargs)
    for block in model.transformer.h:
        # A pre-hook: recomputation may stop early, before a post-forward hook would fire.
        block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
    return model, tokenizer

run_clm.load_model = counted
run_clm.main()
print("BLOCK_CALLS", len(calls))
"""
    )
    return script


@pytest.mark.parametrize("checkpointing", [None, "False"])
def test_gradient_checkpointing_recomputes_activations(tmp_path, tiny_gpt2, checkpointing):
    """On by default: every block runs again in the backward pass. `False` turns that off."""
    (tmp_path / "train.txt").write_text("All the world's a stage.\n" * 200, encoding="utf-8")
    argv = [
        sys.executable, str(block_calls_script(tmp_path)), "--model_name_or_path", str(tiny_gpt2),
        "--train_file", "train.txt", "--do_train", "--output_dir", "out", "--max_steps", "2",
        "--block_size", "32", "--per_device_train_batch_size", "2", "--save_strategy", "no",
    ]  # fmt: skip
    if checkpointing:
        argv += ["--gradient_checkpointing", checkpointing]
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = int(done.stdout.split("BLOCK_CALLS")[1])
    layers, steps = 2, 2
    assert calls == (2 if checkpointing is None else 1) * layers * steps


def test_local_model_folder_is_fine_tuned_not_resumed(gpt2_run, tmp_path):
    """The original script resumed from any local model folder; ours starts at step 0 from its weights."""
    folder, _ = gpt2_run
    trained = folder / "finetuned"
    assert json.loads((trained / "trainer_state.json").read_text())["global_step"] == 3
    (tmp_path / "train.txt").write_text(
        "Once more unto the breach, dear friends.\n" * 200, encoding="utf-8"
    )
    flags = [
        "--max_steps",
        "2",
        "--block_size",
        "32",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
    ]
    done = run_clm_plain(tmp_path, trained, *flags, output_dir="again")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stdout
    assert sorted(losses(tmp_path / "again")) == [1, 2]
