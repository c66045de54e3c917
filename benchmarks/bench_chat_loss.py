"""The loss of a chat fine-tune with a 152k vocabulary: time and peak memory, ours against TRL.

    python benchmarks/bench_chat_loss.py prepare /tmp/chat-bench
    farm-bench -n 3 --warmup 0 --timeout 1500 \
        --vs 'python benchmarks/bench_chat_loss.py logits /tmp/chat-bench' \
        -- python benchmarks/bench_chat_loss.py fused /tmp/chat-bench
    farm-bench -n 1 --warmup 0 --timeout 1200 \
        --vs 'python benchmarks/bench_chat_loss.py fused /tmp/chat-bench' \
        -- python benchmarks/bench_chat_loss.py trl /tmp/chat-bench

The setup of issue #19: a two-layer Qwen2 (hidden 64) with Qwen2's vocabulary of 151,936, 200
chats cut to 1024 tokens, batch 4, 8 optimizer steps, activations recomputed, on the CPU.
- fused: run_clm.py as shipped (fused_loss.py: the loss from chunks of the head);
- logits: run_clm.py with the full logits and transformers' own loss, as before the change;
- trl: TRL's SFTTrainer on the same records and model, assistant turns only.
Each prints its last loss, so the three can be compared for agreement too.
"""

import json
import sys
from pathlib import Path

import benchlib  # noqa: F401  (puts the repo root and tests/ on sys.path)
import torch
import trl
from transformers import Qwen2Config, Qwen2ForCausalLM

from tiny import REPO, qwen2_tokenizer

VOCAB, CHATS, LENGTH, BATCH, STEPS = 151_936, 200, 1024, 4, 8


def prepare(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=LENGTH, vocab_size=VOCAB,
                         tie_word_embeddings=True, eos_token_id=2)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder / "model")
    tokenizer = qwen2_tokenizer()  # Qwen2.5's own template, as TRL's package ships it
    tokenizer.chat_template = (
        Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja"
    ).read_text()
    tokenizer.save_pretrained(folder / "model")
    text = (REPO / "train.txt").read_text(encoding="utf-8")
    with open(folder / "chats.jsonl", "w", encoding="utf-8") as out:
        for n in range(CHATS):
            at = n * 7000
            chat = [
                {"role": "system", "content": "Continue the play."},
                {"role": "user", "content": text[at : at + 1500]},
                {"role": "assistant", "content": text[at + 1500 : at + 6000]},
            ]
            out.write(json.dumps({"messages": chat}) + "\n")


def run_ours(folder: Path, fused: bool) -> float:
    import fused_loss
    import run_clm

    if not fused:  # the path before: the model's own forward, full logits, transformers' loss
        fused_loss.fuse_loss = lambda model: None
    out = folder / f"out-{'fused' if fused else 'logits'}"
    run_clm.main(["--model_name_or_path", str(folder / "model"), "--train_file", str(folder / "chats.jsonl"),
                  "--do_train", "--output_dir", str(out), "--overwrite_output_dir", "--block_size", str(LENGTH),
                  "--per_device_train_batch_size", str(BATCH), "--max_steps", str(STEPS),
                  "--save_strategy", "no", "--logging_steps", "1", "--report_to", "none"])  # fmt: skip
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [e["loss"] for e in history if "loss" in e][-1]


def run_trl(folder: Path) -> float:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    args = SFTConfig(output_dir=str(folder / "out-trl"), max_length=LENGTH, per_device_train_batch_size=BATCH,
                     max_steps=STEPS, gradient_checkpointing=True, assistant_only_loss=True,
                     save_strategy="no", logging_steps=1, report_to="none", use_cpu=True)  # fmt: skip
    data = load_dataset("json", data_files=str(folder / "chats.jsonl"), split="train")
    trainer = SFTTrainer(
        model=str(folder / "model"), args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    return [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]


def main() -> None:
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "prepare":
        prepare(folder)
        return
    loss = run_trl(folder) if mode == "trl" else run_ours(folder, fused=mode == "fused")
    print(f"{mode}: last loss {loss:.4f}")


if __name__ == "__main__":
    main()
