"""Crashes lose nothing: SIGKILL mid-save, a crash in evaluation, and starting afresh on purpose.

(SIGTERM and resuming on two ranks: test_scale.py; a LoRA run stopped and resumed: test_train.py.)
"""

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from torch.utils.cpp_extension import _get_build_directory
from transformers import GPT2Config, GPT2LMHeadModel

from launch import (  # fmt: skip
    complete_checkpoints,
    free_port,
    losses,
    replace_flag,
    run,
    run_clm_plain,
    start,
    wait_for_group,
    workdir,
)
from tiny import REPO, save_tiny

sys.path.insert(0, str(REPO))
import run_clm


def training_text() -> str:
    lines = [f"Scene {i}: {word} doth {verb} upon the {thing}." for i, (word, verb, thing) in enumerate(
        [("Hamlet", "muse", "ramparts"), ("Ophelia", "sing", "brook"), ("Horatio", "gaze", "ghost")] * 120
    )]  # fmt: skip
    return "\n".join(lines)


BLOCKING_SAVE = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import run_clm

save = run_clm.GuardedTrainer._save_optimizer_and_scheduler

def save_then_hang(self, output_dir):
    # The second checkpoint: model weights are written, optimizer states are not. Hang here.
    if self.state.global_step == 4:
        Path("SAVING").write_text(output_dir)
        time.sleep(3600)
    save(self, output_dir)

