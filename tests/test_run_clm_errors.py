"""Every bad input to run_clm.py: one line naming the input and the fix, exit 2, nothing destroyed."""

import json
import shutil
import subprocess
import sys

import pytest
from transformers import T5Config, T5ForConditionalGeneration

from launch import replace_flag, run, run_clm_plain
from tiny import REPO, gpt2_tokenizer

sys.path.insert(0, str(REPO))
import run_clm


def fails_with(capsys, argv: list[str], *fragments: str) -> str:
    with pytest.raises(SystemExit) as stop:
        run_clm.main(argv)
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    err = stderr.strip().splitlines()[-1]  # after any progress bars
    assert err.startswith("run_clm.py: error: "), stderr
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def base(tmp_path, tiny_gpt2, monkeypatch):
    """A valid command in a scratch folder; each test breaks one thing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text(
        "Now is the winter of our discontent.\n" * 100, encoding="utf-8"
    )
    return [
        "--model_name_or_path",
        str(tiny_gpt2),
        "--train_file",
        "train.txt",
        "--do_train",
        "--output_dir",
        "out",
    ]


def test_missing_train_file(capsys, base):
    argv = base.copy()
    argv[3] = "nope.csv"
    fails_with(capsys, argv, "--train_file nope.csv", "no such file")


def test_unsupported_extension(capsys, base, tmp_path):
    (tmp_path / "train.docx").write_text("x")
    argv = base.copy()
    argv[3] = "train.docx"
    fails_with(capsys, argv, "--train_file train.docx", ".csv")


def test_not_utf8(capsys, base, tmp_path):
    (tmp_path / "train.txt").write_bytes("Première ligne\n".encode("latin-1"))
    fails_with(capsys, base, "--train_file train.txt", "not UTF-8", "offset 5", "iconv")


@pytest.mark.parametrize("content", ["", "   \n\n\t\n"])
def test_empty_train_file(capsys, base, tmp_path, content):
    (tmp_path / "train.txt").write_text(content)
    fails_with(capsys, base, "--train_file train.txt", "empty")


def test_csv_without_text_column(capsys, base, tmp_path):
    (tmp_path / "train.csv").write_text("title,body\nHamlet,To be\n", encoding="utf-8")
    argv = base.copy()
    argv[3] = "train.csv"
    fails_with(capsys, argv, "--train_file train.csv", "no `text` column", "title, body")


def test_data_shorter_than_one_block(capsys, base, tmp_path):
    (tmp_path / "train.txt").write_text("Brief candle.", encoding="utf-8")
    err = fails_with(capsys, base, "--train_file train.txt", "fewer than one block of 128")
    # "Brief candle." is 4 GPT-2 tokens, plus the end-of-text token.
    assert "5 tokens" in err and "--block_size 4" in err


def test_missing_deepspeed_config(capsys, base):
    fails_with(
        capsys, [*base, "--deepspeed", "ds_nope.json"], "--deepspeed ds_nope.json", "no such file"
    )


def test_malformed_deepspeed_config(capsys, base, tmp_path):
    (tmp_path / "ds.json").write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')
    fails_with(capsys, [*base, "--deepspeed", "ds.json"], "--deepspeed ds.json", "line 4")


def test_conflicting_precision_flags(capsys, base):
    fails_with(capsys, [*base, "--fp16", "--bf16"], "--fp16 and --bf16")


def test_model_folder_without_config(capsys, base, tmp_path):
    (tmp_path / "empty-model").mkdir()
    argv = base.copy()
    argv[1] = "empty-model"
    fails_with(capsys, argv, "--model_name_or_path empty-model", "config.json")


def test_model_that_is_not_a_causal_lm(capsys, base, tmp_path):
    folder = tmp_path / "t5"
    T5ForConditionalGeneration(
        T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    argv = base.copy()
    argv[1] = str(folder)
    fails_with(capsys, argv, "not a causal language model (t5)")


def test_rerun_of_finished_run_keeps_the_model(capsys, base, tmp_path, tiny_gpt2):
    finished = tmp_path / "out"
    shutil.copytree(tiny_gpt2, finished)
    (finished / "all_results.json").write_text(json.dumps({"train_loss": 1.0}))
    before = (finished / "model.safetensors").read_bytes()
    fails_with(capsys, base, "--output_dir out", "finished model", "--overwrite_output_dir")
    assert (finished / "model.safetensors").read_bytes() == before


def test_error_through_the_launcher_has_no_traceback(tmp_path, tiny_gpt2):
    """As a user sees it: a subprocess, the real entry point, no Python traceback."""
    done = run_clm_plain(tmp_path, tiny_gpt2, train_file="missing.csv")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == "run_clm.py: error: --train_file missing.csv: no such file."
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB filesystem: far too small for a checkpoint of even the tiny model."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_too_small_for_a_checkpoint_fails_before_training(capsys, base, small_disk):
    argv = replace_flag(base, "--output_dir", str(small_disk / "out"))
    err = fails_with(
        capsys, argv, f"--output_dir {small_disk / 'out'}", "one checkpoint needs about", "GiB"
    )
    assert "--save_only_model" in err
    assert not any(small_disk.iterdir())


OOM_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
import run_clm

def out_of_memory(self, *args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

run_clm.SealingTrainer.training_step = out_of_memory
run_clm.main()
"""


def test_gpu_out_of_memory_says_what_to_change(tmp_path, tiny_gpt2):
    """torch raises OutOfMemoryError from inside a step; the user gets advice, not a CUDA traceback."""
    (tmp_path / "oom.py").write_text(OOM_SCRIPT.format(repo=str(REPO)))
    (tmp_path / "train.txt").write_text(
        "Now is the winter of our discontent.\n" * 100, encoding="utf-8"
    )
    done = run(
        [
            "python",
            "oom.py",
            "--model_name_or_path",
            str(tiny_gpt2),
            "--train_file",
            "train.txt",
            "--do_train",
        ]
        + ["--output_dir", "out", "--block_size", "32", "--save_strategy", "no"],
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "run_clm.py: error: GPU out of memory: lower --per_device_train_batch_size"
    ), last
    assert "ds_config_zero3.json" in last and "(at step 0)" in last
