"""The benchmark scripts run at toy size and print their tables (no speed is asserted here)."""

import os
import re
import signal
import subprocess
import sys

import pytest

from launch import user_env
from tiny import REPO

BENCHMARKS = REPO / "benchmarks"
FLAGS = {
    # One core only: the all-cores process runs the same code unpinned, and costs 10 s more.
    "bench_data.py": ["--train_file", "{folder}/train.txt", "--repeats", "1", "--cores", "1"],
    # deepspeed's launch is the GPU benchmark's (benchlib.deepspeed_launcher), run below.
    "bench_train_cpu.py": [
        *("--layers", "1", "--width", "32", "--heads", "2", "--block_size", "32"),
        *("--batch", "2", "--accumulation", "2", "--steps", "3", "--warmup", "1"),
        *("--save_at", "2", "--variants", "plain", "lora", "--skip_compile"),
    ],
    "bench_gpu.py": [
        *("--toy", "--cpu", "--steps", "1", "--warmup", "1", "--only", "gpt2-xl/guide-15"),
        *("llama-3.1-8b/qlora-15/baseline", "llama-3.2-3b/lora-15/*", "gpt-neo-2.7B/generate"),
    ],
}


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    """Every benchmark started at once, then each test reads its own: they are mostly process
    start-up on one core, so on two cores together they take about as long as the longest."""
    folder = tmp_path_factory.mktemp("benchmarks")
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 800
    (folder / "train.txt").write_text(text)
    # One math thread each: three jobs on two cores would otherwise spin against each other.
    env = {**user_env(), "OMP_NUM_THREADS": "1"}
    running = {}
    for script, flags in FLAGS.items():
        # Files, not pipes: a pipe nobody reads yet would stall its writer.
        with open(folder / f"{script}.out", "w") as out, open(folder / f"{script}.err", "w") as err:
            filled = [flag.format(folder=folder) for flag in flags]
            command = [sys.executable, str(BENCHMARKS / script), *filled]
            running[script] = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
            )

    def finished(script: str) -> str:
        code = running[script].wait(timeout=300)
        stdout, stderr = ((folder / f"{script}.{end}").read_text() for end in ("out", "err"))
        assert code == 0, stdout[-3000:] + stderr[-3000:]
        return stdout

    yield finished
    for process in running.values():
        if process.poll() is None:  # a test failed before waiting for it
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def table(output: str, title_start: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the markdown table printed under a `### title...` line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"### {title_start}"))
    body = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            body.append([cell.strip() for cell in line.strip("|").split("|")])
        elif body:
            break
    header, rule, *rows = body
    assert all(set(cell) == {"-"} for cell in rule)
    return header, rows


def numbers(cells: list[str]) -> list[float]:
    return [float(re.sub(r"[,%x]", "", cell)) for cell in cells]


def test_data_benchmark_prints_each_tokenizers_paths_against_its_ceiling(benchmark):
    output = benchmark("bench_data.py")
    header, rows = table(output, "Data preparation")
    assert header == [
        "tokenizer",
        "path",
        "cores (free)",
        "tokens",
        "seconds",
        "tokens/s",
        "% of ceiling",
        "CPU s",
        "% of ceiling by CPU time",
    ]
    paths = [
        "tokenizer alone, batched (ceiling)",
        "run_clm's data path",
        "run_clm's data path, whole documents",
    ]
    names = ["gpt2", "llama", "qwen2"]
    assert [row[:2] for row in rows] == [[name, path] for name in names for path in paths]
    assert [row[2].split()[0] for row in rows] == ["1"] * 9
    for row in rows:
        assert min(numbers(row[3:])) > 0
    assert all(row[6] == row[8] == "100%" for row in rows[::3])
    header, rows = table(output, "Where run_clm's data path")
    assert header == ["tokenizer", "cores", "reading", "tokenizing", "grouping", "rest", "total"]
    assert [row[:2] for row in rows] == [[name, "1"] for name in names]
    # Each tokenizer's exact cut, checked against reading the document whole.
    for name, rule in (("gpt2", "'\\n'"), ("llama", "' '"), ("qwen2", "'\\n'")):
        assert (
            f"{name}: cut rule {rule}; whole-document blocks identical to run_clm's: yes" in output
        )
        assert re.search(
            rf"^goal \({name}\): run_clm's data path at 90% of the ceiling or more: (met|MISSED) "
            r"\(\d+% on 1 core\(s\)\)$",
            output,
            re.M,
        )


