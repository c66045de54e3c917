"""Checkpoints that survive preemption, and the decisions every rank of a run takes together.

- A checkpoint counts only once every file in it is on disk and a `checkpoint-complete` marker
  is written last; older ones are rotated out only after that (`Sealer`).
- A stop (SIGTERM, Ctrl-C, or the launcher that started this rank going away) is agreed on by
  all ranks at the end of an optimizer step, so they save one checkpoint together (`StopOnSignal`).
- A loss that stays NaN or infinite ends the run on every rank at the same step (`NonFiniteGuard`,
  fed each micro-step's loss by `GuardedTrainer`).
- On several nodes, every node must see the --output_dir rank 0 writes (`check_shared_output_dir`).
- Re-running the same command resumes from the newest complete checkpoint (`resume_plan`).
- A build of DeepSpeed's ops killed midway leaves no lock that stalls the rerun (`release_build_locks`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from common import UserError, is_main_process, say

PROG = "run_clm.py"
COMPLETE_MARKER = "checkpoint-complete"
# Written last, after training and evaluation both succeeded: its presence means "finished".
FINAL_MARKER = "all_results.json"
RUN_FILE = "run.json"  # what the run in --output_dir is: a rerun that differs is another run
# The stop reason shared by all ranks when the launcher is gone: it is SIGHUP's job description.
LAUNCHER_GONE = int(signal.SIGHUP)
# What a launcher's process runs, as its command line shows it.
LAUNCHERS = ("deepspeed.launcher.launch", "torchrun", "torch.distributed.run")
# Filesystems that several machines mount (fuse.sshfs and the like count by their last part).
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "glusterfs", "sshfs", "wekafs"}  # fmt: skip


def checkpoints_in(output_dir: Path) -> list[Path]:
    """checkpoint-N folders, oldest step first."""
    found = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[1]
        if path.is_dir() and step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).is_file()


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename, so a crash leaves the old file or the new one."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text, encoding="utf-8")
    fsync_path(scratch)
    os.replace(scratch, path)
    fsync_path(path.parent)


def seal(checkpoint: Path, shape: dict) -> None:
    """Mark a checkpoint complete once every file in it is on disk, so a power cut cannot fake one.
    The marker also records the machine shape that wrote it, which a resume elsewhere needs."""
    for path in sorted(checkpoint.rglob("*"), reverse=True):
        fsync_path(path)
    fsync_path(checkpoint)
    write_atomically(checkpoint / COMPLETE_MARKER, json.dumps(shape, indent=1))


def shape_of(training: TrainingArguments) -> dict:
    return {
        "ranks": training.world_size,
        "per_device_train_batch_size": training.per_device_train_batch_size,
        "gradient_accumulation_steps": training.gradient_accumulation_steps,
    }


def prune(output_dir: Path, keep: int | None, protect: Path | None) -> None:
    """Drop the oldest complete checkpoints beyond --save_total_limit, never the newest one."""
    if not keep or keep <= 0:
        return
    complete = [c for c in checkpoints_in(output_dir) if is_complete(c)]
    for old in complete[: max(0, len(complete) - keep)]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def agreed_max(value: torch.Tensor) -> int:
    """The largest of `value` over all ranks (the value itself in a one-process run)."""
    if dist.is_available() and dist.is_initialized():
        value = value.to(PartialState().device, dtype=torch.float32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def wait_for_everyone() -> None:
    if dist.is_available() and dist.is_initialized():
        PartialState().wait_for_everyone()


class Sealer(TrainerCallback):
    """Seals each checkpoint after all ranks wrote their part, then applies --save_total_limit.

    The Trainer's own rotation runs before a checkpoint is complete, so it is switched off
    (save_total_limit None) and done here, after the seal.
    """

    def __init__(self, keep: int | None) -> None:
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        wait_for_everyone()
        if args.should_save:
            output_dir = Path(args.output_dir)
            seal(output_dir / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", shape_of(args))
            best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
            prune(output_dir, self.keep, best)
        wait_for_everyone()


class StopOnSignal(TrainerCallback):
    """SIGTERM, Ctrl-C, or a launcher gone: every rank finishes the step, checkpoints it, stops.

    The deepspeed launcher signals its ranks one after another and a scheduler may signal just
    one, so a rank that saw nothing still has to stop at the same step as the one that did:
    the stop reason is all-reduced at the end of every optimizer step.
    """

    def __init__(self) -> None:
        self.received = 0
        self.reason = 0  # agreed by all ranks: a signal number, LAUNCHER_GONE, or 0
        self.previous = {
            sig: signal.signal(sig, self._note) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        self.watched = watched_launcher()

    def on_train_end(self, args, state, control, **kwargs):
        # A caller of run_clm.main() in its own process gets its signal handlers back.
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, _frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.received = signum
        say(
            PROG,
            f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint.",
            every_rank=True,
        )

    def launcher_gone(self) -> bool:
        """True once the process that launched this rank, or the command above it, has exited."""
        for pid, parent in self.watched:
            try:
                if psutil.Process(pid).ppid() != parent:
                    return True
            except psutil.NoSuchProcess:
                return True
        return False

    def on_step_end(self, args, state, control, **kwargs):
        local = self.received or (LAUNCHER_GONE if self.watched and self.launcher_gone() else 0)
        self.reason = agreed_max(torch.tensor(local))
        if self.reason:
            if self.reason == LAUNCHER_GONE and not self.received:
                say(PROG, "the launcher is gone: saving a checkpoint, then stopping.")
            control.should_save = True
            control.should_training_stop = True
        return control


def watched_launcher() -> list[tuple[int, int]]:
    """(pid, its parent) pairs to watch under a launcher; nothing for a plain `python run_clm.py`.

    Under `deepspeed` on one node, a rank's parent is deepspeed.launcher.launch and its parent
    the `deepspeed` command, which has no signal handler: `kill` of it leaves the ranks training
    on with nobody to stop them. Under torchrun the parent is the elastic agent. A shell or a
    scheduler that started this process itself is not watched: `nohup` outlives its shell.
    """
    parent = psutil.Process(os.getppid())
    command = " ".join(parent.cmdline())
    launcher = next((name for name in LAUNCHERS if name in command), None)
    if launcher is None:
        return []
    watched = [(os.getpid(), parent.pid)]
    if launcher == "deepspeed.launcher.launch":
        watched.append((parent.pid, parent.ppid()))
    return watched


class NonFiniteGuard(TrainerCallback):
    """Stops every rank together when the loss was NaN/inf for too many micro-steps in a row.

    Losses are counted on the device as they come (no host sync per micro-step); the ranks
    compare counts only when the Trainer logs, saves or stops anyway.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak: torch.Tensor | None = None
        self.worst: torch.Tensor | None = None

    def observe(self, loss: torch.Tensor) -> None:
        if self.limit <= 0:
            return
        bad = ~torch.isfinite(loss.detach())
        if self.streak is None:
            self.streak = torch.zeros((), device=loss.device)
            self.worst = torch.zeros((), device=loss.device)
        self.streak = torch.where(bad, self.streak + 1, torch.zeros_like(self.streak))
        self.worst = torch.maximum(self.worst, self.streak)

    def on_step_end(self, args, state, control, **kwargs):
        if self.limit <= 0 or not (
            control.should_log or control.should_save or control.should_training_stop
        ):
            return control
        worst = agreed_max(self.worst if self.worst is not None else torch.zeros(()))
        if self.worst is not None:
            self.worst = self.streak.clone()
        if worst >= self.limit:
            raise UserError(
                f"the loss was NaN/inf for {worst} micro-steps in a row (by step {state.global_step}); "
                "training on it would only ruin the model. Try --bf16 instead of --fp16 (GPT-Neo "
                "overflows in fp16), a lower --learning_rate, or more --warmup_steps."
            )
        return control


