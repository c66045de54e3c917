import atexit
import os
import re
import shutil
import sys
import tempfile
import time

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

from tiny import REPO, family_tokenizer, save_tiny


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


def release_deepspeed_buffers(min_age: float) -> None:
    """Delete DeepSpeed's CPU allreduce buffers in /dev/shm that no live process maps. Every rank of
    every run on the CPU makes one (69 MB of RAM) and DeepSpeed never unlinks it: a machine that
    had run the suite a few times ran out of memory, and the next suite hung. `min_age` spares a
    buffer that its rank has created but not yet mapped."""
    found = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))
    if not found:
        return
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(
                re.findall(r"/dev/shm/(deepspeed_allreduce_buffer_\S+)", maps.read_text())
            )
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
    for path in found:
        try:
            if path.name not in mapped and time.time() - path.stat().st_mtime >= min_age:
                path.unlink()
        except FileNotFoundError:  # the other worker released it
            continue


@pytest.fixture(autouse=True)
def _release_deepspeed_buffers():
    yield
    release_deepspeed_buffers(min_age=60)  # the other worker's run may be starting up


def pytest_sessionstart(session):
    """Before the workers start (xdist's own hook runs last): free what earlier sessions leaked, and
    build DeepSpeed's CPU ops once. Left to the first runs, both workers compiled at once under
    load, for over 5 minutes on a new machine, and the runs' time limits cut into the builds."""
    if hasattr(session.config, "workerinput"):
        return
    release_deepspeed_buffers(min_age=0)
    sys.path.insert(0, str(REPO))
    from deepspeed.accelerator import get_accelerator

    import checkpoints  # a lock left by a killed build would stall this one

    checkpoints.release_build_locks()
    for op in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        get_accelerator().create_op_builder(op).load(verbose=False)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):
        release_deepspeed_buffers(min_age=0)
