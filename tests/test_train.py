"""Training for real, through the deepspeed launcher: the guide's two commands, modern families
(Llama, Qwen2) in full and with LoRA, and what run_clm.py promises around a run."""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, GPT2Tokenizer, GPTNeoForCausalLM

from launch import (
    complete_checkpoints,
    free_port,
    losses,
    python_warnings,
    read_until_losses,
    readme_blocks,
    replace_flag,
    run,
    shell_commands,
    start,
    train_in_process,
    wait_for_group,
    workdir,
)
from tiny import REPO

sys.path.insert(0, str(REPO))
import reports
import run_clm
import run_generation

ENGINE_LINE = "DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over DeepSpeedCPUAdam, optimizer offloaded to cpu"
# Appended to the guide's commands so a tiny model finishes in seconds: limits only, no other change.
LIMITS = ["--max_steps", "3", "--block_size", "64", "--max_eval_samples", "8"]


def guide_command(model: str) -> list[str]:
    """The README's copy of a guide training command (the one naming this model)."""
    for block in readme_blocks("bash"):
        for argv in shell_commands(block):
            if argv[:3] == ["deepspeed", "--num_gpus=1", "run_clm.py"] and {model, "--overwrite_cache"} <= set(argv):  # fmt: skip
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
    return folder, run(argv, cwd=folder)


def test_the_quick_start_trains_with_the_guides_command():
    """The quick start's one line is text2csv and the guide's command (less --overwrite_cache)."""
    block = next(
        b for b in readme_blocks("bash") if b.startswith("pip install -r requirements.txt && ")
    )
    parts = [part.strip() for part in block.strip().split("&&")]
    assert parts[:2] == ["pip install -r requirements.txt", "python text2csv.py"]
    guide = guide_command("gpt2-xl")
    assert shell_commands(parts[2])[0] == [arg for arg in guide if arg != "--overwrite_cache"]