class Guarded:
    """A Trainer (HF's, or TRL's), showing each micro-step's loss to the NaN guard (no host sync)."""

    guard = NonFiniteGuard(0)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe(loss)
        return loss


class GuardedTrainer(Guarded, Trainer):
    pass


def check_shared_output_dir(output_dir: Path, training: TrainingArguments) -> None:
    """On several nodes, rank 0 saves for all: every node must see the same --output_dir."""
    local = int(
        os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or training.world_size
    )
    if training.world_size <= local or training.save_on_each_node or not dist.is_initialized():
        return
    token = [uuid.uuid4().hex]
    dist.broadcast_object_list(token, src=0)
    probe = output_dir / f".shared-{token[0]}"
    if is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("rank 0 wrote this; every node should see it\n", encoding="utf-8")
    wait_for_everyone()
    unseen = agreed_max(torch.tensor(int(not probe.exists())))
    wait_for_everyone()
    if is_main_process():
        probe.unlink()
    if unseen:
        raise UserError(
            f"--output_dir {output_dir}: not shared by all nodes (a node cannot see what rank 0 writes "
            "there), so checkpoints would be incomplete; put it on a filesystem every node mounts, or "
            "pass --save_on_each_node."
        )


@dataclass
class ResumePlan:
    """Where to start, and what to delete first, decided before anything is deleted."""

    checkpoint: str | None = None
    delete: list[Path] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    finished: bool = False  # the folder holds this run's finished model: nothing to do


