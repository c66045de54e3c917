"""Pieces the benchmark scripts share: where the repo is, a text to train on, tables, the machine.

Importing this module puts the repo root and tests/ on sys.path, so the scripts can import
run_clm.py and tests/tiny.py the way a user's checkout lays them out.
"""

import datetime
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _folder in (REPO / "tests", REPO):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))


def sample_text(megabytes: float) -> str:
    """English prose with some code in it, about `megabytes` MB, built from the Python docs.

    Every Python ships pydoc's topic pages, so a benchmark needs no download when train.txt is
    missing; the text is repeated to reach the size, as a long book repeats its words.
    """
    from pydoc_data.topics import topics

    page = "\n\n".join(topics[name] for name in sorted(topics)) + "\n\n"
    wanted = int(megabytes * 1e6)
    return (page * (wanted // len(page) + 1))[:wanted]


def training_text(requested: Path | None, megabytes: float, scratch: Path) -> tuple[Path, str]:
    """The file to benchmark on and a one-line description of it.

    Order: the file asked for, else the repo's train.txt (the guide's Shakespeare), else a
    sample of `megabytes` MB written under `scratch`.
    """
    if requested is not None:
        return requested, f"{requested} ({requested.stat().st_size / 1e6:.1f} MB)"
    shakespeare = REPO / "train.txt"
    if shakespeare.is_file():
        return shakespeare, f"train.txt ({shakespeare.stat().st_size / 1e6:.1f} MB)"
    path = scratch / "train.txt"
    path.write_text(sample_text(megabytes), encoding="utf-8")
    return path, f"no train.txt: {megabytes:g} MB of Python's pydoc text instead"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A table that reads well in a terminal and pastes into BENCHMARKS.md unchanged."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), rule, *(line(r) for r in rows)])


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    print(f"\n### {title}\n", flush=True)
    print(markdown_table(columns, rows), flush=True)


def deepspeed_launcher() -> list[str]:
    """The `deepspeed --num_gpus=1` of the guide's command, on a port no other launch uses (two
    launches on the default one collide), before the script and its flags."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*runner, "--master_port", str(port), "--num_gpus=1"]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _spin(count: int) -> int:
    total = 0
    for i in range(count):
        total += i
    return total


def free_cores(count: int = 3_000_000) -> float:
    """How many cores this process really gets right now, from timing 1 and N copies of a busy loop.

    On a machine shared with other jobs, "all cores" may mean little more than one: the tables
    print this beside every multi-core figure so a reader can tell contention from code.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    start = time.perf_counter()
    _spin(count)
    alone = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        start = time.perf_counter()
        pool.map(_spin, [count] * cores)
        together = time.perf_counter() - start
    return cores * alone / together


def machine_line() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{datetime.date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} cores, "
        f"load average {load:.1f} at start; Python {platform.python_version()}, torch {torch.__version__}"
    )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table, or n/a when it was not measured."""
    if value is None or value != value:  # NaN is the only value unequal to itself
        return "n/a"
    return f"{value:,.{digits}f}"
