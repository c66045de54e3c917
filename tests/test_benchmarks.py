"""The benchmark scripts run at toy size and print their tables (no speed is asserted here)."""

import re
import subprocess
import sys

from launch import user_env
from tiny import REPO

BENCHMARKS = REPO / "benchmarks"


def run_benchmark(script: str, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *flags],
        cwd=REPO,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


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


def test_data_benchmark_prints_throughput_of_each_path_against_the_ceiling(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 800)
    # One core only: the all-cores process runs the same code unpinned, and costs 10 s more.
    output = run_benchmark(
        "bench_data.py", "--train_file", str(text), "--repeats", "1", "--cores", "1"
    )
    header, rows = table(output, "Data preparation")
    assert header == [
        "path",
        "cores (free)",
        "tokens",
        "seconds",
        "tokens/s",
        "% of ceiling",
        "CPU s",
        "% of ceiling by CPU time",
    ]
    assert [row[0] for row in rows] == [
        "tokenizer alone, batched (ceiling)",
        "run_clm.tokenize()",
        "run_clm.tokenize(), whole documents",
    ]
    assert [row[1].split()[0] for row in rows] == ["1"] * 3
    for row in rows:
        assert min(numbers(row[2:])) > 0
    assert rows[0][5] == rows[0][7] == "100%"
    header, rows = table(output, "Where run_clm.tokenize()")
    assert header == ["cores", "hashing for the cache", "tokenizing", "grouping", "rest", "total"]
    assert len(rows) == 1
    assert "whole-document blocks identical to run_clm's: yes" in output
    assert re.search(
        r"^goal: run_clm.tokenize\(\) at 90% of the ceiling or more: (met|MISSED)", output, re.M
    )


def test_cpu_training_benchmark_compares_deepspeed_with_the_plain_trainer():
    output = run_benchmark(
        "bench_train_cpu.py",
        *("--layers", "1", "--width", "32", "--heads", "2", "--block_size", "32"),
        *("--batch", "2", "--accumulation", "2", "--steps", "3", "--warmup", "1"),
        *("--save_at", "2", "--variants", "deepspeed", "plain", "--skip_compile"),
    )
    header, rows = table(output, "Training on CPU")
    assert header[:6] == [
        "run",
        "s/step",
        "CPU s/step",
        "tokens/s",
        "speed vs plain",
        "by CPU time",
    ]
    assert header[6:] == [
        "forward s",
        "backward s",
        "optimizer s",
        "other s",
        "checkpoint save s",
        "command s",
        "peak RSS GiB",
    ]
    assert [row[0] for row in rows] == ["deepspeed", "plain"]
    assert rows[1][4] == rows[1][5] == "1.00x"
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        assert min(numbers([cells["s/step"], cells["CPU s/step"], cells["tokens/s"]])) > 0
        assert min(numbers([cells["forward s"], cells["backward s"]])) > 0
        assert float(cells["optimizer s"]) >= 0
        assert float(cells["checkpoint save s"]) > 0  # a checkpoint was saved and timed
    assert "deepspeed: [run_clm.py] DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over " in output
    assert "DeepSpeedCPUAdam, optimizer offloaded to cpu" in output


def test_gpu_benchmark_runs_its_code_path_at_toy_size_on_cpu():
    output = run_benchmark(
        "bench_gpu.py",
        *("--toy", "--cpu", "--models", "gpt2-xl", "--modes", "capped"),
        *("--steps", "1", "--warmup", "1"),
    )
    header, rows = table(output, "GPU benchmark on cpu (toy sizes)")
    assert header[:6] == ["model", "mode", "GPU cap", "batch x accum", "ckpt", "s/step"]
    assert {"examples/s", "tokens/s", "MFU", "optimizer s", "fwd+bwd s"} <= set(header)
    assert {"peak GPU GiB", "peak host GiB"} <= set(header)
    (row,) = rows
    assert row[:5] == ["gpt2-xl", "capped", "none", "8 x 2", "yes"]
    cells = dict(zip(header, row, strict=True))
    assert float(cells["s/step"]) > 0 and float(cells["examples/s"]) > 0
    assert cells["MFU"] == "n/a" and cells["peak GPU GiB"] == "n/a"
    assert "DeepSpeedCPUAdam, optimizer offloaded to cpu" in output
