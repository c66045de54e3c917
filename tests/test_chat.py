"""Instruction data end to end: a tiny model learns the answers of examples/persons.jsonl through
the deepspeed launcher (packed, loss on the answers only), then answers a training question."""

import json
import shutil
import sys

import pytest

from launch import free_port, run, workdir
from tiny import REPO

sys.path.insert(0, str(REPO))
import run_generation


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_gpt2):
    folder = workdir(tmp_path_factory.mktemp("chat"))
    lines = (REPO / "examples" / "persons.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (folder / "qa.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = [
        "deepspeed", "--master_port", str(free_port()), "--num_gpus=1", "run_clm.py",
        "--deepspeed", "ds_config.json", "--model_name_or_path", str(tiny_gpt2),
        "--train_file", "qa.jsonl", "--validation_file", "qa.jsonl", "--do_train", "--do_eval",
        "--packing", "--output_dir", "qa", "--max_steps", "40", "--per_device_train_batch_size", "8",
        "--learning_rate", "1e-2", "--warmup_steps", "5", "--logging_steps", "10",
        "--eval_strategy", "steps", "--eval_steps", "40", "--eval_on_start", "--save_strategy", "no",
    ]  # fmt: skip
    done = run(argv, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, [json.loads(line) for line in lines], done.stdout + done.stderr


def test_the_eval_loss_on_the_answers_falls_far(trained):
    folder, _, log = trained
    assert "8 train / 8 eval examples" in log
    history = json.loads((folder / "qa" / "trainer_state.json").read_text())["log_history"]
    evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert evals[0] > 8 and evals[-1] < 0.5, evals  # from a random guess to knowing the answers


def test_each_evaluation_shows_the_model_answering_held_out_prompts(trained):
    _, records, log = trained
    shown = {line.split("[run_clm.py] ")[-1] for line in log.splitlines() if "held-out prompt" in line}  # fmt: skip
    assert len(shown) == 6, shown  # three prompts, at the evaluation before training and at step 40
    question, answer = (turn["content"] for turn in records[0]["messages"])
    [first] = [line for line in shown if line.startswith("step 40, held-out prompt 1:")]
    assert question in first and first.endswith(f"-> {answer!r}"), first


def test_the_trained_model_answers_a_training_question(trained, capsys):
    folder, records, _ = trained
    question, answer = (turn["content"] for turn in records[3]["messages"])
    argv = [
        "--model_name_or_path",
        str(folder / "qa"),
        "--chat",
        "--prompt",
        question,
        "--temperature",
        "0",
    ]
    [said] = run_generation.main(
        [*argv, "--length", "20"]
    )  # as the script runs it, in this process
    assert said.strip() == answer and answer in capsys.readouterr().out, (question, answer, said)
    # The chat format it was trained with is saved with it, for the generation scripts.
    shutil.copy(REPO / "chat_template.jinja", folder / "default.jinja")
    saved = json.loads((folder / "qa" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (folder / "qa" / "chat_template.jinja").read_text()
    assert template == (folder / "default.jinja").read_text()
