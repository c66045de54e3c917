"""Every bad input to run_clm.py: one line naming the input and the fix, exit 2, nothing destroyed."""

import json
import shutil
import sys
from collections import namedtuple

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from launch import replace_flag, run_clm_plain
from tiny import REPO, gpt2_tokenizer

sys.path.insert(0, str(REPO))
import checkpoints
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
    return ["--model_name_or_path", str(tiny_gpt2), "--train_file", "train.txt", "--do_train", "--output_dir", "out"]  # fmt: skip


def with_train_file(base: list[str], name: str) -> list[str]:
    return replace_flag(base, "--train_file", name)


def test_missing_train_file(capsys, base):
    fails_with(capsys, with_train_file(base, "nope.csv"), "--train_file nope.csv", "no such file")


def test_unsupported_extension(capsys, base, tmp_path):
    (tmp_path / "train.docx").write_text("x")
    fails_with(capsys, with_train_file(base, "train.docx"), "--train_file train.docx", ".csv")


@pytest.mark.parametrize("name", ["train.txt", "train.jsonl"])
def test_not_utf8(capsys, base, tmp_path, name):
    (tmp_path / name).write_bytes('{"text": "Première"}\n'.encode("latin-1"))
    fails_with(capsys, with_train_file(base, name), f"--train_file {name}", "not UTF-8", "offset 15", "iconv")  # fmt: skip


@pytest.mark.parametrize("content", ["", "   \n\n\t\n"])
def test_empty_train_file(capsys, base, tmp_path, content):
    (tmp_path / "train.txt").write_text(content)
    fails_with(capsys, base, "--train_file train.txt", "empty")


def test_csv_without_text_column(capsys, base, tmp_path):
    (tmp_path / "train.csv").write_text("title,body\nHamlet,To be\n", encoding="utf-8")
    fails_with(capsys, with_train_file(base, "train.csv"), "--train_file train.csv", "no `text` column", "title, body")  # fmt: skip


GOOD = {"prompt": "Q: Who wrote Hamlet?\nA:", "completion": " Shakespeare."}
BAD_RECORDS = {
    "no known field": (
        [GOOD, {"question": "Why?", "answer": "Because."}],
        "line 2: none of the known fields",
        "question, answer",
    ),
    "mixed shapes": (
        [GOOD, {"text": "plain text"}],
        "line 2: a text record in a file of completion records",
        "one shape per file",
    ),
    "unknown role": (
        [{"messages": [{"role": "narrator", "content": "Once"}]}],
        "line 1: unknown role 'narrator'",
        "system, user, assistant",
    ),
    "empty completion": (
        [GOOD, GOOD, {"prompt": "Q: And?", "completion": "  "}],
        "line 3: the completion is empty",
        "its answer",
    ),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_bad_record_names_the_file_and_line(capsys, base, tmp_path, case):
    items, *fragments = BAD_RECORDS[case]
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps(i) + "\n" for i in items), encoding="utf-8"
    )
    fails_with(capsys, with_train_file(base, "train.jsonl"), "--train_file train.jsonl", *fragments)
    assert not (tmp_path / "out").exists()


def test_broken_json_names_the_line(capsys, base, tmp_path):
    (tmp_path / "train.jsonl").write_text(
        json.dumps(GOOD) + '\n{"prompt": "Q:", "completion" " A"}\n'
    )
    fails_with(capsys, with_train_file(base, "train.jsonl"), "train.jsonl: line 2: broken JSON")
    assert not (tmp_path / "out").exists()


def test_data_shorter_than_one_block(capsys, base, tmp_path):
    (tmp_path / "train.txt").write_text("Brief candle.", encoding="utf-8")
    err = fails_with(capsys, base, "--train_file train.txt", "fewer than one block of 128")
    # "Brief candle." is 4 GPT-2 tokens, plus the end-of-text token.
    assert "5 tokens" in err and "--block_size 4" in err


def test_missing_deepspeed_config(capsys, base):
    fails_with(capsys, [*base, "--deepspeed", "ds_nope.json"], "--deepspeed ds_nope.json", "no such file")  # fmt: skip