def run_identity(model_args, lora, data) -> dict:
    """What a run is, flag by flag: a rerun that changes one of these is another run."""

    def described(path: str | None) -> str | None:
        return (
            f"{path} ({Path(path).stat().st_size:,} bytes)"
            if path and Path(path).is_file()
            else path
        )

    return {
        "--model_name_or_path": model_args.model_name_or_path or model_args.model_type,
        "--config_overrides": model_args.config_overrides,
        "--train_file": described(data.train_file),
        "--dataset_name": data.dataset_name,
        "--block_size": data.block_size,
        "--use_peft": lora.use_peft,
        "--lora_r": lora.lora_r if lora.use_peft else None,
        "--load_in_4bit": lora.load_in_4bit,
    }


def changes(output_dir: Path, identity: dict) -> list[str]:
    """How this command's run differs from the one whose checkpoints are in `output_dir`."""
    saved = output_dir / RUN_FILE
    if not saved.is_file():
        return []  # a folder from before run.json was written: nothing to compare with
    before = json.loads(saved.read_text(encoding="utf-8"))
    return [
        f"{flag} was {before.get(flag)}, now {value}"
        for flag, value in identity.items()
        if before.get(flag) != value
    ]


def resume_plan(output_dir: Path, overwrite: bool, explicit: str | None, identity: dict) -> ResumePlan:  # fmt: skip
    """The checkpoint to continue from and the folders to clear, or that the run is finished."""
    if explicit:
        if not is_complete(Path(explicit)):
            raise UserError(
                f"--resume_from_checkpoint {explicit}: not a complete checkpoint (no {COMPLETE_MARKER} "
                "file); pick another checkpoint-N folder or drop the flag."
            )
        return ResumePlan(checkpoint=explicit)
    if not output_dir.is_dir():
        return ResumePlan()
    found = checkpoints_in(output_dir)
    complete = [c for c in found if is_complete(c)]
    finished = (output_dir / FINAL_MARKER).is_file() and (output_dir / "config.json").is_file()
    changed = changes(output_dir, identity)
    plan = ResumePlan()
    # A requeue script or restart loop repeats the whole command, --overwrite_output_dir
    # included: an interrupted run of this same command resumes rather than being deleted.
    same_run = complete and not finished and not changed and (output_dir / RUN_FILE).is_file()
    if overwrite and same_run:
        plan.messages.append(
            f"--overwrite_output_dir: {output_dir} holds this same run, stopped at {complete[-1].name}; "
            "resuming it, not deleting it (delete the folder to start over)."
        )
    elif overwrite:
        # Without the old run's results, an interrupted fresh run resumes instead of being called finished.
        old = [
            output_dir / name for name in (FINAL_MARKER, RUN_FILE) if (output_dir / name).exists()
        ]
        message = f"--overwrite_output_dir: deleting {len(found)} old checkpoint(s) in {output_dir}, starting fresh."
        return ResumePlan(delete=found + old, messages=[message] if found else [])
    elif finished:
        return ResumePlan(finished=True)
    elif changed and complete:
        raise UserError(
            f"--output_dir {output_dir}: holds checkpoints of another run ({'; '.join(changed)}); "
            f"pass --overwrite_output_dir to start over, or --resume_from_checkpoint {complete[-1]} "
            "to continue from it anyway."
        )
    for checkpoint in found:
        if not is_complete(checkpoint):
            plan.delete.append(checkpoint)
            plan.messages.append(
                f"removing {checkpoint}: it was being written when the last run stopped."
            )
    if complete:
        plan.checkpoint = str(complete[-1])
        plan.messages.append(
            f"resuming from {complete[-1]} (pass --overwrite_output_dir to start fresh)."
        )
    return plan


