"""Preemption and crashes lose nothing: SIGTERM checkpoints and resumes, SIGKILL mid-save is survived."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch import free_port, losses, run_clm_plain, user_env, workdir
from tiny import REPO


def training_text() -> str:
    lines = [f"Scene {i}: {word} doth {verb} upon the {thing}." for i, (word, verb, thing) in enumerate(
        [("Hamlet", "muse", "ramparts"), ("Ophelia", "sing", "brook"), ("Horatio", "gaze", "ghost")] * 120
    )]  # fmt: skip
    return "\n".join(lines)


def command(model: Path, script: str = "run_clm.py", max_steps: int = 12) -> list[str]:
    return [
        "deepspeed", "--master_port", str(free_port()), "--num_gpus=1", script,
        "--deepspeed", "ds_config.json", "--model_name_or_path", str(model), "--train_file", "train.txt",
        "--do_train", "--output_dir", "out", "--max_steps", str(max_steps), "--block_size", "64",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
    ]  # fmt: skip


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    """Its own process group, like a training run on a machine that gets preempted."""
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_group(process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until every process of the run (launcher and workers) is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError("training did not stop in time")


def finish(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(
        argv, cwd=cwd, env=user_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def complete_checkpoints(output_dir: Path) -> list[str]:
    return sorted(
        p.name for p in output_dir.glob("checkpoint-*") if (p / "checkpoint-complete").is_file()
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2) -> dict[int, float]:
    """Losses of the same run, never interrupted."""
    folder = workdir(tmp_path_factory.mktemp("uninterrupted"))
    (folder / "train.txt").write_text(training_text(), encoding="utf-8")
    finish(command(tiny_gpt2), folder)
    return losses(folder / "out")


def test_training_lowers_the_loss(reference):
    """Twelve optimizer steps through ZeRO-2 and DeepSpeedCPUAdam on a small repetitive text: it learns."""
    assert sorted(reference) == list(range(1, 13))
    assert reference[12] < reference[1] - 0.5, reference  # untrained, it would hover near 10.8


def test_sigterm_checkpoints_and_the_same_command_resumes(tmp_path, tiny_gpt2, reference):
    folder = workdir(tmp_path)
    (folder / "train.txt").write_text(training_text(), encoding="utf-8")
    argv = command(tiny_gpt2)
    run = start(argv, folder)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if line.count("'loss'") and sum(x.count("'loss'") for x in seen) >= 3:
            os.killpg(run.pid, signal.SIGTERM)  # what a cloud does to a preempted machine
            break
    seen.extend(run.stdout)
    run.wait()
    wait_for_group(run)
    log = "".join(seen)
    assert "SIGTERM received: finishing this step, then saving a checkpoint." in log
    assert "Run the same command again to resume." in log
    out = folder / "out"
    saved = complete_checkpoints(out)
    assert len(saved) == 1, log[-3000:]
    stopped_at = int(saved[0].split("-")[1])
    assert 3 <= stopped_at < 12
    assert not (out / "model.safetensors").exists()

    resumed = finish(argv, folder)
    assert f"resuming from out/checkpoint-{stopped_at}" in resumed
    after = losses(out)
    assert sorted(after) == list(range(1, 13))
    for step in range(stopped_at + 1, 13):
        assert after[step] == pytest.approx(reference[step], rel=1e-5), (
            step,
            after[step],
            reference[step],
        )
    assert (out / "model.safetensors").is_file()


BLOCKING_SAVE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import run_clm

save = run_clm.SealingTrainer._save_optimizer_and_scheduler

def save_then_hang(self, output_dir):
    # The second checkpoint: model weights are written, optimizer states are not. Hang here.
    if self.state.global_step == 4:
        Path("SAVING").write_text(output_dir)
        time.sleep(3600)
    save(self, output_dir)

run_clm.SealingTrainer._save_optimizer_and_scheduler = save_then_hang
run_clm.main()
"""


def test_sigkill_while_saving_resumes_from_the_previous_checkpoint(tmp_path, tiny_gpt2):
    folder = workdir(tmp_path)
    (folder / "train.txt").write_text(training_text(), encoding="utf-8")
    (folder / "blocking_save.py").write_text(BLOCKING_SAVE.format(repo=str(REPO)))
    extra = ["--save_steps", "2", "--save_total_limit", "1"]
    run = start(command(tiny_gpt2, "blocking_save.py", max_steps=6) + extra, folder)
    deadline = time.monotonic() + 300
    while not (folder / "SAVING").exists():
        assert run.poll() is None, run.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "never reached the second checkpoint"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)  # power cut in the middle of writing checkpoint-4
    run.wait()
    wait_for_group(run)
    out = folder / "out"
    assert (out / "checkpoint-4").is_dir() and not (
        out / "checkpoint-4" / "checkpoint-complete"
    ).exists()
    # The older checkpoint must not have been rotated away before the newer one was complete.
    assert complete_checkpoints(out) == ["checkpoint-2"]

    resumed = finish(command(tiny_gpt2, max_steps=6) + extra, folder)
    assert "removing out/checkpoint-4: it was being written when the last run stopped." in resumed
    assert "resuming from out/checkpoint-2" in resumed
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert complete_checkpoints(out) == ["checkpoint-6"]  # --save_total_limit 1 honoured


def test_overwrite_output_dir_starts_fresh(tmp_path, tiny_gpt2):
    """The one way to retrain a finished run: old checkpoints go, training starts at step 1."""
    out = tmp_path / "out"
    shutil.copytree(tiny_gpt2, out)
    (out / "all_results.json").write_text('{"train_loss": 1.0}')
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "checkpoint-complete").write_text("sealed\n")
    (tmp_path / "train.txt").write_text(training_text(), encoding="utf-8")
    flags = [
        "--overwrite_output_dir",
        "--max_steps",
        "2",
        "--block_size",
        "32",
        "--logging_steps",
        "1",
    ]
    done = run_clm_plain(tmp_path, tiny_gpt2, *flags, "--save_strategy", "no")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "--overwrite_output_dir: deleting 1 old checkpoint(s) in out, starting fresh."
        in done.stdout
    )
    assert not (out / "checkpoint-3").exists()
    assert sorted(losses(out)) == [1, 2]
    assert json.loads((out / "all_results.json").read_text())["train_loss"] != 1.0
