"""Any causal LM folder fine-tunes: tiny Mistral, Qwen3, Gemma 2 and 3, Phi, Phi-3 and GPT-J, in
full and with LoRA, then reload as a normal model folder and sample.

(Llama and Qwen2 train through the deepspeed launcher in test_train.py; these run in this
process, as `python run_clm.py` does: the launcher adds nothing that depends on the family.)
"""

import math
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from launch import losses
from tiny import OTHER_FAMILIES, REPO, tiny_model

sys.path.insert(0, str(REPO))
import run_clm
import run_generation


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def linear_layers(model) -> set[str]:
    """Every linear layer of the blocks (GPT-2 style Conv1D included), not the output layer."""
    kinds = (torch.nn.Linear, Conv1D)
    return {n for n, m in model.named_modules() if isinstance(m, kinds) and n != "lm_head"}


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_each_family_fine_tunes_reloads_and_samples(family, kind, tokenizer, tmp_path, capsys):
    torch.manual_seed(0)
    base = tmp_path / family
    tiny_model(family, vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", str(base), "--train_file", str(REPO / "validation.txt"),
            "--do_train", "--output_dir", str(out), "--max_steps", "3", "--block_size", "32",
            "--learning_rate", "3e-3", "--logging_steps", "1", "--save_strategy", "no"]  # fmt: skip
    run_clm.main(argv + ["--use_peft"] * (kind == "lora"))
    steps = losses(out)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(loss) for loss in steps.values())

    before = AutoModelForCausalLM.from_pretrained(base)
    after = AutoModelForCausalLM.from_pretrained(out)  # a normal folder: any adapter is merged
    assert after.config.model_type == family
    original = before.state_dict()
    moved = [n for n, w in after.state_dict().items() if not torch.equal(w, original[n])]
    assert moved, "training changed no weight"
    if kind == "lora":
        log = capsys.readouterr().out
        assert "trainable parameters of" in log
        # The default adapts every linear layer of every block, whatever this family names them.
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        adapted = {
            key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            for key in adapter
            if key.endswith(".lora_A.weight")
        }
        assert adapted == linear_layers(before)
        # Only those layers moved: embeddings and norms are the base model's.
        assert {name.rsplit(".", 1)[0] for name in moved} <= adapted

    [text] = run_generation.main(
        ["--model_name_or_path", str(out), "--prompt", "KING:", "--length", "4"]
    )
    assert text.startswith("KING:") and "(4 new tokens)" in capsys.readouterr().out
