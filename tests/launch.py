"""Run the repo's commands the way a user types them, from a scratch folder that looks like the repo."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tiny import REPO

SCRIPTS = [
    "run_clm.py",
    "clm_data.py",
    "chats.py",
    "fused_loss.py",
    "checkpoints.py",
    "preference.py",
    "reports.py",
    "common.py",
    "deepspeed_json.py",
    "chat_template.jinja",
    "text2csv.py",
    "generation.py",
    "run_generation.py",
    "run_generate_neo.py",
    "will_it_fit.py",
    "memory_plan.py",
    "published_configs.json",
    "ds_config.json",
    "ds_config_gptneo.json",
    "ds_config_zero3.json",
]


def workdir(path: Path) -> Path:
    """A folder where `run_clm.py`, `ds_config.json` & co. resolve as they do in the repo."""
    path.mkdir(parents=True, exist_ok=True)
    for name in SCRIPTS:
        if (REPO / name).exists() and not (path / name).exists():
            (path / name).symlink_to(REPO / name)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def user_env() -> dict[str, str]:
    """The environment a user's shell would have, with this venv's tools first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def with_port(argv: list[str]) -> list[str]:
    """Two launches must not share DeepSpeed's default port, so each gets its own."""
    if argv[0] == "deepspeed" and "--master_port" not in argv:
        return [argv[0], "--master_port", str(free_port()), *argv[1:]]
    return argv


def run(
    argv: list[str],
    cwd: Path,
    timeout: int = 600,
    stdin: str | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """The command to its end. Past `timeout` its whole process group is killed and the test fails
    with its output: killing the launcher alone would leave ranks holding the pipes, and wait on."""
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    process = subprocess.Popen(
        with_port(argv), cwd=cwd, env={**user_env(), **(env or {})}, text=True, start_new_session=True,
        stdin=None if stdin is None else subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(
            f"{shlex.join(argv)} ran past {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}"
        ) from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def shell_commands(block: str) -> list[list[str]]:
    """Split a README code block into commands, joining backslash continuations and skipping comments."""
    joined = re.sub(r"\\\n", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line))
    return commands


def markdown_blocks(path: Path, language: str) -> list[str]:
    """The ```language code blocks of a markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def readme_blocks(language: str) -> list[str]:
    return markdown_blocks(REPO / "README.md", language)


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """The same command with one flag's value swapped (the flag must be there)."""
    index = argv.index(flag)
    return [*argv[: index + 1], value, *argv[index + 2 :]]


def run_clm_plain(
    cwd: Path, model: Path, *flags: str, train_file: str = "train.txt", output_dir: str = "out"
):
    """run_clm.py under plain `python`, no launcher: for checks of our own logic that need no ZeRO."""
    argv = [
        "python",
        str(REPO / "run_clm.py"),
        "--model_name_or_path",
        str(model),
        "--train_file",
        train_file,
    ]
    return run([*argv, "--do_train", "--output_dir", output_dir, *flags], cwd=cwd)


def python_warnings(output: str) -> list[str]:
    """The warnings Python printed (`file:line: SomeWarning: message`): noise a user cannot act on."""
    return re.findall(r"^.*:\d+: \w*Warning: .*$", output, flags=re.M)


def losses(output_dir: Path) -> dict[int, float]:
    """The training loss logged at each optimizer step of a run, from its trainer_state.json."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    """A run in its own process group, like a training run on a machine that gets preempted."""
    return subprocess.Popen(
        with_port(argv), cwd=cwd, env=user_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def read_until_losses(process: subprocess.Popen, count: int) -> list[str]:
    """The run's output up to the line with its `count`-th logged loss."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if sum(x.count("'loss'") for x in seen) >= count:
            return seen
    raise AssertionError("the run ended before it logged enough losses:\n" + "".join(seen)[-3000:])


def wait_for_group(process: subprocess.Popen, timeout: float = 60) -> float:
    """Seconds until every process of the run (launcher and ranks) is gone; fails past `timeout`."""
    import time

    began = time.monotonic()
    while time.monotonic() - began < timeout:
        process.poll()  # reaps the launcher, which would otherwise linger as a zombie
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return time.monotonic() - began
        time.sleep(0.2)
    left = subprocess.run(["ps", "-o", "pid,stat,etime,args", "-g", str(process.pid)], capture_output=True, text=True).stdout  # fmt: skip
    os.killpg(process.pid, 9)
    raise AssertionError(
        f"the run's processes were still there {timeout:.0f} s after the stop:\n{left}"
    )


def complete_checkpoints(output_dir: Path) -> list[str]:
    return sorted(
        p.name for p in output_dir.glob("checkpoint-*") if (p / "checkpoint-complete").is_file()
    )


def train_in_process(tmp_path, model: Path, *flags: str, text: str = "All the world's a stage.\n" * 200):  # fmt: skip
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    argv = ["--model_name_or_path", str(model), "--train_file", str(tmp_path / "train.txt"),
            "--do_train", "--output_dir", str(tmp_path / "out"), "--save_strategy", "no", *flags]  # fmt: skip
    import run_clm  # in this process: a new one would cost seconds

    run_clm.main(argv)
    return tmp_path / "out"
