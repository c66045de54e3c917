"""Growing past one GPU's memory and past one process: ZeRO-3, and ZeRO-2 across two ranks."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from launch import losses, run, workdir
from tiny import gpt2_tokenizer

TEXT = "\n".join(
    f"{i}: Now is the winter of our discontent made glorious summer." for i in range(200)
)


def train(
    folder: Path, model: Path, config: str, ranks: int, batch: int, out: str, *extra: str
) -> str:
    argv = [
        "deepspeed", f"--num_gpus={ranks}", "run_clm.py", "--deepspeed", config,
        "--model_name_or_path", str(model), "--train_file", "train.txt", "--do_train", "--output_dir", out,
        "--max_steps", "5", "--block_size", "32", "--per_device_train_batch_size", str(batch),
        "--learning_rate", "1e-3", "--logging_steps", "1", *extra,
    ]  # fmt: skip
    done = run(argv, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_zero3_trains_in_bf16_and_saves_a_normal_model_folder(tmp_path, tiny_gpt2):
    """--bf16 on a CPU works (the script sets use_cpu); ZeRO-3 gathers the weights at save."""
    folder = workdir(tmp_path)
    (folder / "train.txt").write_text(TEXT, encoding="utf-8")
    log = train(folder, tiny_gpt2, "ds_config_zero3.json", 1, 4, "z3", "--bf16")
    assert "DeepSpeed ZeRO stage 3: DeepSpeedZeroOptimizer_Stage3 over DeepSpeedCPUAdam" in log
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "z3")
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert reloaded.num_parameters() == original.num_parameters()
    assert reloaded.dtype == torch.bfloat16
    # Trained, gathered whole: every weight is present and the embeddings moved.
    assert not torch.equal(
        reloaded.transformer.wte.weight, original.transformer.wte.weight.to(torch.bfloat16)
    )


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> Path:
    """Dropout draws different masks on different ranks; without it both layouts compute the same thing."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2-nodropout"
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=64, n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path


def test_two_ranks_partition_zero2_and_match_one_rank(tmp_path, no_dropout_model):
    folder = workdir(tmp_path)
    (folder / "train.txt").write_text(TEXT, encoding="utf-8")
    train(folder, no_dropout_model, "ds_config.json", ranks=1, batch=4, out="one")
    train(
        folder, no_dropout_model, "ds_config.json", ranks=2, batch=2, out="two"
    )  # same global batch of 4
    shards = sorted(
        p.name for p in (folder / "two" / "checkpoint-5" / "global_step5").glob("*optim_states.pt")
    )
    assert shards == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    one, two = losses(folder / "one"), losses(folder / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        # Same examples, same updates; only the order of floating-point sums differs.
        assert two[step] == pytest.approx(one[step], rel=1e-4), (step, one, two)
