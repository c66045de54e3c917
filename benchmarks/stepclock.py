"""A stopwatch inside the Trainer's loop: each optimizer step's wall time and where it went.

`timed(run_clm.GuardedTrainer, path)` gives a subclass that trains exactly as its base does and
writes, at the end of training, one record per optimizer step to `path` (JSON):
wall (from the end of the previous step to the end of this one: data loading, logging and all),
cpu (CPU seconds of all this process's threads over the same span: other jobs on a shared
machine stretch wall time but not this), forward, backward, optimizer (DeepSpeed's engine.step,
or clipping plus optimizer.step), the checkpoint saves that fell in it, what it trained on
(examples; tokens: real ones; slots: with padding; attention: the sum of each example's length
squared, for attention FLOPs), and whether the step was skipped (fp16 overflow).
On a GPU every reading waits for the GPU first, so time lands where the work was done.
"""

import json
import resource
import time
from itertools import pairwise
from pathlib import Path

import torch
from transformers import TrainerCallback

PARTS = ("forward", "backward", "optimizer", "save", "examples", "tokens", "slots", "attention")
# The clock of the training in progress, for code that cannot reach the Trainer (DeepSpeed's engine).
ACTIVE: "StepClock | None" = None


def sequence_lengths(inputs: dict) -> list[int]:
    """The real length of each example in a batch: from the attention mask of padded rows, from
    where position_ids restart in a packed row, else whole rows (blocks of running text)."""
    ids = inputs["input_ids"]
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum(dim=1).tolist()
    positions = inputs.get("position_ids")
    if positions is not None and ids.shape[0] == 1:
        starts = (positions[0] == 0).nonzero().flatten().tolist()
        return [end - start for start, end in pairwise([*starts, ids.shape[1]])]
    return [ids.shape[1]] * ids.shape[0]


def now() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock(TrainerCallback):
    """Collects the parts of the step in progress and closes a record at each step end."""

    def __init__(self, trainer, path: Path) -> None:
        self.trainer = trainer
        self.path = Path(path)
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.steps: list[dict] = []
        self.last_end = 0.0
        self.last_cpu = 0.0
        self.optimizer_start = 0.0

    def add(self, part: str, seconds: float) -> None:
        self.parts[part] += seconds

    def count(self, inputs: dict) -> None:
        lengths = sequence_lengths(inputs)
        self.add("examples", len(lengths))
        self.add("tokens", sum(lengths))
        self.add("slots", inputs["input_ids"].numel())
        self.add("attention", sum(n * n for n in lengths))

    def on_train_begin(self, args, state, control, **kwargs):
        global ACTIVE
        ACTIVE = self
        self.last_end = now()
        self.last_cpu = time.process_time()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer_start = now()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.add("optimizer", now() - self.optimizer_start)

    def on_step_end(self, args, state, control, **kwargs):
        end, cpu = now(), time.process_time()
        record = {
            "step": state.global_step,
            "wall": end - self.last_end,
            "cpu": cpu - self.last_cpu,
        }
        record.update(self.parts)
        record["skipped"] = bool(self.trainer.accelerator.optimizer_step_was_skipped)
        self.steps.append(record)
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.last_end, self.last_cpu = end, cpu

    def on_train_end(self, args, state, control, **kwargs):
        global ACTIVE
        ACTIVE = None
        # A save after the last step end belongs to no step; keep it with the last one.
        if self.steps and self.parts["save"]:
            self.steps[-1]["save"] += self.parts["save"]
        summary = {
            "steps": self.steps,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            summary["max_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
            summary["max_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
        if state.is_world_process_zero:
            self.path.write_text(json.dumps(summary, indent=1), encoding="utf-8")


def time_deepspeed_step() -> None:
    """DeepSpeed updates the weights inside backward, in engine.step: time it there."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return  # no DeepSpeed, no engine to time
    original = DeepSpeedEngine.step
    if getattr(original, "stepclock", False):
        return

    def step(self, *args, **kwargs):
        start = now()
        try:
            return original(self, *args, **kwargs)
        finally:
            if ACTIVE is not None:
                ACTIVE.add("optimizer", now() - start)

    step.stepclock = True
    DeepSpeedEngine.step = step


def timed(base: type, path: Path) -> type:
    """A subclass of the Trainer class `base` that records its steps to `path`."""
    time_deepspeed_step()

    class TimedTrainer(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.clock = StepClock(self, path)
            self.add_callback(self.clock)

        def compute_loss(self, model, inputs, *args, **kwargs):
            start = now()
            try:
                return super().compute_loss(model, inputs, *args, **kwargs)
            finally:
                self.clock.add("forward", now() - start)

        def training_step(self, model, inputs, *args, **kwargs):
            self.clock.count(inputs)  # before the clock starts: it may wait for the GPU
            before = dict(self.clock.parts)
            start = now()
            try:
                return super().training_step(model, inputs, *args, **kwargs)
            finally:
                elapsed = now() - start
                inside = sum(self.clock.parts[p] - before[p] for p in ("forward", "optimizer"))
                self.clock.add("backward", elapsed - inside)

        def _clip_grad_norm(self, model):
            start = now()
            try:
                return super()._clip_grad_norm(model)
            finally:
                self.clock.add("optimizer", now() - start)

        def _get_grad_norm(self, model, grad_norm=None):
            start = now()
            try:
                return super()._get_grad_norm(model, grad_norm=grad_norm)
            finally:
                self.clock.add("optimizer", now() - start)

        def _save_checkpoint(self, model, trial) -> None:
            start = now()
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.clock.add("save", now() - start)

    TimedTrainer.__name__ = f"Timed{base.__name__}"
    return TimedTrainer
