"""What a run shows besides its losses: the engine that really trains, the model answering a few
held-out prompts at each evaluation (log, TensorBoard, wandb), and the loss curve it leaves."""

import math
import os
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments

from common import say

PROG = "run_clm.py"


def wandb_offline_unless_logged_in(training: TrainingArguments) -> None:
    """`--report_to wandb` with no API key would crash at the first log: record offline instead."""
    if (
        "wandb" not in training.report_to
        or os.environ.get("WANDB_MODE")
        or os.environ.get("WANDB_API_KEY")
    ):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(encoding="utf-8", errors="replace"):
        return
    os.environ["WANDB_MODE"] = "offline"
    say(
        PROG,
        "wandb: no API key (run `wandb login` to log online); recording offline under ./wandb/. "
        "Upload it later with `wandb sync wandb/offline-run-*`.",
    )


class ReportEngine(transformers.TrainerCallback):
    """Say which engine really trains, so a log shows ZeRO and the CPU optimizer are in use."""

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if getattr(args, "hf_deepspeed_config", None) is None:
            return
        chain, layer = [], optimizer
        while layer is not None and len(chain) < 6:
            if type(layer).__name__ not in ("AcceleratedOptimizer", "DeepSpeedOptimizerWrapper"):
                chain.append(type(layer).__name__)
            layer = getattr(layer, "optimizer", None)
        zero = args.hf_deepspeed_config.config.get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device", "none")
        say(
            PROG,
            f"DeepSpeed ZeRO stage {zero.get('stage', 0)}: {' over '.join(chain)}, optimizer offloaded to {offload}",
        )


def held_out_prompts(eval_set, tokenizer, count: int = 3) -> list[list[int]]:
    """The token ids of the first few held-out prompts: the text before an example's first
    trained token, or a preference record's prompt. Text blocks have none."""
    prompts = []
    for row in eval_set.select(range(min(count, len(eval_set)))) if eval_set is not None else []:
        if "labels" in row:
            trained = [i for i, label in enumerate(row["labels"]) if label != -100]
            if trained and trained[0] > 0:
                prompts.append(row["input_ids"][: trained[0]])
        elif isinstance(row.get("prompt"), list):
            prompts.append(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False))  # fmt: skip
        elif isinstance(row.get("prompt"), str):
            prompts.append(tokenizer(row["prompt"])["input_ids"])
    return prompts


class ShowAnswers(transformers.TrainerCallback):
    """At each evaluation the model answers a few held-out prompts, in the log and in
    TensorBoard or wandb when they are on: what it learned, not only a loss."""

    def __init__(self, prompts: list[list[int]], tokenizer, handler) -> None:
        self.prompts, self.tokenizer, self.handler = prompts, tokenizer, handler
        self.shown = -1  # the final evaluation may repeat the last step's

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        from transformers.integrations import TensorBoardCallback, is_deepspeed_zero3_enabled

        if state.global_step == self.shown:
            return
        self.shown = state.global_step
        rows = []
        for number, ids in enumerate(self.prompts, start=1):
            prompt = torch.tensor([ids], device=model.device)
            with torch.no_grad():  # every rank generates: ZeRO-3 gathers the weights together
                out = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                    do_sample=False, synced_gpus=is_deepspeed_zero3_enabled(), use_cache=True,
                )  # fmt: skip
            answer = self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
            question = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            shown = question if len(question) <= 80 else "..." + question[-77:]  # its end asks
            rows.append([state.global_step, question, answer])
            say(PROG, f"step {state.global_step}, held-out prompt {number}: {shown!r} -> {answer!r}")  # fmt: skip
        if not state.is_world_process_zero or not rows:
            return
        text = "\n\n".join(f"{q}\n-> {a}" for _, q, a in rows)
        for callback in self.handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
                callback.tb_writer.add_text("eval/answers", text, state.global_step)
        if "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=["step", "prompt", "answer"], data=rows)
                wandb.log({"eval/answers": table}, commit=False)


def plot_losses(log_history: list[dict], path: Path) -> dict[str, list[tuple[int, float]]]:
    """Train and eval loss against step, so a finished run shows at a glance how it went.
    Returns the points drawn, by curve."""
    import matplotlib

    matplotlib.use("Agg")  # no screen on a training box
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(7, 4))
    drawn = {}
    curves = [("loss", "train loss"), ("eval_loss", "eval loss")]
    # DPO and KTO runs: how far the model prefers the chosen answers, beside the loss.
    curves += [("eval_rewards/margins", "eval reward margin"), ("eval_rewards/accuracies", "eval reward accuracy")]  # fmt: skip
    for key, label in curves:
        points = [(e["step"], e[key]) for e in log_history if key in e and math.isfinite(e[key])]
        if points:
            drawn[label] = points
            axes.plot(
                *zip(*points, strict=True), marker="o" if len(points) < 30 else None, label=label
            )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set(xlabel="optimizer step", ylabel="loss" if len(drawn) < 3 else "loss, reward", title=path.parent.name)  # fmt: skip
    axes.grid(alpha=0.3)
    if drawn:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return drawn
