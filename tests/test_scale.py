"""More than one process: ranks agree, stop together and resume; ZeRO-3; several nodes.

Two ranks run on this CPU through the real deepspeed launcher (gloo), as they would on two GPUs.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from launch import (
    complete_checkpoints,
    free_port,
    losses,
    python_warnings,
    read_until_losses,
    run,
    start,
    user_env,
    wait_for_group,
    workdir,
)
from tiny import gpt2_tokenizer

TEXT = "\n".join(
    f"{i}: Now is the winter of our discontent made glorious summer." for i in range(300)
)
STEPS = 16
# The guide-era config people still have: explicit numbers, a scheduler, the old offload key.
DS_2021 = {
    "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 3e-7}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-5, "warmup_num_steps": 500}},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 2e8,
                          "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 2e8,
                          "contiguous_gradients": True, "cpu_offload": True},
    "train_batch_size": 16,  # and no micro-batch size or clipping: the flags' values fill them
    "steps_per_print": 2000,
    "wall_clock_breakdown": False,
}  # fmt: skip


def command(model: Path, ranks: int, batch: int, out: str, config: str = "ds_config.json", *extra: str) -> list[str]:  # fmt: skip
    return [
        "deepspeed", "--master_port", str(free_port()), f"--num_gpus={ranks}", "run_clm.py",
        "--deepspeed", config, "--model_name_or_path", str(model), "--train_file", "train.txt",
        "--do_train", "--output_dir", out, "--max_steps", str(STEPS), "--block_size", "32",
        "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-3", "--logging_steps", "1",
        "--fp16", *extra,
    ]  # fmt: skip


def finish(argv: list[str], folder: Path) -> str:
    done = run(argv, cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not python_warnings(done.stderr), python_warnings(done.stderr)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def no_dropout_model(tmp_path_factory) -> Path:
    """Dropout draws different masks on different ranks; without it both layouts compute the same thing."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-gpt2-nodropout"
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = workdir(tmp_path_factory.mktemp("scale"))
    (path / "train.txt").write_text(TEXT, encoding="utf-8")
    (path / "ds_config_2021.json").write_text(json.dumps(DS_2021, indent=2), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_rank(folder, no_dropout_model) -> str:
    """One process, batch 4, with the 2021 config."""
    return finish(command(no_dropout_model, 1, 4, "one", "ds_config_2021.json"), folder)


@pytest.fixture(scope="module")
def two_ranks(folder, no_dropout_model) -> dict[int, float]:
    """Two processes, batch 2 each: the same global batch of 4. Never interrupted."""
    finish(command(no_dropout_model, 2, 2, "two"), folder)
    return losses(folder / "two")


def test_a_2021_config_trains_with_the_command_lines_numbers(one_rank, folder):
    assert "DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over DeepSpeedCPUAdam, optimizer offloaded to cpu" in one_rank  # fmt: skip
    notes = [
        line for line in one_rank.splitlines() if "the command line decides, not the JSON" in line
    ]
    assert len(notes) == 1, one_rank[-3000:]
    for change in ('"cpu_offload" is now "offload_optimizer": {"device": "cpu"}',
                   "scheduler WarmupLR -> --lr_scheduler_type linear", "optimizer.params.lr 3e-05 -> 0.001",
                   "fp16.enabled true -> false"):  # fmt: skip
        assert change in notes[0], notes[0]
    steps = losses(folder / "one")
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert steps[STEPS] < steps[1] - 0.5, steps  # it learns: the 2021 warm-up from 0 is gone


def test_two_ranks_partition_zero2_and_match_one_rank(one_rank, two_ranks, folder):
    shards = sorted(p.name for p in (folder / "two" / f"checkpoint-{STEPS}" / f"global_step{STEPS}").glob("*optim_states.pt"))  # fmt: skip
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip
    one = losses(folder / "one")
    assert sorted(one) == sorted(two_ranks) == list(range(1, STEPS + 1))
    for step in one:
        # Same examples, same updates; only the order of floating-point sums differs.
        assert two_ranks[step] == pytest.approx(one[step], rel=1e-4), (step, one, two_ranks)


def rank_pids(out: str, rank: str = "[0-9]") -> list[int]:
    """The training processes (not the launchers) of a run, as `pgrep` finds them."""
    pattern = f"run_clm.py --local_rank={rank} .*--output_dir {out} "
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def stop(folder: Path, model: Path, out: str, how: str, after: int, ranks: int) -> tuple[str, int]:
    """Start (or resume) a run, signal it `after` logged steps; its log and its stop step."""
    run_ = start(command(model, ranks, 2, out, "ds_config.json", "--save_total_limit", "1"), folder)
    seen = read_until_losses(run_, after)
    if how == "group":  # what systemd, SLURM's scancel and Ctrl-C do
        os.killpg(run_.pid, signal.SIGTERM)
    elif how == "one rank":  # a scheduler that signals one process, or the launcher's one-by-one
        (rank,) = rank_pids(out, "1")
        os.kill(rank, signal.SIGTERM)
    else:  # `kill` of the deepspeed command, which forwards nothing on one node
        os.kill(run_.pid, signal.SIGTERM)
    seen.extend(run_.stdout)
    log = "".join(seen)
    assert wait_for_group(run_) < 60 and not rank_pids(out), log[-3000:]
    assert "checkpoint saved. Run the same command again to resume." in log, log[-3000:]
    # One complete checkpoint, with every rank's optimizer shard; nothing half-written beside it.
    (saved,) = complete_checkpoints(folder / out)
    assert list((folder / out).glob("checkpoint-*")) == [folder / out / saved]
    step = int(saved.split("-")[1])
    assert (
        len(list((folder / out / saved / f"global_step{step}").glob("*optim_states.pt"))) == ranks
    )
    return log, step


def test_however_a_run_is_stopped_on_whatever_number_of_gpus_it_resumes_onto_the_same_losses(folder, no_dropout_model, two_ranks):  # fmt: skip
    """Stopped three ways, and resumed each time on the GPUs a spot market gives back (2, 2, 1,
    then 2 to finish): it ends on the uninterrupted two-rank run's losses, step for step."""
    stops, legs = [], [("launcher", 2), ("one rank", 2), ("group", 1)]
    for how, ranks in legs:
        log, step = stop(folder, no_dropout_model, "stopped", how, 2 if stops else 3, ranks)
        if stops:
            assert f"resuming from stopped/checkpoint-{stops[-1]}" in log
        if how != "launcher":
            assert "SIGTERM received: finishing this step, then saving a checkpoint." in log
        stops.append(step)
    assert stops == sorted(set(stops)) and stops[-1] < STEPS, stops
    # Two ranks' checkpoint read by one (above), one rank's read by two (below): one line each
    # says how the global batch of 4 is kept, and DeepSpeed's states are converted once.
    assert (
        f"checkpoint-{stops[1]} was saved by 2 rank(s), this run has 1: --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 2 keep its global batch of 4 examples." in log
    ), log[-3000:]
    resumed = finish(command(no_dropout_model, 2, 2, "stopped", "ds_config.json", "--save_total_limit", "1"), folder)  # fmt: skip
    assert f"resuming from stopped/checkpoint-{stops[-1]}" in resumed
    assert (
        f"checkpoint-{stops[-1]} was saved by 1 rank(s), this run has 2: --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 1 keep its global batch of 4 examples." in resumed
    ), resumed[-3000:]
    assert resumed.count("to DeepSpeed's universal form (once)") == 1
    after = losses(folder / "stopped")
    assert sorted(after) == list(range(1, STEPS + 1))
    for step in after:
        # The same examples in each step; only the order of floating-point sums differs.
        assert after[step] == pytest.approx(two_ranks[step], rel=1e-4), (step, stops, after, two_ranks)  # fmt: skip


def zero3(model: Path, ranks: int, out: str, *extra: str) -> list[str]:
    """A ZeRO-3 run in bf16 with the command line's batch of 4 a rank; on one rank it starts as
    `python run_clm.py --deepspeed ...`, one process and no launcher."""
    argv = command(model, ranks, 4, out, "ds_config_zero3.json", "--max_steps", "8", *extra)
    argv = [a for a in argv if a != "--fp16"] + ["--bf16"]
    return argv if ranks > 1 else ["python", *argv[argv.index("run_clm.py") :]]


@pytest.fixture(scope="module")
def zero3_full(folder, no_dropout_model) -> str:
    return finish(zero3(no_dropout_model, 1, "z3-full", "--save_strategy", "no"), folder)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_zero3_trains_in_bf16_and_saves_a_normal_model_folder(folder, tiny_gpt2, no_dropout_model, lora, request):  # fmt: skip
    """--bf16 on a CPU works (the script sets use_cpu); ZeRO-3 gathers the weights at save, or
    the LoRA adapter, which is then merged into the base model. The full run is one process
    with no launcher; the LoRA run has two ranks, whose weights ZeRO-3 splits as they load (it
    once failed there, before the ranks had met)."""
    out = f"z3-{'lora' if lora else 'full'}"
    if lora:
        argv = command(tiny_gpt2, 2, 2, out, "ds_config_zero3.json", "--max_steps", "4", "--save_strategy", "no")  # fmt: skip
        log = finish([a for a in argv if a != "--fp16"] + ["--bf16", "--use_peft"], folder)
    else:
        log, tiny_gpt2 = request.getfixturevalue("zero3_full"), no_dropout_model
    assert "DeepSpeed ZeRO stage 3: DeepSpeedZeroOptimizer_Stage3 over DeepSpeedCPUAdam" in log
    reloaded = AutoModelForCausalLM.from_pretrained(folder / out)
    original = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert reloaded.num_parameters() == original.num_parameters()
    # Trained, gathered whole: every weight is present, and what was trained moved.
    trained = (
        reloaded.transformer.h[0].attn.c_attn.weight if lora else reloaded.transformer.wte.weight
    )
    before = (
        original.transformer.h[0].attn.c_attn.weight if lora else original.transformer.wte.weight
    )
    assert not torch.equal(trained, before.to(trained.dtype))
    assert reloaded.dtype == (
        torch.float32 if lora else torch.bfloat16
    )  # LoRA merges into the base as saved
    if lora:
        assert torch.equal(reloaded.transformer.wte.weight, original.transformer.wte.weight)


def test_an_output_dir_the_nodes_do_not_share_is_refused_on_every_node(tmp_path, tiny_gpt2):
    """Two "nodes" on this machine: each sees its own out/, as on nodes without a shared disk."""
    port, nodes = str(free_port()), []
    for rank in (0, 1):
        node = workdir(tmp_path / f"node{rank}")
        (node / "train.txt").write_text(TEXT, encoding="utf-8")
        argv = ["torchrun", "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1",
                "--master_addr=127.0.0.1", f"--master_port={port}", "run_clm.py",
                "--model_name_or_path", str(tiny_gpt2), "--train_file", "train.txt", "--do_train",
                "--output_dir", "out", "--max_steps", "2", "--block_size", "32"]  # fmt: skip
        nodes.append(subprocess.Popen(argv, cwd=node, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    began = time.monotonic()
    for process in nodes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode != 0
        errors = [line for line in stderr.splitlines() if line.startswith("run_clm.py: error: ")]
        assert errors and "--output_dir out: not shared by all nodes" in errors[0] and "--save_on_each_node" in errors[0], stderr[-3000:]  # fmt: skip
    assert time.monotonic() - began < 120
    assert not (tmp_path / "node0" / "out" / "checkpoint-1").exists()


def test_a_zero3_run_stopped_on_one_gpu_resumes_on_two_onto_the_same_losses(folder, no_dropout_model, zero3_full):  # fmt: skip
    """Stopped by SIGTERM as `python run_clm.py`, finished by the deepspeed launcher on two ranks:
    the per-device batch halves to keep the global batch, and the curve goes on, not restarts."""
    process = start(zero3(no_dropout_model, 1, "z3-stopped"), folder)
    seen = read_until_losses(process, 3)
    process.send_signal(signal.SIGTERM)
    seen.extend(process.stdout)
    assert wait_for_group(process) < 60
    assert "checkpoint saved. Run the same command again to resume." in "".join(seen)
    (saved,) = complete_checkpoints(folder / "z3-stopped")
    stopped_at = int(saved.split("-")[1])
    assert 3 <= stopped_at < 8
    resumed = finish(zero3(no_dropout_model, 2, "z3-stopped"), folder)
    assert (
        f"{saved} was saved by 1 rank(s), this run has 2: --per_device_train_batch_size 2 "
        "--gradient_accumulation_steps 1 keep its global batch of 4 examples." in resumed
    ), resumed[-3000:]
    after, reference = losses(folder / "z3-stopped"), losses(folder / "z3-full")
    assert sorted(after) == sorted(reference) == list(range(1, 9))
    # A resume that silently started afresh (DeepSpeed #6691) would be back near step 1's loss.
    assert reference[stopped_at + 1] < reference[1] - 0.1, reference
    for step in after:
        assert after[step] == pytest.approx(reference[step], rel=1e-3), (step, after, reference)


def test_a_conversion_killed_midway_is_done_again_and_the_disk_is_checked_first(folder, two_ranks, tmp_path, monkeypatch):  # fmt: skip
    """The universal form counts only once `latest_universal` is written, after every file."""
    import shutil
    import sys

    sys.path.insert(0, str(folder))
    import checkpoints
    from common import UserError

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip

    saved = folder / "two" / f"checkpoint-{STEPS}"
    checkpoint, clean = tmp_path / "out" / saved.name, tmp_path / "clean" / saved.name
    shutil.copytree(saved, checkpoint)
    shutil.copytree(saved, clean)
    original = files(checkpoint)
    full = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(shutil, "disk_usage", lambda _: full._replace(free=2**20))
        with pytest.raises(UserError, match=f"1 MiB free, converting {saved.name} for another number of ranks needs about"):  # fmt: skip
            checkpoints.universal(checkpoint, 2)
    assert files(checkpoint) == original  # refused before anything was written

    def killed_midway(argv, **kwargs):
        # Its own process group: the converter and the workers it starts die together.
        converter = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        merged = checkpoint / "universal.partial" / f"global_step{STEPS}_universal" / "zero"
        while not (merged.is_dir() and any(merged.iterdir())):
            assert converter.poll() is None, "the conversion ended before it could be killed"
            time.sleep(0.002)
        os.killpg(converter.pid, signal.SIGKILL)  # as a power cut or a second preemption would
        converter.wait()
        raise SystemExit(137)

    with monkeypatch.context() as patched:
        patched.setattr(subprocess, "run", killed_midway)
        with pytest.raises(SystemExit):
            checkpoints.universal(checkpoint, 2)
    assert not (checkpoint / "latest_universal").exists()
    checkpoints.universal(checkpoint, 2)  # the rerun converts again, from the start
    checkpoints.universal(clean, 2)  # and the same states, converted without a kill
    converted = files(checkpoint)
    assert converted == files(clean)
    assert {name: converted[name] for name in original} == original  # the original states stay
    assert not (checkpoint / "universal.partial").exists()
    assert (checkpoint / "latest_universal").read_text() == f"global_step{STEPS}_universal"
    left = subprocess.run(["pgrep", "-f", f"ds_to_universal --input_folder {checkpoint}"], capture_output=True)  # fmt: skip
    assert not left.stdout, left.stdout  # no worker outlives the kill
