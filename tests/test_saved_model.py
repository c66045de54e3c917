"""What a run saves: a full fine-tune's weights move and keep the checkpoint's dtype, the
tokenizer keeps its limits, and a LoRA run's eval figures are the saved model's."""

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from launch import train_in_process
from tiny import REPO

sys.path.insert(0, str(REPO))
import run_clm


def block_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if ".layers." in k and v.dim() == 2}  # fmt: skip


def test_a_full_fine_tune_of_a_bf16_model_moves_every_weight_and_saves_bf16(tmp_path, tiny_llama):
    """Small updates to 16-bit weights round away unless an fp32 copy takes them: the issue's
    measurement (30 steps at lr 1e-5) moved 15.6% of the block weights in pure bf16."""
    base = tmp_path / "bf16-llama"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(base)
    shutil.copy(tiny_llama / "tokenizer.json", base)
    shutil.copy(tiny_llama / "tokenizer_config.json", base)
    out = train_in_process(tmp_path, base, "--bf16", "--learning_rate", "1e-5", "--lr_scheduler_type", "constant",
                           "--max_steps", "30", "--block_size", "32", "--per_device_train_batch_size", "2")  # fmt: skip
    before, after = block_weights(base), block_weights(out)
    assert {w.dtype for w in after.values()} == {torch.bfloat16}  # saved as the checkpoint was
    moved = sum((after[k] != w).sum().item() for k, w in before.items())
    assert moved / sum(w.numel() for w in before.values()) > 0.9


def test_the_saved_tokenizer_keeps_the_length_limit_it_was_loaded_with(tmp_path, tiny_gpt2):
    """User code that tokenizes with truncation=True relies on it: GPT-2 has 1024 positions."""
    base = shutil.copytree(tiny_gpt2, tmp_path / "gpt2")
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 1024}))
    out = train_in_process(tmp_path, base, "--max_steps", "1", "--block_size", "32")
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 1024


def test_a_lora_runs_eval_figures_describe_the_saved_model(tmp_path, tiny_llama):
    """The folder holds the adapter merged into the 16-bit base (for QLoRA, not the 4-bit model
    that trained): all_results.json gives that model's eval loss, as evaluating the folder does."""
    base = tmp_path / "bf16-llama"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, base)
    (tmp_path / "valid.txt").write_text(
        (REPO / "validation.txt").read_text(encoding="utf-8")[:8000]
    )
    common = ["--validation_file", str(tmp_path / "valid.txt"), "--do_eval", "--block_size", "32", "--bf16"]  # fmt: skip
    out = train_in_process(tmp_path, base, "--use_peft", "--max_steps", "4", "--learning_rate", "1e-2", *common)  # fmt: skip
    trained = json.loads((out / "all_results.json").read_text())["eval_loss"]
    run_clm.main(
        ["--model_name_or_path", str(out), "--output_dir", str(tmp_path / "again"), *common]
    )
    again = json.loads((tmp_path / "again" / "all_results.json").read_text())["eval_loss"]
    assert trained == again  # the same model, data and batches: the same figure to the last bit