MALFORMED_DEEPSPEED = {
    "missing comma": ('{\n  "zero_optimization": {\n    "stage": 2\n    "overlap_comm": true\n  }\n}\n', "line 4, column 5"),
    "not an object": ("[2]", "the file must be a JSON object"),
    "section not an object": ('{"zero_optimization": 2}', '"zero_optimization" must be a JSON object'),
    "no such stage": ('{"zero_optimization": {"stage": 7}}', "zero_optimization: stage"),
    "size not a number": ('{"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}}', "reduce_bucket_size"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED_DEEPSPEED)
def test_malformed_deepspeed_config(capsys, base, tmp_path, case):
    text, fragment = MALFORMED_DEEPSPEED[case]
    (tmp_path / "ds.json").write_text(text)
    fails_with(capsys, [*base, "--deepspeed", "ds.json"], "--deepspeed ds.json", fragment)


FLAG_CASES = {
    "precision": (["--fp16", "--bf16"], ["--fp16 and --bf16"]),
    "4-bit on a CPU": (
        ["--use_peft", "--load_in_4bit"],
        ["--load_in_4bit needs a CUDA GPU", "Drop it"],
    ),
    "8-bit optimizer on a CPU": (
        ["--optim", "paged_adamw_8bit"],
        ["--optim paged_adamw_8bit needs a CUDA GPU"],
    ),
    "two optimizers": (
        ["--deepspeed", str(REPO / "ds_config.json"), "--optim", "adamw_torch_fused"],
        ['"optimizer" block of', "drop --optim"],
    ),
    "weights-only checkpoints": (
        ["--deepspeed", str(REPO / "ds_config.json"), "--save_only_model"],
        ["cannot resume from", "drop --save_only_model"],
    ),
    "typo": (
        ["--lerning_rate", "1e-4"],
        ["unrecognized argument --lerning_rate; did you mean --learning_rate?"],
    ),
    "streaming": (["--streaming"], ["--streaming is not supported", "drop the flag"]),
    "overrides of a pretrained model": (
        ["--config_overrides", "n_embd=8"],
        ["use it with --model_type"],
    ),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_flags_that_cannot_work_together_are_refused_before_anything_loads(capsys, base, tmp_path, case):  # fmt: skip
    extra, fragments = FLAG_CASES[case]
    fails_with(capsys, [*base, *extra], *fragments)
    assert not (tmp_path / "out").exists()


def test_model_folder_without_config(capsys, base, tmp_path):
    (tmp_path / "empty-model").mkdir()
    argv = replace_flag(base, "--model_name_or_path", "empty-model")
    fails_with(capsys, argv, "--model_name_or_path empty-model", "config.json")


def test_model_that_is_not_a_causal_lm(capsys, base, tmp_path):
    folder = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).save_pretrained(folder)  # fmt: skip
    gpt2_tokenizer().save_pretrained(folder)
    fails_with(capsys, replace_flag(base, "--model_name_or_path", str(folder)), "not a causal language model (t5)")  # fmt: skip


def test_rerun_of_finished_run_exits_0_and_rewrites_nothing(capsys, base, tmp_path, tiny_gpt2):
    """A restart loop, a SLURM requeue or systemd's Restart= settles once the run has finished."""
    finished = tmp_path / "out"
    shutil.copytree(tiny_gpt2, finished)
    (finished / "all_results.json").write_text(json.dumps({"train_loss": 1.0}))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished.iterdir()}
    run_clm.main(base)  # returns: exit status 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        "[run_clm.py] out already holds this run's finished model; nothing to do. To train "
        "again, pass --overwrite_output_dir or choose another --output_dir."
    )
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in finished.iterdir()} == before


def test_overwrite_output_dir_with_bad_data_deletes_nothing(capsys, base, tmp_path):
    """--overwrite_output_dir clears old checkpoints only once the data and model are known good."""
    sealed = tmp_path / "out" / "checkpoint-3"
    sealed.mkdir(parents=True)
    (sealed / "checkpoint-complete").write_text("sealed\n")
    (tmp_path / "out" / "all_results.json").write_text("{}")
    (tmp_path / "train.txt").write_bytes(b"caf\xe9\n")
    fails_with(capsys, [*base, "--overwrite_output_dir"], "not UTF-8")
    assert (sealed / "checkpoint-complete").is_file() and (
        tmp_path / "out" / "all_results.json"
    ).is_file()


def test_error_through_the_launcher_has_no_traceback(tmp_path, tiny_gpt2):
    """As a user sees it: a subprocess, the real entry point, no Python traceback."""
    done = run_clm_plain(tmp_path, tiny_gpt2, train_file="missing.csv")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == "run_clm.py: error: --train_file missing.csv: no such file."
    )


def test_disk_too_small_for_a_checkpoint_fails_before_training(capsys, base, tmp_path, monkeypatch):
    # The disk as shutil sees it: 1 MiB free, far too little for a checkpoint of even the tiny model.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))  # fmt: skip
    err = fails_with(
        capsys, base, "--output_dir out: 1 MiB free, one checkpoint needs about 38 MiB"
    )
    assert "--save_only_model" not in err  # it would make the run impossible to resume
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_a_lora_run_needs_disk_for_its_adapter_only(capsys, base, tmp_path, monkeypatch):
    """10 MiB free: too little for a full checkpoint of the tiny GPT-2 (38 MiB: its fp32 weights and
    Adam's two moments, as measured), plenty for a LoRA one, which saves and optimizes the adapter."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(2**30, 0, 10 * 2**20))
    fails_with(capsys, base, "10 MiB free, one checkpoint needs about 38 MiB")
    run_clm.main([*base, "--use_peft", "--max_steps", "1", "--block_size", "32", "--save_strategy", "no"])  # fmt: skip
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_run_that_saves_no_checkpoints_needs_disk_for_its_weights_only(base, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(2**30, 0, 20 * 2**20))
    run_clm.main([*base, "--max_steps", "1", "--block_size", "32", "--save_strategy", "no"])


def test_gpu_out_of_memory_says_what_to_change(capsys, base, monkeypatch):
    """torch raises OutOfMemoryError from inside a step; the user gets advice, not a CUDA traceback."""

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run_clm.GuardedTrainer, "training_step", out_of_memory)
    err = fails_with(capsys, [*base, "--block_size", "32", "--save_strategy", "no"], "GPU out of memory: lower --per_device_train_batch_size")  # fmt: skip
    assert "ds_config_zero3.json" in err and "--use_peft" in err and "(at step 0)" in err
