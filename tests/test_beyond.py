"""Beyond the guide: separate examples, the NaN guard, wandb without a key, the loss picture."""

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import TrainingArguments

from launch import run, run_clm_plain
from tiny import REPO, gpt2_tokenizer

sys.path.insert(0, str(REPO))
import run_clm

EXAMPLES = [
    "Friends, Romans, countrymen",
    "lend me your ears",
    "I come to bury Caesar, not to praise him.",
]


def test_separate_examples_never_see_each_other(tmp_path):
    """Each record is its own row: no tokens of another example to attend to or predict; padding is inert."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in EXAMPLES), encoding="utf-8")
    args = run_clm.DataArguments(
        train_file=str(data), separate_examples=True, preprocessing_num_workers=1
    )
    tokenizer = gpt2_tokenizer()
    texts = run_clm.load_texts(args)
    rows = run_clm.tokenize(texts, tokenizer, args, 8, TrainingArguments(output_dir=str(tmp_path)))[
        "train"
    ]
    eos = tokenizer.eos_token_id
    expected = [(tokenizer(t)["input_ids"] + [eos])[:8] for t in EXAMPLES]
    assert [row["input_ids"] for row in rows] == expected
    batch = run_clm.PadToLongest(pad_id=eos)(list(rows))
    for i, ids in enumerate(expected):
        width = len(ids)
        assert batch["input_ids"][i, :width].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [1] * width + [0] * (8 - width)
        assert batch["labels"][i].tolist() == ids + [-100] * (8 - width)


def test_separate_examples_train(tmp_path, tiny_gpt2):
    lines = "\n\n".join(f"{t} ({i})" for i in range(60) for t in EXAMPLES)
    (tmp_path / "train.txt").write_text(lines, encoding="utf-8")
    flags = [
        "--separate_examples",
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--learning_rate",
        "3e-3",
    ]
    done = run_clm_plain(
        tmp_path, tiny_gpt2, *flags, "--per_device_train_batch_size", "8", "--save_strategy", "no"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "180 train" in done.stdout  # one example per paragraph
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    train_losses = [e["loss"] for e in history if "loss" in e]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0]


def test_nonfinite_loss_stops_with_advice(tmp_path, tiny_gpt2):
    (tmp_path / "train.txt").write_text("To be or not to be. " * 400, encoding="utf-8")
    flags = [
        "--max_steps",
        "30",
        "--block_size",
        "32",
        "--learning_rate",
        "1e30",
        "--max_nonfinite_steps",
        "3",
    ]
    done = run_clm_plain(tmp_path, tiny_gpt2, *flags, "--save_strategy", "no")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("run_clm.py: error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("run_clm.py: error: the loss was NaN/inf for 3 steps in a row")
    assert "--bf16" in errors[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory, tiny_gpt2):
    """--report_to wandb with no API key, no network, a HOME with no saved login."""
    folder = tmp_path_factory.mktemp("wandb")
    (folder / "train.txt").write_text(
        "Is this a dagger which I see before me?\n" * 150, encoding="utf-8"
    )
    argv = [
        "python",
        str(REPO / "run_clm.py"),
        "--model_name_or_path",
        str(tiny_gpt2),
        "--train_file",
        "train.txt",
    ]
    argv += [
        "--do_train",
        "--do_eval",
        "--output_dir",
        "out",
        "--max_steps",
        "6",
        "--block_size",
        "32",
    ]
    argv += [
        "--logging_steps",
        "1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--report_to",
        "wandb",
    ]
    argv += ["--learning_rate", "2e-3", "--save_strategy", "no"]
    env_backup = {k: os.environ.pop(k) for k in ("WANDB_MODE", "WANDB_API_KEY") if k in os.environ}
    home = os.environ.get("HOME")
    os.environ["HOME"] = str(folder)
    try:
        done = run(argv, cwd=folder)
    finally:
        os.environ.update(env_backup)
        if home is not None:
            os.environ["HOME"] = home
    return folder, done


def test_wandb_without_key_records_offline(wandb_run):
    folder, done = wandb_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "wandb: no API key (run `wandb login` to log online); recording offline under ./wandb/."
        in done.stdout
    )
    assert list((folder / "wandb").glob("offline-run-*"))


def test_loss_plot_is_written(wandb_run):
    folder, done = wandb_run
    png = Path(folder / "out" / "loss.png")
    assert "loss curve: out/loss.png" in done.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (700, 400)
        # Not a blank canvas: the curves put more than a handful of colours on it.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    history = json.loads((folder / "out" / "trainer_state.json").read_text())["log_history"]
    assert sum("eval_loss" in e for e in history) >= 3 and sum("loss" in e for e in history) == 6
