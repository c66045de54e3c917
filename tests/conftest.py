import atexit
import os
import shutil
import tempfile

# Tests never reach the hub or wandb's servers, and DeepSpeed should not guess the accelerator.
# Set before anything imports transformers, which reads some of these once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized data is cached per test session, not in the user's ~/.cache, and never reused later.
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="finetune-tests-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

from pathlib import Path

import pytest

from tiny import family_tokenizer, save_tiny


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A saved two-layer GPT-2 with the real GPT-2 tokenizer (read-only: copy it to change it)."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-gpt2", "gpt2")


@pytest.fixture(scope="session")
def tiny_neo(tmp_path_factory) -> Path:
    """A saved two-layer GPT-Neo with the GPT-2 tokenizer (read-only: copy it to change it)."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-neo", "gpt_neo")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved two-layer Llama with a SentencePiece-style tokenizer (BOS, no pad) from train.txt."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    """A saved two-layer Qwen2 with a byte-level tokenizer and a ChatML chat template."""
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen", "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """A saved two-layer Qwen3 whose tokenizer carries Qwen3's own chat template (from TRL)."""
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen3"
    # 1024 positions: a chat with tools holds Qwen3's long tool instructions.
    return save_tiny(folder, "qwen3", tokenizer=family_tokenizer("qwen3"), positions=1024)


# The files that launch the most runs, first. xdist hands out whole files (--dist loadfile) in
# collection order; one of these started last would leave the other worker idle at the end.
LONGEST_FIRST = ("test_train.py", "test_scale.py", "test_preference.py", "test_resume.py", "test_readme.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    order = {name: at for at, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # the rest as collected