run_clm.GuardedTrainer._save_optimizer_and_scheduler = save_then_hang
run_clm.main()
"""


def command(model, script: str = "run_clm.py", max_steps: int = 6) -> list[str]:
    return [
        "deepspeed", "--master_port", str(free_port()), "--num_gpus=1", script,
        "--deepspeed", "ds_config.json", "--model_name_or_path", str(model), "--train_file", "train.txt",
        "--do_train", "--output_dir", "out", "--max_steps", str(max_steps), "--block_size", "64",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--logging_steps", "1",
        "--save_steps", "2", "--save_total_limit", "1",
    ]  # fmt: skip


def test_sigkill_while_saving_resumes_from_the_previous_checkpoint(tmp_path, tiny_gpt2):
    folder = workdir(tmp_path)
    (folder / "train.txt").write_text(training_text(), encoding="utf-8")
    (folder / "blocking_save.py").write_text(BLOCKING_SAVE.format(repo=str(REPO)))
    process = start(command(tiny_gpt2, "blocking_save.py"), folder)
    deadline = time.monotonic() + 300
    while not (folder / "SAVING").exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "never reached the second checkpoint"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # power cut in the middle of writing checkpoint-4
    wait_for_group(process)
    out = folder / "out"
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / "checkpoint-complete").exists()  # fmt: skip
    # The older checkpoint must not have been rotated away before the newer one was complete.
    assert complete_checkpoints(out) == ["checkpoint-2"]

    # The kill could as well have hit DeepSpeed's first build of its CPU Adam. The lock file that
    # build leaves made every later run wait forever.
    ops = shutil.copytree(Path(_get_build_directory("cpu_adam", False)).parent, tmp_path / "ops")
    (ops / "cpu_adam" / "lock").touch()
    done = run(command(tiny_gpt2), cwd=folder, timeout=300, env={"TORCH_EXTENSIONS_DIR": str(ops)})
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"removed {ops / 'cpu_adam' / 'lock'}: a build of DeepSpeed's ops was killed midway; it builds again." in done.stdout  # fmt: skip
    assert (
        "removing out/checkpoint-4: it was being written when the last run stopped." in done.stdout
    )
    assert "resuming from out/checkpoint-2" in done.stdout
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    assert complete_checkpoints(out) == ["checkpoint-6"]  # --save_total_limit 1 honoured


def test_a_crash_during_evaluation_leaves_the_run_resumable_not_finished(tmp_path, tiny_gpt2, monkeypatch, capsys):  # fmt: skip
    (tmp_path / "train.txt").write_text(training_text(), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    argv = ["--model_name_or_path", str(tiny_gpt2), "--train_file", "train.txt", "--do_train",
            "--do_eval", "--output_dir", "out", "--max_steps", "4", "--block_size", "32",
            "--save_steps", "2"]  # fmt: skip

    def crash(self, *args, **kwargs):
        raise RuntimeError("the machine died during evaluation")

    with monkeypatch.context() as patched:
        patched.setattr(run_clm.GuardedTrainer, "evaluate", crash)
        with pytest.raises(RuntimeError, match="died during evaluation"):
            run_clm.main(argv)
    assert not (tmp_path / "out" / "all_results.json").exists()  # trained, but not finished
    capsys.readouterr()
    run_clm.main(argv)
    assert "resuming from out/checkpoint-4" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert "eval_loss" in results and "train_loss" in results


def test_overwrite_output_dir_starts_fresh(tmp_path, tiny_gpt2, monkeypatch, capsys):
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


def test_a_rerun_that_changes_the_run_resumes_nothing_and_the_same_command_resumes(tmp_path, tiny_gpt2, capsys, monkeypatch):  # fmt: skip
    """An interrupted run's checkpoints are never resumed by another run, nor lost to a rerun of
    the same command that carries --overwrite_output_dir (a requeue script holding it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text(training_text(), encoding="utf-8")
    argv = ["--model_name_or_path", str(tiny_gpt2), "--train_file", "train.txt", "--do_train",
            "--output_dir", "out", "--block_size", "32", "--max_steps", "2", "--save_steps", "1",
            "--logging_steps", "1"]  # fmt: skip
    run_clm.main(argv)
    (tmp_path / "out" / "all_results.json").unlink()  # as if stopped after checkpoint-2
    kept = sorted(p.name for p in (tmp_path / "out").iterdir())
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_clm.main(replace_flag(argv, "--block_size", "16"))
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "run_clm.py: error: --output_dir out: holds checkpoints of another run (--block_size was "
        "32, now 16); pass --overwrite_output_dir to start over, or --resume_from_checkpoint "
        "out/checkpoint-2 to continue from it anyway."
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == kept
    run_clm.main([*argv, "--overwrite_output_dir"])
    assert (
        "--overwrite_output_dir: out holds this same run, stopped at checkpoint-2; resuming it, "
        "not deleting it (delete the folder to start over)." in capsys.readouterr().out
    )
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_a_torchrun_run_on_two_ranks_resumes_in_one_process_with_the_same_global_batch(tmp_path, monkeypatch, capsys):  # fmt: skip
    """Without DeepSpeed the optimizer file is whole: only the batch has to change shape."""
    folder = workdir(tmp_path)
    (folder / "train.txt").write_text(training_text(), encoding="utf-8")
    save_tiny(folder / "m", "gpt2")  # then without dropout, which draws per rank
    config = GPT2Config.from_pretrained(folder / "m", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    GPT2LMHeadModel.from_pretrained(folder / "m", config=config).save_pretrained(folder / "m")
    flags = ["run_clm.py", "--model_name_or_path", "m", "--train_file", "train.txt", "--do_train",
             "--output_dir", "out", "--max_steps", "4", "--block_size", "32", "--save_steps", "2",
             "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1"]  # fmt: skip
    done = run(["torchrun", "--nproc_per_node=2", "--master_port", str(free_port()), *flags], cwd=folder)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = losses(folder / "out")
    # As if the machine died after checkpoint-2; it comes back with one GPU and no launcher.
    shutil.rmtree(folder / "out" / "checkpoint-4")
    (folder / "out" / "all_results.json").unlink()
    monkeypatch.chdir(folder)
    capsys.readouterr()
    run_clm.main(flags[1:])
    assert (
        "checkpoint-2 was saved by 2 rank(s), this run has 1: --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 2 keep its global batch of 4 examples."
    ) in capsys.readouterr().out
    after = losses(folder / "out")
    assert sorted(after) == sorted(reference) == [1, 2, 3, 4]
    assert reference[3] != pytest.approx(reference[1], rel=1e-2)  # a fresh start would show
    for step in after:
        assert after[step] == pytest.approx(reference[step], rel=1e-4), (step, after, reference)


def test_the_global_batch_is_kept_on_any_number_of_gpus_that_can_share_it():
    import checkpoints
    from common import UserError

    def shape(ranks: int, batch: int, steps: int) -> dict:
        return {"ranks": ranks, "per_device_train_batch_size": batch, "gradient_accumulation_steps": steps}  # fmt: skip

    where = Path("out/checkpoint-6")
    assert checkpoints.batch_for(shape(2, 2, 1), 1, 2, where) == (2, 2)  # fewer GPUs: accumulate
    assert checkpoints.batch_for(shape(2, 2, 1), 1, 1, where) == (1, 4)  # never past the command's
    assert checkpoints.batch_for(shape(1, 4, 2), 2, 4, where) == (
        4,
        1,
    )  # more GPUs: less accumulation
    assert checkpoints.batch_for(shape(1, 8, 1), 4, 8, where) == (2, 1)  # or a smaller batch each
    with pytest.raises(UserError) as refused:
        checkpoints.batch_for(shape(2, 2, 1), 3, 2, where)
    assert str(refused.value) == (
        "--num_gpus: out/checkpoint-6 was trained with a global batch of 4 examples, which 3 ranks "
        "cannot share evenly; resume on 1, 2, 4 GPUs in all, or pass --overwrite_output_dir to "
        "start over on this machine."
    )


def test_a_build_lock_on_a_filesystem_other_machines_share_is_left_to_them(tmp_path):
    """On a cluster's NFS home another node may be building DeepSpeed's ops right now: its lock
    is held by no process of this machine, yet is no leftover."""
    import checkpoints

    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\nserver:/scratch /scratch fuse.sshfs rw 0 0\n")  # fmt: skip
    shared = [checkpoints.network_filesystem(Path(p), mounts) for p in ("/home/ada/.cache/torch_extensions/cpu_adam/lock", "/scratch/x", "/tmp/x", "/homework/x")]  # fmt: skip
    assert shared == [True, True, False, False]
