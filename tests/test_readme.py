"""The README is part of the product: its commands run as printed, its tables point at real tests."""

import re
import shutil
from pathlib import Path

from launch import readme_blocks, replace_flag, run, shell_commands, workdir
from tiny import REPO


def test_every_row_of_the_bad_input_table_names_a_real_test():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    table = text.split("### Bad input, and what you are told")[1].split("\n\n")[2]
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith(("| input", "| ---"))
    ]
    assert len(rows) >= 15
    for row in rows:
        test = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert test, row
        file, name = test[0]
        source = (REPO / "tests" / file).read_text(encoding="utf-8")
        assert f"def {name}(" in source, row


def test_ci_runs_the_readme_test_command():
    commands = [argv for block in readme_blocks("bash") for argv in shell_commands(block)]
    assert [
        "pip",
        "install",
        "-r",
        "requirements-test.txt",
        "&&",
        "python",
        "-m",
        "pytest",
        "-q",
    ] in commands
    # .ci/run takes the command out of the README itself, so the two cannot drift apart.
    assert "grep -m1 '^pip install -r requirements-test.txt && python -m pytest' README.md" in (
        REPO / ".ci" / "run"
    ).read_text(encoding="utf-8")


def smoke_block() -> list[list[str]]:
    for block in readme_blocks("bash"):
        commands = shell_commands(block)
        if ["python", "tests/tiny.py", "tiny-gpt2"] in commands:
            return commands
    raise AssertionError("README has no smoke-run block")


def test_smoke_run_as_printed(tmp_path: Path):
    """The README's CPU smoke run, command by command, in a fresh copy of the repo's files."""
    folder = workdir(tmp_path)
    for name in ("train.txt", "validation.txt"):
        shutil.copy(REPO / name, folder / name)
    (folder / "tests").mkdir()
    (folder / "tests" / "tiny.py").symlink_to(REPO / "tests" / "tiny.py")
    outputs = []
    for argv in smoke_block():
        if argv[:2] == ["pip", "install"]:
            continue  # already installed in this environment; .ci/run installs it for real
        done = run(argv, cwd=folder, timeout=900)
        assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-3000:])
        outputs.append(done.stdout + done.stderr)
    training, sampling = outputs[-2], outputs[-1]
    assert "DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over DeepSpeedCPUAdam" in training
    assert "perplexity" in training
    assert (folder / "tiny-finetuned" / "loss.png").is_file()
    assert "=== GENERATED SEQUENCE 1" in sampling


def test_quick_start_as_printed_with_a_tiny_model(tmp_path: Path, tiny_gpt2: Path):
    """The quick start's one line: text2csv, then the guide's training command (model swapped, steps capped)."""
    block = next(
        b for b in readme_blocks("bash") if b.startswith("pip install -r requirements.txt && ")
    )
    parts = [part.strip() for part in block.strip().split("&&")]
    assert parts[0] == "pip install -r requirements.txt" and parts[1] == "python text2csv.py"
    folder = workdir(tmp_path)
    for name in ("train.txt", "validation.txt"):
        shutil.copy(REPO / name, folder / name)
    made = run(parts[1].split(), cwd=folder)
    assert made.returncode == 0, made.stderr
    train = replace_flag(shell_commands(parts[2])[0], "--model_name_or_path", str(tiny_gpt2))
    done = run(
        [*train, "--max_steps", "2", "--block_size", "64", "--max_eval_samples", "4"], cwd=folder
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (folder / "finetuned" / "model.safetensors").is_file()


def planner_transcripts() -> list[tuple[list[str], list[str]]]:
    """Each `$ python will_it_fit.py ...` shown in the README, with the output lines printed under it."""
    found = []
    for block in readme_blocks("text"):
        lines = block.strip().splitlines()
        if lines and lines[0].startswith("$ python will_it_fit.py"):
            shown = [line for line in lines[1:] if line.strip() and line.strip() != "..."]
            found.append((shell_commands(lines[0][2:])[0], shown))
    return found


def test_planner_output_in_the_readme_is_what_it_prints(tmp_path: Path):
    transcripts = planner_transcripts()
    assert len(transcripts) >= 3
    folder = workdir(tmp_path)
    (folder / "will_it_fit.py").symlink_to(REPO / "will_it_fit.py")
    for argv, shown in transcripts:
        done = run(argv, cwd=folder, timeout=120)
        assert done.returncode in (0, 1), done.stderr  # 1 means "does not fit", itself an answer
        printed = [line.rstrip() for line in done.stdout.splitlines()]
        for line in shown:
            assert line.rstrip() in printed, (argv, line)