def resume_command() -> str:
    """The command that started this process, as typed: the launcher, the script, its flags."""
    flags = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
    ranks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or "1"
    if any(arg.startswith("--local_rank") for arg in sys.argv[1:]):  # the deepspeed launcher's
        launcher = ["deepspeed", f"--num_gpus={ranks}"]
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = ["torchrun", f"--nproc_per_node={ranks}"]
    else:
        launcher = ["python"]
    return shlex.join([*launcher, sys.argv[0], *flags])


def saved_shape(checkpoint: Path) -> dict | None:
    """The ranks and batch that wrote `checkpoint`, from its marker (None: sealed before markers held them)."""
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def batch_for(saved: dict, ranks: int, most: int, checkpoint: Path) -> tuple[int, int]:
    """The per-device batch (the largest up to the command's `most`) and accumulation steps that
    keep the saved run's global batch on `ranks` ranks: the data position and the learning-rate
    schedule are counted in optimizer steps, so a step must take as many examples as before."""
    total = saved["ranks"] * saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"]  # fmt: skip
    for steps in range(1, total // ranks + 1):
        batch, left = divmod(total, ranks * steps)
        if not left and batch <= most:
            return batch, steps
    fits = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
    raise UserError(
        f"--num_gpus: {checkpoint} was trained with a global batch of {total} examples, which "
        f"{ranks} ranks cannot share evenly; resume on {fits} GPUs in all, or pass "
        "--overwrite_output_dir to start over on this machine."
    )


def reshape(training: TrainingArguments, checkpoint: Path) -> None:
    """Resume on another number of ranks than saved `checkpoint`: the same global batch, and
    DeepSpeed's optimizer states in its universal form, which any number of ranks can load."""
    saved = saved_shape(checkpoint)
    if saved is None or saved["ranks"] == training.world_size:
        return
    most = training.per_device_train_batch_size
    batch, steps = batch_for(saved, training.world_size, most, checkpoint)
    say(
        PROG,
        f"{checkpoint.name} was saved by {saved['ranks']} rank(s), this run has {training.world_size}: "
        f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {steps} keep its "
        f"global batch of {batch * steps * training.world_size} examples.",
    )
    training.per_device_train_batch_size, training.gradient_accumulation_steps = batch, steps
    if not training.deepspeed:
        return  # the Trainer's optimizer.pt is whole, whatever the number of ranks
    universal(checkpoint, saved["ranks"])
    # As the Trainer rebuilds it for a hyperparameter search: the JSON's "auto"s take the new batch.
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    training.deepspeed = {**training.deepspeed, "checkpoint": {"load_universal": True}}
    training.hf_deepspeed_config = HfTrainerDeepSpeedConfig(training.deepspeed)
    training.hf_deepspeed_config.trainer_config_process(training)
    training.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=training.hf_deepspeed_config)


