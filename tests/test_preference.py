"""Preference tuning: DPO pairs and KTO labelled answers, on TRL's trainers, in run_clm.py's run.

The DPO runs go through the deepspeed launcher with CPU Adam: in full on ZeRO-2 (TRL's frozen
copy as the reference), and with LoRA on ZeRO-3 and two ranks (the adapter switched off)."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from launch import (
    complete_checkpoints,
    free_port,
    losses,
    python_warnings,
    read_until_losses,
    run,
    start,
    wait_for_group,
    workdir,
)
from tiny import REPO

sys.path.insert(0, str(REPO))
import reports
import run_clm

NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kay", "Lu"]
POLITE = [" yes, gladly.", " of course, friend.", " happy to help."]
RUDE = [" no, go away.", " leave me be.", " ask someone else."]
STEPS = 8


def pairs(count: int, first: int = 0) -> list[dict]:
    return [
        {
            "prompt": f"{NAMES[i % len(NAMES)]} asks favour {i}. Answer:",
            "chosen": POLITE[i % 3],
            "rejected": RUDE[(i // 3) % 3],
        }
        for i in range(first, first + count)
    ]


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def dpo_command(model: Path, out: str, *extra: str, ranks: int = 1, config: str = "ds_config.json") -> list[str]:  # fmt: skip
    """A global batch of 8 pairs, whatever the number of ranks."""
    return [
        "deepspeed", "--master_port", str(free_port()), f"--num_gpus={ranks}", "run_clm.py",
        "--deepspeed", config, "--model_name_or_path", str(model),
        "--train_file", "pairs.jsonl", "--validation_file", "held_out.jsonl", "--do_train",
        "--do_eval", "--output_dir", out, "--max_steps", str(STEPS),
        "--per_device_train_batch_size", str(8 // ranks), "--logging_steps", "1",
        "--eval_strategy", "steps", "--eval_steps", "4", "--eval_on_start", "--beta", "0.1", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = workdir(tmp_path_factory.mktemp("preference"))
    write(path / "pairs.jsonl", pairs(64))
    write(path / "held_out.jsonl", pairs(16, first=200))
    return path


# ZeRO-3 gathers the weights for every generated token: one held-out answer shows that works.
FLAGS = {
    "full": ["--learning_rate", "5e-4"],
    "lora": ["--learning_rate", "5e-3", "--use_peft", "--bf16", "--eval_answers", "1"],
}
# Full: ZeRO-2 on one rank, with TRL's frozen copy as the reference. LoRA: ZeRO-3 on two ranks,
# the reference being the same weights with the adapter switched off.
LAYOUTS = {"full": {}, "lora": {"ranks": 2, "config": "ds_config_zero3.json"}}


@pytest.fixture(scope="module")
def dpo_runs(folder, tiny_gpt2) -> dict[str, str]:
    logs = {}
    for kind, flags in FLAGS.items():
        done = run(dpo_command(tiny_gpt2, f"dpo-{kind}", *flags, **LAYOUTS[kind]), cwd=folder)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert not python_warnings(done.stderr), python_warnings(done.stderr)
        logs[kind] = done.stdout + done.stderr
    return logs


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_dpo_through_the_launcher_learns_to_prefer_the_chosen_answers(folder, dpo_runs, kind):
    out = folder / f"dpo-{kind}"
    zero = "3: DeepSpeedZeroOptimizer_Stage3" if kind == "lora" else "2: DeepSpeedZeroOptimizer"
    assert f"DeepSpeed ZeRO stage {zero} over DeepSpeedCPUAdam" in dpo_runs[kind]
    evals = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_rewards/margins" in e]  # fmt: skip
    assert [e["step"] for e in evals] == [0, 4, 8]
    before, after = evals[0], evals[-1]
    assert before["eval_rewards/margins"] == pytest.approx(
        0, abs=1e-3
    )  # the model is its reference
    assert after["eval_rewards/accuracies"] > 0.9, evals
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.2, evals
    for step in (0, 4, 8):  # each evaluation shows the model answering held-out prompts
        assert f"[run_clm.py] step {step}, held-out prompt 1: 'Ivy asks favour 200. Answer:' -> " in dpo_runs[kind]  # fmt: skip
        assert (f"step {step}, held-out prompt 2:" in dpo_runs[kind]) == (kind == "full")
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_rewards/accuracies"] > 0.9 and "perplexity" not in results
    drawn = reports.plot_losses(json.loads((out / "trainer_state.json").read_text())["log_history"], folder / "plot.png")  # fmt: skip
    assert {"train loss", "eval loss", "eval reward margin", "eval reward accuracy"} <= set(drawn)
    if kind == "lora":  # merged into the base for the user, the adapter kept beside it
        assert "LoRA adapter merged into" in dpo_runs[kind]
        assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file() and (out / "loss.png").is_file()


def test_a_dpo_run_stopped_by_sigterm_resumes_onto_the_uninterrupted_losses(folder, dpo_runs, tiny_gpt2):  # fmt: skip
    argv = dpo_command(tiny_gpt2, "dpo-stopped", *FLAGS["full"])
    process = start(argv, folder)
    seen = read_until_losses(process, 3)
    os.killpg(process.pid, signal.SIGTERM)
    seen.extend(process.stdout)
    assert wait_for_group(process) < 60
    assert "checkpoint saved. Run the same command again to resume." in "".join(seen)
    (saved,) = complete_checkpoints(folder / "dpo-stopped")
    stopped_at = int(saved.split("-")[1])
    assert 3 <= stopped_at < STEPS
    done = run(argv, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resuming from dpo-stopped/{saved}" in done.stdout
    after, reference = losses(folder / "dpo-stopped"), losses(folder / "dpo-full")
    assert sorted(after) == sorted(reference) == list(range(1, STEPS + 1))
    assert reference[stopped_at + 1] != pytest.approx(
        reference[1], rel=1e-2
    )  # a restart would show
    for step in after:
        assert after[step] == pytest.approx(reference[step], rel=1e-4), (step, after, reference)


def test_kto_trains_on_answers_labelled_good_or_bad(tmp_path, tiny_gpt2, monkeypatch):
    labelled = [
        {
            "prompt": p["prompt"],
            "completion": p["chosen" if i % 2 else "rejected"],
            "label": bool(i % 2),
        }
        for i, p in enumerate(pairs(96))
    ]
    write(tmp_path / "feedback.jsonl", labelled)
    monkeypatch.chdir(tmp_path)
    run_clm.main(["--model_name_or_path", str(tiny_gpt2), "--train_file", "feedback.jsonl",
                  "--do_train", "--do_eval", "--output_dir", "kto", "--max_steps", str(STEPS),
                  "--per_device_train_batch_size", "8", "--learning_rate", "5e-4", "--logging_steps", "1",
                  "--save_strategy", "no", "--desirable_weight", "1.0", "--undesirable_weight", "1.0"])  # fmt: skip
    results = json.loads((tmp_path / "kto" / "all_results.json").read_text())
    assert "eval_kl" in results and results["eval_rewards/margins"] > 0.2, results
    trained = losses(tmp_path / "kto")
    assert trained[STEPS] < trained[1], trained


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (
            {"prompt": "Q", "chosen": "A", "rejected": "A"},
            "line 2: chosen and rejected are the same; a pair must differ.",
        ),
        (
            {"prompt": "Q", "chosen": " ", "rejected": "B"},
            "line 2: chosen is empty; give every prompt its answer.",
        ),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": "A", "rejected": "B"},
            "line 2: the prompt is a list of messages, so chosen must be one too",
        ),
        (
            {"prompt": "Q", "completion": "A", "label": "maybe"},
            "line 2: label must be true or false, not 'maybe'.",
        ),
    ],
)
def test_a_bad_preference_record_is_named_by_file_and_line(tmp_path, tiny_gpt2, record, message, monkeypatch, capsys):  # fmt: skip
    good = {"prompt": "Q", "completion": "A", "label": True} if "label" in record else pairs(1)[0]
    write(tmp_path / "bad.jsonl", [good, record])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_clm.main(["--model_name_or_path", str(tiny_gpt2), "--train_file", "bad.jsonl", "--do_train", "--output_dir", "out"])  # fmt: skip
    assert stop.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line.startswith("run_clm.py: error: --train_file bad.jsonl: line 2:") and message in line
    ), line
    assert not (tmp_path / "out").exists()


def test_a_dpo_run_keeps_the_nan_guard_and_the_disk_check(tmp_path, tiny_gpt2, monkeypatch, capsys):
    from collections import namedtuple

    import checkpoints

    write(tmp_path / "pairs.jsonl", pairs(64))
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", str(tiny_gpt2), "--train_file", "pairs.jsonl", "--do_train",
            "--output_dir", "out", "--per_device_train_batch_size", "4", "--logging_steps", "2"]  # fmt: skip
    with monkeypatch.context() as patched:
        usage = namedtuple("usage", "total used free")
        patched.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(2**30, 0, 2**20))
        with pytest.raises(SystemExit):
            run_clm.main(argv)
    assert "run_clm.py: error: --output_dir out: 1 MiB free, one checkpoint needs about" in capsys.readouterr().err  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        run_clm.main([*argv, "--learning_rate", "1e30", "--max_nonfinite_steps", "3", "--max_steps", "12"])  # fmt: skip
    assert stop.value.code == 2
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_clm.py: error: ")]  # fmt: skip
    assert error.startswith("run_clm.py: error: the loss was NaN/inf for "), error
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_preference_run_without_a_learning_rate_takes_trl_s_and_a_json_of_flags_is_a_command(tmp_path, tiny_gpt2, capsys):  # fmt: skip
    """A supervised run's default (5e-5) is 50 times DPO's and undoes a tuned model. HF's scripts
    also take the flags as one JSON file; it is checked and defaulted as the command line is."""
    write(tmp_path / "pairs.jsonl", pairs(8))
    flags = {"model_name_or_path": str(tiny_gpt2), "train_file": str(tmp_path / "pairs.jsonl"),
             "do_train": True, "output_dir": str(tmp_path / "out"), "max_steps": 2, "fp16": True,
             "per_device_train_batch_size": 4, "logging_steps": 1, "save_strategy": "no",
             "lr_scheduler_type": "constant", "eval_answers": 0}  # fmt: skip
    (tmp_path / "args.json").write_text(json.dumps(flags))
    run_clm.main([str(tmp_path / "args.json")])
    out = capsys.readouterr().out
    assert "--learning_rate not given: DPO trains at TRL's default, 1e-06." in out
    assert "--fp16 needs a CUDA GPU and none is here; training in fp32 instead." in out  # checked
    rates = [e["learning_rate"] for e in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] if "learning_rate" in e]  # fmt: skip
    assert rates == [1e-6, 1e-6]


def test_hub_pairs_of_whole_chats_are_split_into_prompt_and_answers_and_shown(tmp_path, tiny_gpt2, capsys):  # fmt: skip
    """The hub's usual DPO form has no prompt column: both answers carry the conversation.
    --show_examples prints the records as TRL renders them, and loads no weights."""
    import datasets

    def chat(answer: str) -> list[dict]:
        return [{"role": "user", "content": "Who is Prospero?"}, {"role": "assistant", "content": answer}]  # fmt: skip

    rows = [{"chosen": chat("The right Duke of Milan."), "rejected": chat("A fish.")}] * 4
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "pairs")
    run_clm.main(["--model_name_or_path", str(tiny_gpt2), "--dataset_name", str(tmp_path / "pairs"),
                  "--output_dir", str(tmp_path / "out"), "--show_examples", "1"])  # fmt: skip
    shown = capsys.readouterr().out
    lines = {line.split("]")[0] + "]": line for line in shown.splitlines() if line.startswith("[")}
    assert "Who is Prospero?" in shown.split("[chosen]")[0], shown  # in the prompt
    assert "The right Duke of Milan." in lines["[chosen]"] and "Prospero" not in lines["[chosen]"]
    assert "A fish." in lines["[rejected]"] and "Prospero" not in lines["[rejected]"]
    assert "Loading weights" not in shown and not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("data", "loss", "message"),
    [
        (
            "pairs",
            "nonsense",
            "--loss_type nonsense: DPO (chosen by the records) takes one of sigmoid, hinge, ipo,",
        ),
        (
            "labels",
            "ipo",
            "--loss_type ipo: KTO (chosen by the records) takes one of sigmoid, kto, apo_zero_unpaired.",
        ),
        (
            "pairs",
            "sigmoid --packing",
            "--packing: DPO records are batched by TRL, not packed; drop the flag.",
        ),
    ],
)
def test_a_flag_the_data_s_trainer_cannot_use_is_one_line_before_any_weights_load(tmp_path, tiny_gpt2, data, loss, message, capsys):  # fmt: skip
    records = (
        pairs(4) if data == "pairs" else [{"prompt": "Q", "completion": "A", "label": True}] * 4
    )
    write(tmp_path / "data.jsonl", records)
    with pytest.raises(SystemExit) as stop:
        run_clm.main(["--model_name_or_path", str(tiny_gpt2), "--train_file", str(tmp_path / "data.jsonl"),
                      "--do_train", "--output_dir", str(tmp_path / "out"), "--loss_type", *loss.split()])  # fmt: skip
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"run_clm.py: error: {message}"), err
    assert "Loading weights" not in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_dpo_trains_on_a_gpu(tmp_path, tiny_llama):
    """For a session with a GPU: the 4-bit base, its adapter switched off as the reference."""
    records = [{"prompt": f"Question {i}:", "chosen": " yes, gladly.", "rejected": " no."} for i in range(64)]  # fmt: skip
    write(tmp_path / "pairs.jsonl", records)
    argv = ["python", str(REPO / "run_clm.py"), "--model_name_or_path", str(tiny_llama), "--bf16",
            "--use_peft", "--load_in_4bit", "--train_file", "pairs.jsonl", "--do_train", "--do_eval",
            "--output_dir", "out", "--max_steps", "8", "--per_device_train_batch_size", "8",
            "--learning_rate", "5e-3", "--logging_steps", "1"]  # fmt: skip
    done = run(argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["eval_rewards/margins"] > 0, results
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