def test_cpu_training_benchmark_prices_lora_against_a_full_step(benchmark):
    output = benchmark("bench_train_cpu.py")
    header, rows = table(output, "Training on CPU")
    assert header == [
        "run",
        "s/step",
        "CPU s/step",
        "tokens/s",
        "speed vs plain",
        "by CPU time",
        "forward s",
        "backward s",
        "optimizer s",
        "other s",
        "checkpoint save s",
        "command s",
        "peak RSS GiB",
    ]
    assert [row[0] for row in rows] == ["plain", "lora"]
    assert rows[0][4] == rows[0][5] == "1.00x"
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        assert min(numbers([cells["s/step"], cells["CPU s/step"], cells["tokens/s"]])) > 0
        assert min(numbers([cells["speed vs plain"], cells["forward s"], cells["backward s"]])) > 0
        assert float(cells["optimizer s"]) >= 0
        assert float(cells["checkpoint save s"]) > 0  # a checkpoint was saved and timed
    assert re.search(
        r"^LoRA step / full step \(plain Trainer, same model, batch and checkpointing\): "
        r"\d+\.\d\d by wall time, \d+\.\d\d by CPU time$",
        output,
        re.M,
    )


def test_gpu_benchmark_runs_each_kind_of_row_at_toy_size_on_cpu(benchmark):
    output = benchmark("bench_gpu.py")
    header, rows = table(output, "Training on cpu (toy sizes)")
    assert header == [
        "row",
        "GPU cap",
        "setup",
        "batch x accum",
        "ckpt",
        "s/step",
        "examples/s",
        "tokens/s",
        "MFU",
        "HFU",
        "padding",
        "optimizer s",
        "fwd+bwd s",
        "peak GPU GiB",
        "peak host GiB",
        "fp16 skips",
        "target",
    ]
    cells = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    # Priority order, whatever order --only names them in.
    assert list(cells) == [
        "gpt2-xl/guide-15",
        "llama-3.1-8b/qlora-15/baseline",
        "llama-3.2-3b/lora-15/baseline",
        "llama-3.2-3b/lora-15/fast",
    ]
    guide = cells["gpt2-xl/guide-15"]
    assert [guide["GPU cap"], guide["batch x accum"], guide["ckpt"]] == ["none", "8 x 2", "yes"]
    assert guide["MFU"] == guide["peak GPU GiB"] == "n/a" and guide["padding"] == "0%"
    skipped = cells["llama-3.1-8b/qlora-15/baseline"]
    assert skipped["s/step"] == "skipped: QLoRA needs a CUDA GPU (bitsandbytes 4-bit)"
    for name in ("gpt2-xl/guide-15", "llama-3.2-3b/lora-15/baseline", "llama-3.2-3b/lora-15/fast"):
        row = cells[name]
        assert min(numbers([row["s/step"], row["examples/s"], row["tokens/s"]])) > 0
    # The same examples: padded to the longest of each batch, or packed without padding.
    assert numbers([cells["llama-3.2-3b/lora-15/baseline"]["padding"]])[0] > 0
    assert cells["llama-3.2-3b/lora-15/fast"]["padding"] == "0%"
    assert re.search(
        r"^speed-up llama-3.2-3b/lora-15: fast / baseline = \d+\.\d\dx tokens/s \(aim 1.5x: (met|MISSED)\)",
        output,
        re.M,
    )
    assert "llama-3.2-3b/lora-15/fast: without Liger's kernels: they need a CUDA GPU" in output
    assert (
        "gpt2-xl/guide-15: [run_clm.py] DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over "
        in output
    )
    assert "DeepSpeedCPUAdam, optimizer offloaded to cpu" in output
    header, rows = table(output, "Generation on cpu (toy sizes)")
    assert header == [
        "row",
        "setup",
        "new tokens",
        "seconds",
        "tokens/s",
        "speed vs plain",
        "same greedy tokens",
    ]
    assert [row[1] for row in rows] == [
        "transformers generate",
        "deepspeed.init_inference, kernel injection off (no GPU)",
    ]
    # Without kernel injection the wrapped model is the same model: the same tokens.
    assert [row[2] for row in rows] == ["8", "8"] and [row[6] for row in rows] == ["8/8", "8/8"]
    assert rows[0][5] == "1.00x" and numbers([rows[1][4]])[0] > 0