def universal(checkpoint: Path, ranks: int) -> None:
    """Convert the DeepSpeed states in `checkpoint` once, on rank 0, beside the originals. Sealed:
    `latest_universal` is written last, so a conversion killed midway is simply done again."""
    tag = (checkpoint / "latest").read_text(encoding="utf-8").strip()
    converted, partial = checkpoint / f"{tag}_universal", checkpoint / "universal.partial"
    problem = [None]
    if is_main_process() and not (checkpoint / "latest_universal").is_file():
        for leftover in (partial, converted):
            shutil.rmtree(leftover, ignore_errors=True)
        # The converter's scratch slices and its output each take about what the states take.
        states = sum(f.stat().st_size for f in (checkpoint / tag).rglob("*") if f.is_file())
        say(PROG, f"converting {checkpoint.name} for {readable(states)} of states to DeepSpeed's universal form (once).")  # fmt: skip
        try:
            check_disk(checkpoint, 2 * states, f"converting {checkpoint.name} for another number of ranks")  # fmt: skip
            done = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(checkpoint / tag), "--output_folder", str(partial / converted.name),
                 "--inject_missing_state"],
                capture_output=True, text=True,
            )  # fmt: skip
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                raise UserError(
                    f"{checkpoint}: DeepSpeed could not convert it for another number of ranks "
                    f"({last}); resume on {ranks} GPU(s), as it was saved."
                )
            for path in sorted((partial / converted.name).rglob("*"), reverse=True):
                fsync_path(path)
            os.replace(partial / converted.name, converted)
            write_atomically(checkpoint / "latest_universal", converted.name)
            shutil.rmtree(partial)
        except UserError as error:
            problem = [str(error)]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)  # and every rank waits for the conversion
    if problem[0]:
        raise UserError(problem[0])


def carry_out(plan: ResumePlan) -> None:
    """Delete what the plan names (rank 0 only), once the data and the model have been checked."""
    for message in plan.messages:
        say(PROG, message)
    if is_main_process():
        for path in plan.delete:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    wait_for_everyone()


def checkpoint_bytes(saved: int, trainable: int, weight_bytes: int, deepspeed: bool) -> int:
    """Disk one checkpoint takes: the weights it saves (the model, or only a LoRA adapter) and
    Adam's two moments for each trainable parameter, in the weights' dtype; DeepSpeed adds its own
    copy of the weights and keeps fp32 master weights and moments (12 bytes a parameter)."""
    if deepspeed:
        return 2 * saved * weight_bytes + 12 * trainable
    return saved * weight_bytes + 2 * weight_bytes * trainable


def check_disk(output_dir: Path, needed: int, what: str = "one checkpoint") -> None:
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(
            f"--output_dir {output_dir}: {readable(free)} free, {what} needs about "
            f"{readable(needed)}; free space, or point --output_dir at a bigger disk."
        )


def readable(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def release_build_locks() -> None:
    """torch compiles DeepSpeed's CPU Adam on a machine's first run, behind a lock file that only
    a finished build removes. A run killed while compiling (preempted, out of memory) leaves it,
    and every later run waits on it forever, silently. A lock that no process of this machine
    holds open is such a leftover, unless the folder is shared with other machines (a cluster's
    home on NFS), where another node may be building. Every rank looks before its first build."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]  # <root>[/<accelerator>]/<op>/lock
    if not locks or not Path("/proc/self/fd").is_dir():
        return
    held = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            held.add(os.readlink(fd))
        except OSError:  # closed meanwhile, or another user's process
            continue
    for lock in locks:
        if os.path.realpath(lock) in held:
            continue
        if network_filesystem(lock):
            say(PROG, f"{lock} may be a build of DeepSpeed's ops on another machine; if none is building, delete it or this run waits on it forever.")  # fmt: skip
            continue
        try:
            lock.unlink()
        except FileNotFoundError:  # another rank of this machine got there first
            continue
        say(PROG, f"removed {lock}: a build of DeepSpeed's ops was killed midway; it builds again.")  # fmt: skip


def network_filesystem(path: Path, mounts: Path = Path("/proc/mounts")) -> bool:
    """Whether `path` lies on a filesystem that other machines mount too."""
    where = os.path.realpath(path)
    mounted = [line.split()[1:3] for line in mounts.read_text().splitlines()]
    holding = [(point, kind) for point, kind in mounted if where == point or where.startswith(point.rstrip("/") + "/")]  # fmt: skip
    _, kind = max(holding, key=lambda mount: len(mount[0]), default=("", ""))
    return kind.split(".")[-1] in NETWORK_FILESYSTEMS
