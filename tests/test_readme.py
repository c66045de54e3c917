"""The README and docs/ are part of the product: every command in them runs as printed.

The guide's training commands run in test_train.py, docs/generation.md's in test_generation.py,
the planner's transcripts in test_will_it_fit.py; this file runs the rest."""

import re
import shutil
import sys
from pathlib import Path

import pytest

from launch import (
    markdown_blocks,
    python_warnings,
    readme_blocks,
    replace_flag,
    run,
    shell_commands,
    workdir,
)
from tiny import REPO

sys.path.insert(0, str(REPO))
import run_clm
import run_generation
import text2csv
import will_it_fit

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Hub names in the docs' commands, and the tiny offline model of the same family that stands in.
FAMILY_OF = {"qwen3": "tiny_qwen3", "qwen": "tiny_qwen", "llama": "tiny_llama", "mistral": "tiny_llama", "gpt2": "tiny_gpt2"}  # fmt: skip


def commands(doc: Path) -> list[list[str]]:
    return [argv for block in markdown_blocks(doc, "bash") for argv in shell_commands(block)]


def elsewhere(argv: list[str]) -> bool:
    """Commands other tests run: installs, the tests, the guide's training and generation."""
    guide = argv[:3] == ["deepspeed", "--num_gpus=1", "run_clm.py"] and "--overwrite_cache" in argv
    generation = argv in commands(REPO / "docs" / "generation.md")
    return argv[0] == "pip" or "pytest" in argv or guide or generation or "&&" in argv


def test_ci_runs_the_readme_test_command():
    assert ["pip", "install", "-r", "requirements-test.txt", "&&", "python", "-m", "pytest", "-q"] in commands(REPO / "README.md")  # fmt: skip
    # .ci/run takes the command out of the README itself, so the two cannot drift apart.
    assert "grep -m1 '^pip install -r requirements-test.txt && python -m pytest' README.md" in (REPO / ".ci" / "run").read_text(encoding="utf-8")  # fmt: skip


def test_the_readme_is_for_users():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "test_" not in text and "owner:" not in text and "PLANNER_" not in text
    # The README's snippet is docs/generation.md's, which test_generation.py runs as printed.
    [snippet] = readme_blocks("python")
    assert snippet in markdown_blocks(REPO / "docs" / "generation.md", "python")
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (REPO / link).exists(), link


def smoke_block() -> list[list[str]]:
    for block in readme_blocks("bash"):
        argvs = shell_commands(block)
        if ["python", "tests/tiny.py", "tiny-gpt2"] in argvs:
            return argvs
    raise AssertionError("README has no smoke-run block")


def copy_of_the_repo(tmp_path: Path) -> Path:
    folder = workdir(tmp_path)
    for name in ("train.txt", "validation.txt"):
        shutil.copy(REPO / name, folder / name)
    (folder / "tests").mkdir()
    (folder / "tests" / "tiny.py").symlink_to(REPO / "tests" / "tiny.py")
    (folder / "examples").symlink_to(REPO / "examples")
    return folder


def with_csvs(folder: Path) -> Path:
    """A copy of the repo after the README's `python text2csv.py`, as later pages assume."""
    for name in ("train", "validation"):
        (folder / f"{name}.csv").write_text(
            'text\n"'
            + (REPO / f"{name}.txt").read_text(encoding="utf-8")[:50_000].replace('"', '""')
            + '"\n',
            encoding="utf-8",
        )
    return folder


def test_smoke_run_as_printed(tmp_path: Path):
    """The README's CPU smoke run, command by command, in a fresh copy of the repo's files."""
    folder = copy_of_the_repo(tmp_path)
    outputs = []
    for argv in smoke_block():
        if argv[:2] == ["pip", "install"]:
            continue  # already installed in this environment; .ci/run installs it for real
        done = run(argv, cwd=folder, timeout=900)
        assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-3000:])
        assert not python_warnings(done.stderr), (argv, python_warnings(done.stderr))
        outputs.append(done.stdout + done.stderr)
    training, sampling = outputs[-2], outputs[-1]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    summary = re.search(r"(\d+) train / (\d+) eval blocks", training)
    assert f"`{summary.group(0)}`" in readme  # what the README says the log says
    assert "DeepSpeed ZeRO stage 2: DeepSpeedZeroOptimizer over DeepSpeedCPUAdam" in training
    assert "perplexity" in training and (folder / "tiny-finetuned" / "loss.png").is_file()
    claimed = re.search(r"the loss falls\s+from about ([\d.]+) to ([\d.]+)", readme)
    logged = [float(loss) for loss in re.findall(r"'loss': '([\d.]+)'", training)]
    assert abs(logged[0] - float(claimed[1])) < 0.2 and abs(logged[-1] - float(claimed[2])) < 0.2, (
        logged
    )
    assert "=== GENERATED SEQUENCE 1 (20 new tokens) ===" in sampling


def in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """A `python script.py ...` command, run as main() here: seconds sooner than a new process."""
    script = {"run_clm.py": run_clm.main, "run_generation.py": run_generation.main,
              "text2csv.py": text2csv.main, "will_it_fit.py": will_it_fit.main}  # fmt: skip
    try:
        returned = script[argv[1]](argv[2:])
        status = returned if isinstance(returned, int) else 0
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def stand_ins(argv: list[str], models: dict[str, Path]) -> list[str]:
    """The command with a hub model swapped for a tiny one of its family and few steps."""
    if "--model_name_or_path" not in argv or argv[1] != "run_clm.py":
        return argv
    name = argv[argv.index("--model_name_or_path") + 1]
    family = next((f for key, f in FAMILY_OF.items() if key in name.lower()), None)
    if family and not Path(name).exists():
        argv = replace_flag(argv, "--model_name_or_path", str(models[family]))
    # Chats (a .jsonl) hold whole conversations, tool instructions included: a longer block.
    block = "512" if argv[argv.index("--train_file") + 1].endswith(".jsonl") else "64"
    return [*argv, "--max_steps", "2", "--block_size", block, "--max_eval_samples", "4", "--save_strategy", "no"]  # fmt: skip


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d.name != "generation.md"], ids=lambda d: d.name
)
def test_every_other_command_in_the_docs_runs_as_printed(doc, tmp_path, monkeypatch, capsys, tiny_gpt2, tiny_llama, tiny_qwen, tiny_qwen3):  # fmt: skip
    models = {"tiny_gpt2": tiny_gpt2, "tiny_llama": tiny_llama, "tiny_qwen": tiny_qwen, "tiny_qwen3": tiny_qwen3}  # fmt: skip
    folder = with_csvs(copy_of_the_repo(tmp_path))
    monkeypatch.chdir(folder)
    text = doc.read_text(encoding="utf-8")
    for argv in commands(doc):
        if elsewhere(argv) or argv in smoke_block():
            continue
        assert argv[0] == "python", f"{doc.name}: a bash block this test cannot run: {argv}"
        if argv[:2] == ["python", "tests/tiny.py"]:
            assert run(argv, cwd=folder).returncode == 0
            continue
        status, out, err = in_process(stand_ins(argv, models), capsys)
        if "--load_in_4bit" in argv:  # QLoRA needs CUDA; on this machine the run says so
            assert status == 2 and "--load_in_4bit needs a CUDA GPU" in err, err
            continue
        # The planner's 1 is an answer too: "does not fit".
        assert status == 0 or (argv[1] == "will_it_fit.py" and status == 1), (argv, err[-3000:])
        for line in out.splitlines():
            if line.startswith("wrote "):  # text2csv.py's report, as the page shows it
                assert line in text, line