def test_guide_gpt2xl_command_trains_with_zero2_and_cpu_adam(gpt2_run):
    folder, done = gpt2_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert ENGINE_LINE in log
    assert "--fp16 needs a CUDA GPU and none is here; training in fp32 instead." in log
    out = folder / "finetuned"
    assert (out / "checkpoint-3" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # fmt: skip
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    results = json.loads((out / "all_results.json").read_text())
    assert results["perplexity"] == pytest.approx(torch.exp(torch.tensor(results["eval_loss"])).item(), rel=1e-4)  # fmt: skip
    assert results["train_samples"] > 0 and results["eval_samples"] == 8


def test_finetuned_folder_reloads_and_generates(gpt2_run):
    folder, _ = gpt2_run
    out = folder / "finetuned"
    model = GPT2LMHeadModel.from_pretrained(out)
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.transformer.wte.weight, auto.transformer.wte.weight)
    tokenizer = GPT2Tokenizer.from_pretrained(out)
    prompt = tokenizer("ROMEO:", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)  # fmt: skip
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_the_loss_curve_is_drawn_from_the_runs_log(gpt2_run, tmp_path):
    folder, done = gpt2_run
    assert "loss curve: finetuned/loss.png" in done.stdout
    assert (folder / "finetuned" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((folder / "finetuned" / "trainer_state.json").read_text())["log_history"]
    drawn = reports.plot_losses(history, tmp_path / "loss.png")
    assert drawn["eval loss"] == [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    assert drawn.get("train loss", []) == [(e["step"], e["loss"]) for e in history if "loss" in e]
    # A run without eval (or without logged losses) draws what it has, and nothing is printed.
    assert reports.plot_losses([{"step": 1, "loss": 2.5}], tmp_path / "one.png") == {"train loss": [(1, 2.5)]}  # fmt: skip
    assert "No artists" not in done.stderr


def test_guide_gptneo_command_trains(tmp_path, tiny_neo):
    folder = workdir(tmp_path)
    write_csvs(folder)
    argv = guide_command("EleutherAI/gpt-neo-2.7B")
    assert argv[argv.index("--deepspeed") + 1] == "ds_config_gptneo.json"
    done = run(replace_flag(argv, "--model_name_or_path", str(tiny_neo)) + LIMITS, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert ENGINE_LINE in done.stdout + done.stderr
    out = folder / "finetuned"
    assert (out / "checkpoint-3" / "global_step3").is_dir()
    assert GPTNeoForCausalLM.from_pretrained(out).config.model_type == "gpt_neo"
    assert json.loads((out / "all_results.json").read_text())["eval_samples"] == 8


# ---------------------------------------------------------------- modern families, full and LoRA

STEPS = 8


def family_command(model: Path, out: str, *extra: str) -> list[str]:
    return [
        "deepspeed", "--master_port", str(free_port()), "--num_gpus=1", "run_clm.py",
        "--deepspeed", "ds_config.json", "--model_name_or_path", str(model), "--train_file", "train.txt",
        "--do_train", "--output_dir", out, "--max_steps", str(STEPS), "--block_size", "64",
        "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_llama, tiny_qwen) -> Path:
    """Tiny Llama and Qwen2, each trained in full and with --use_peft, through the launcher."""
    folder = workdir(tmp_path_factory.mktemp("families"))
    shutil.copy(REPO / "validation.txt", folder / "train.txt")
    for name, model in (("llama", tiny_llama), ("qwen2", tiny_qwen)):
        for kind, extra in (("full", []), ("lora", ["--use_peft"])):
            done = run(family_command(model, f"{name}-{kind}", *extra), cwd=folder)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            (folder / f"{name}-{kind}.log").write_text(done.stdout + done.stderr)
    return folder


@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_modern_families_train_reload_and_sample(families, name, kind, capsys):
    log = (families / f"{name}-{kind}.log").read_text()
    assert ENGINE_LINE in log
    steps = losses(families / f"{name}-{kind}")
    assert sorted(steps) == list(range(1, STEPS + 1)) and steps[STEPS] < steps[1], steps
    out = families / f"{name}-{kind}"
    model = AutoModelForCausalLM.from_pretrained(out)  # a normal model folder, adapter merged
    assert model.config.model_type == name
    if kind == "lora":
        trainable = [line for line in log.splitlines() if "LoRA r=16 alpha=32: " in line]
        assert len(trainable) == 1 and "trainable parameters of" in trainable[0]
        assert (out / "adapter" / "adapter_config.json").is_file()
    # run_generation.main(), as the script runs it: a new process would cost seconds.
    [text] = run_generation.main(
        ["--model_name_or_path", str(out), "--prompt", "KING:", "--length", "8"]
    )
    assert (
        text.startswith("KING:")
        and "=== GENERATED SEQUENCE 1 (8 new tokens) ===" in capsys.readouterr().out
    )


def test_lora_changes_only_the_adapter(families, tiny_llama):
    """Merged weights minus the adapter's update are the base weights, bit for bit elsewhere."""
    base = load_file(tiny_llama / "model.safetensors")
    merged = load_file(families / "llama-lora" / "model.safetensors")
    adapter = load_file(families / "llama-lora" / "adapter" / "adapter_model.safetensors")
    scale = 32 / 16  # lora_alpha / lora_r
    adapted = 0
    for name, weight in base.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if f"{key}.lora_A.weight" in adapter:
            update = adapter[f"{key}.lora_B.weight"] @ adapter[f"{key}.lora_A.weight"] * scale
            assert update.abs().max() > 0, name  # the adapter did learn
            torch.testing.assert_close(
                merged[name] - update.to(merged[name].dtype), weight, atol=1e-6, rtol=0
            )
            adapted += 1
        else:
            assert torch.equal(merged[name], weight), name  # embeddings, norms, lm_head: untouched
    # Every linear layer of both blocks: q, k, v, o, gate, up, down.
    assert adapted == 2 * 7


def test_a_lora_run_stopped_by_sigterm_on_one_gpu_continues_the_same_loss_curve_on_two(families, tiny_qwen):  # fmt: skip
    argv = family_command(tiny_qwen, "qwen2-lora-stopped", "--use_peft")
    process = start(argv, families)
    seen = read_until_losses(process, 3)
    os.killpg(process.pid, signal.SIGTERM)
    seen.extend(process.stdout)
    wait_for_group(process)
    assert "checkpoint saved. Run the same command again to resume." in "".join(seen)
    (saved,) = complete_checkpoints(families / "qwen2-lora-stopped")
    stopped_at = int(saved.split("-")[1])
    assert 3 <= stopped_at < STEPS
    # The machine that comes back has two GPUs: the same command with another --num_gpus.
    done = run([a.replace("--num_gpus=1", "--num_gpus=2") for a in argv], cwd=families)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resuming from qwen2-lora-stopped/checkpoint-{stopped_at}" in done.stdout
    assert "--per_device_train_batch_size 2 --gradient_accumulation_steps 1 keep its global batch of 4" in done.stdout  # fmt: skip
    after, reference = losses(families / "qwen2-lora-stopped"), losses(families / "qwen2-lora")
    # A resume that silently started afresh would log step 1's loss again: these tell it apart.
    assert reference[stopped_at + 1] != pytest.approx(reference[1], rel=3e-3), reference
    for step in range(stopped_at + 1, STEPS + 1):
        # Two ranks sum the same examples in another order than one.
        assert after[step] == pytest.approx(reference[step], rel=1e-3), (step, after, reference)


# ---------------------------------------------------------------- around a run (plain, in-process)


@pytest.mark.parametrize("checkpointing", [None, "False"])
def test_gradient_checkpointing_recomputes_activations(tmp_path, tiny_gpt2, checkpointing, monkeypatch):  # fmt: skip
    """On by default: every block runs again in the backward pass. `False` turns that off."""
    calls, load = [], run_clm.load_model

    def counted(*args, **kwargs):
        model = load(*args, **kwargs)
        for block in model.transformer.h:
            # A pre-hook: recomputation may stop early, before a post-forward hook would fire.
            block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
        return model

    monkeypatch.setattr(run_clm, "load_model", counted)
    flags = ["--max_steps", "2", "--block_size", "32", "--per_device_train_batch_size", "2"]
    train_in_process(tmp_path, tiny_gpt2, *flags, *(["--gradient_checkpointing", checkpointing] if checkpointing else []))  # fmt: skip
    layers, steps = 2, 2
    assert len(calls) == (2 if checkpointing is None else 1) * layers * steps


def test_local_model_folder_is_fine_tuned_not_resumed(gpt2_run, tmp_path, capsys):
    """The original script resumed from any local model folder; ours starts at step 0 from its weights."""
    folder, _ = gpt2_run
    out = train_in_process(tmp_path, folder / "finetuned", "--max_steps", "2", "--block_size", "32", "--logging_steps", "1")  # fmt: skip
    assert "resuming" not in capsys.readouterr().out
    assert sorted(losses(out)) == [1, 2]


def test_separate_examples_train(tmp_path, tiny_gpt2, capsys):
    examples = ["Friends, Romans, countrymen", "lend me your ears", "I come to bury Caesar, not to praise him."]  # fmt: skip
    text = "\n\n".join(f"{t} ({i})" for i in range(60) for t in examples)
    flags = ["--separate_examples", "--max_steps", "6", "--logging_steps", "1", "--learning_rate", "3e-3",
             "--per_device_train_batch_size", "8"]  # fmt: skip
    out = train_in_process(tmp_path, tiny_gpt2, *flags, text=text)
    assert "180 train / 0 eval examples" in capsys.readouterr().out  # one example per paragraph
    steps = losses(out)
    assert len(steps) == 6 and steps[6] < steps[1]


def test_nonfinite_loss_stops_with_advice(tmp_path, tiny_gpt2, capsys):
    flags = ["--max_steps", "30", "--block_size", "32", "--learning_rate", "1e30", "--max_nonfinite_steps", "3",
             "--logging_steps", "5"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train_in_process(tmp_path, tiny_gpt2, *flags, text="To be or not to be. " * 400)
    assert stop.value.code == 2
    errors = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("run_clm.py: error: ")
    ]
    assert len(errors) == 1
    # Checked when the Trainer logs (every 5 steps here), so the count may have grown past 3 by then.
    assert errors[0].startswith("run_clm.py: error: the loss was NaN/inf for ") and "micro-steps in a row (by step 5)" in errors[0]  # fmt: skip
    assert "--bf16" in errors[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_wandb_without_key_records_offline(tmp_path, tiny_gpt2):
    """--report_to wandb with no API key, no network, a HOME with no saved login."""
    (tmp_path / "train.txt").write_text(
        "Is this a dagger which I see before me?\n" * 150, encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    argv = [sys.executable, str(REPO / "run_clm.py"), "--model_name_or_path", str(tiny_gpt2),
            "--train_file", "train.txt", "--do_train", "--output_dir", "out", "--max_steps", "2",
            "--block_size", "32", "--report_to", "wandb", "--save_strategy", "no"]  # fmt: skip
    import subprocess

    done = subprocess.run(argv, cwd=tmp_path, env={**env, "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wandb: no API key (run `wandb login` to log online); recording offline under ./wandb/." in done.stdout  # fmt: skip
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    # Nothing but our own lines: no warning from a library (the loss plot of a run without eval
    # once printed matplotlib's "No artists with labels").
    assert not python_warnings(done.stderr), python_warnings(done.stderr)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA and 8-bit optimizers need CUDA")
@pytest.mark.parametrize(
    "flags", [["--use_peft", "--load_in_4bit"], ["--optim", "paged_adamw_8bit"]]
)
def test_qlora_and_8bit_optimizers_train_on_a_gpu(tmp_path, tiny_llama, flags):
    """For a session with a GPU: bitsandbytes' 4-bit base and 8-bit optimizer states train."""
    (tmp_path / "train.txt").write_text((REPO / "validation.txt").read_text(encoding="utf-8"))
    argv = ["python", str(REPO / "run_clm.py"), "--model_name_or_path", str(tiny_llama), "--bf16",
            "--train_file", "train.txt", "--do_train", "--output_dir", "out", "--max_steps", "6",
            "--block_size", "64", "--learning_rate", "3e-3", "--logging_steps", "1", *flags]  # fmt: skip
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = losses(tmp_path / "out")
    assert steps[6] < steps[1], steps
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "llama"
    if (
        "--load_in_4bit" in flags
    ):  # the eval figures are the saved 16-bit model's, not the 4-bit one's
        evaluate = ["--validation_file", "train.txt", "--do_eval", "--block_size", "64", "--bf16"]
        done = run([*replace_flag(argv, "--output_dir", "out-eval"), *evaluate], cwd=tmp_path)
        again = run(["python", str(REPO / "run_clm.py"), "--model_name_or_path", "out-eval", "--output_dir", "again", *evaluate], cwd=tmp_path)  # fmt: skip
        assert done.returncode == again.returncode == 0, done.stderr[-3000:] + again.stderr[-3000:]
        figures = [json.loads((tmp_path / d / "all_results.json").read_text())["eval_loss"] for d in ("out-eval", "again")]  # fmt: skip
        assert figures[0] == pytest.approx(figures[1], rel=1e-4), figures
