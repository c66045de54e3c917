"""Sampling from what run_clm.py writes: run_generation.py, run_generate_neo.py, README snippets.

Everything runs offline on the CPU with two-layer models and the real GPT-2 tokenizer. The
commands a user types run as subprocesses; finer behaviour is checked through `main()` in-process,
which is much faster than starting Python again.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import REPO, gpt2_tokenizer, tiny_model

sys.path.insert(0, str(REPO))

import run_generate_neo
import run_generation

GUIDE_COMMAND = (
    "python run_generation.py --model_type=gpt2 --model_name_or_path=finetuned --length 200"
)
NEO_COMMAND = "python run_generate_neo.py finetuned"
HEADER = re.compile(r"^=== GENERATED SEQUENCE (\d+) \((\d+) new tokens\) ===$", re.MULTILINE)
SECTION_START = "<!-- section: generation (owner: generation) -->"


def run_script(
    script: str, args: list[str], cwd: Path, stdin: str = ""
) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts the way a user would, from `cwd`."""
    # Two cores shared with other jobs: OpenMP threads spinning on each other make a tiny model's
    # generate() some 30 times slower, so the subprocesses use one thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def workdir_with(tmp_path: Path, model_dir: Path) -> Path:
    """A directory in which `finetuned` is the model, as after the guide's training command."""
    (tmp_path / "finetuned").symlink_to(model_dir, target_is_directory=True)
    return tmp_path


def sequences(stdout: str) -> list[tuple[int, int, str]]:
    """(number, new tokens, text) for each '=== GENERATED SEQUENCE n ===' block of the output."""
    headers = list(HEADER.finditer(stdout))
    blocks = []
    for index, match in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(stdout)
        text = stdout[match.end() + 1 : end].removesuffix("\n")
        blocks.append((int(match.group(1)), int(match.group(2)), text))
    return blocks


def greedy_continuation(model_dir: Path, prompt: str, length: int) -> str:
    """What greedy decoding of exactly `length` new tokens gives, computed without our scripts."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(
        **ids, do_sample=False, max_new_tokens=length, min_new_tokens=length, pad_token_id=50256
    )
    assert out.shape[1] == ids["input_ids"].shape[1] + length
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def roomy_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 and GPT-Neo with 256 positions: the guide asks for 200 new tokens."""
    models = {}
    for family in ("gpt2", "gpt_neo"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("roomy") / family
        tiny_model(family, positions=256).save_pretrained(path)
        gpt2_tokenizer().save_pretrained(path)
        models[family] = path
    return models


@pytest.fixture
def one_thread():
    """In-process generation with one thread, for the same reason as the subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- run_generation.py, as the guide calls it -------------------------------------------------


GUIDE_ARGS = [*GUIDE_COMMAND.split()[2:], "--num_return_sequences", "2"]


@pytest.fixture(scope="module")
def guide_run(roomy_models, tmp_path_factory) -> subprocess.CompletedProcess:
    """The guide's command as printed (two sequences), the prompt typed on standard input."""
    cwd = workdir_with(tmp_path_factory.mktemp("guide"), roomy_models["gpt2"])
    return run_script("run_generation.py", GUIDE_ARGS, cwd, stdin="From off a hill\n")


def test_guide_command_prints_requested_sequences_of_requested_length(guide_run):
    assert guide_run.returncode == 0, guide_run.stderr
    blocks = sequences(guide_run.stdout)
    assert [(number, tokens) for number, tokens, _ in blocks] == [(1, 200), (2, 200)]
    for _, _, text in blocks:
        assert text.startswith("From off a hill")
        assert len(text) > len("From off a hill") + 200  # 200 BPE tokens are more than 200 chars
    assert blocks[0][2] != blocks[1][2]
    assert "Traceback" not in guide_run.stderr


def test_prompt_flag_gives_same_text_as_standard_input_for_same_seed(
    guide_run, roomy_models, capsys, one_thread
):
    # In-process (a second interpreter would cost seconds), single-threaded like the subprocess.
    args = [arg.replace("=finetuned", f"={roomy_models['gpt2']}") for arg in GUIDE_ARGS]
    assert run_generation.main([*args, "--prompt", "From off a hill"]) == 0
    # Same default seed (42), same prompt: where the prompt came from must not matter.
    assert capsys.readouterr().out == guide_run.stdout


def test_length_means_exactly_that_many_new_tokens(tiny_gpt2, capsys, one_thread):
    status = run_generation.main(
        ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hello world", "--length", "15"]
        + ["--temperature", "0"]
    )
    assert status == 0
    [(number, tokens, text)] = sequences(capsys.readouterr().out)
    assert (number, tokens) == (1, 15)
    assert text == "Hello world" + greedy_continuation(tiny_gpt2, "Hello world", 15)


@pytest.fixture
def eager_to_stop(tiny_gpt2, tmp_path) -> Path:
    """The tiny GPT-2, told that the token it picks first after "Hello world" ends a text."""
    path = tmp_path / "eager"
    shutil.copytree(tiny_gpt2, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tokenizer("Hello world", return_tensors="pt")
    first = int(model.generate(**ids, do_sample=False, max_new_tokens=1, pad_token_id=0)[0, -1])
    for name in ("config.json", "generation_config.json"):
        config = json.loads((path / name).read_text())
        config["eos_token_id"] = first
        (path / name).write_text(json.dumps(config))
    return path


def test_end_of_text_waits_for_length_unless_a_stop_token_is_given(
    eager_to_stop, capsys, one_thread
):
    argv = ["--model_name_or_path", str(eager_to_stop), "--prompt", "Hello world"]
    argv += ["--length", "10", "--temperature", "0"]
    assert run_generation.main(argv) == 0
    [(_, tokens, text)] = sequences(capsys.readouterr().out)
    assert tokens == 10 and len(text) > len("Hello world")

    # With a stop token the model may end the text: here at once, and the end token is not shown.
    assert run_generation.main([*argv, "--stop_token", "\n\n"]) == 0
    assert sequences(capsys.readouterr().out) == [(1, 0, "Hello world")]


def test_seed_decides_the_sample(tiny_gpt2, capsys, one_thread):
    texts = []
    for seed in ("1", "1", "2"):
        argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hi", "--length", "8"]
        assert run_generation.main([*argv, "--seed", seed]) == 0
        texts.append(sequences(capsys.readouterr().out)[0][2])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_stop_token_cuts_only_where_it_occurs(tiny_gpt2, capsys, one_thread):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hello", "--length", "12"]
    argv += ["--temperature", "0"]
    assert run_generation.main(argv) == 0
    full = sequences(capsys.readouterr().out)[0][2]
    continuation = full.removeprefix("Hello")
    stop = continuation[len(continuation) // 2 :][:3]

    assert run_generation.main([*argv, "--stop_token", stop]) == 0
    cut = sequences(capsys.readouterr().out)[0][2]
    assert cut == "Hello" + continuation[: continuation.index(stop)]

    # A stop token that never occurs leaves the text whole (the HF example lost its last char).
    assert run_generation.main([*argv, "--stop_token", "\x07never\x07"]) == 0
    assert sequences(capsys.readouterr().out)[0][2] == full


def test_fp16_on_cpu_is_a_note_not_a_crash(tiny_gpt2, capsys, one_thread):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hi", "--length", "3", "--fp16"]
    assert run_generation.main(argv) == 0
    captured = capsys.readouterr()
    assert "--fp16 needs a GPU; running in float32" in captured.err
    assert len(sequences(captured.out)) == 1


# --- bad model paths --------------------------------------------------------------------------


def test_unknown_hub_id_is_one_line_error_from_the_command_line(tmp_path):
    # A subprocess: only a fresh interpreter is sure to see HF_HUB_OFFLINE (conftest sets it after
    # transformers is imported), so this stays offline and fast.
    result = run_script(
        "run_generation.py", ["--model_name_or_path", "no-such-org/no-such-model"], tmp_path
    )
    assert result.returncode == 2
    assert result.stdout == ""
    note, error = result.stderr.strip().splitlines()
    assert note.startswith("run_generation.py: loading no-such-org/no-such-model")
    assert error.startswith(
        "run_generation.py: error: cannot load no-such-org/no-such-model "
        "(not a local directory, tried as a hub model id): "
    )


def broken_model(kind: str, tiny_gpt2: Path, tmp_path: Path) -> tuple[str, str]:
    """A model path that is wrong in one way, and what the error must say about it."""
    target = tmp_path / kind
    if kind == "missing":
        return "./no-such-model", "no such directory"
    if kind == "file":
        target.write_text("not a model\n")
        return str(target), "is a file, not a model directory"
    shutil.copytree(tiny_gpt2, target)
    if kind == "no-config":
        (target / "config.json").unlink()
        return str(target), "has no config.json"
    if kind == "no-tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (target / name).unlink()
        return str(target), "has no tokenizer files"
    (target / "model.safetensors").unlink()
    return str(target), "cannot load"


@pytest.mark.parametrize("kind", ["missing", "file", "no-config", "no-tokenizer", "no-weights"])
def test_bad_model_path_is_one_line_error(kind, tiny_gpt2, tmp_path, capsys):
    path, says = broken_model(kind, tiny_gpt2, tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_generation.main(["--model_name_or_path", path, "--prompt", "Hi"])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # Checked before loading: nothing but the error. A failed load follows its "loading" note.
    assert len(lines) == (2 if kind == "no-weights" else 1), lines
    assert lines[-1].startswith("run_generation.py: error: ")
    assert path in lines[-1] and says in lines[-1]


def test_neo_script_reports_bad_path_the_same_way(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        run_generate_neo.main([str(tmp_path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"run_generate_neo.py: error: {tmp_path} has no config.json, so it is not a model "
        "directory (pass the --output_dir that run_clm.py wrote)"
    ]


# --- run_generate_neo.py ----------------------------------------------------------------------

NEO_INPUT = "Hello there\n\n   \nOnce upon a time\n"  # two prompts, blank lines skipped, then EOF
NEO_FLAGS = ["--length", "12", "--temperature", "0", "--seed", "0"]


def generations(stdout: str) -> list[str]:
    """The streamed texts: what follows each prompt marker, without the blank-line re-prompts."""
    return [
        part.removesuffix("\n") for part in stdout.split(run_generate_neo.PROMPT) if part.strip()
    ]


@pytest.fixture(scope="module")
def neo_plain(tiny_neo, tmp_path_factory) -> subprocess.CompletedProcess:
    cwd = workdir_with(tmp_path_factory.mktemp("neo"), tiny_neo)
    return run_script("run_generate_neo.py", ["finetuned", *NEO_FLAGS], cwd, stdin=NEO_INPUT)


def test_neo_loop_prints_one_generation_per_prompt_and_exits_on_eof(
    neo_plain, tiny_neo, one_thread
):
    assert neo_plain.returncode == 0, neo_plain.stderr
    texts = generations(neo_plain.stdout)
    assert len(texts) == 2
    for text, prompt in zip(texts, ["Hello there", "Once upon a time"], strict=True):
        assert text == prompt + greedy_continuation(tiny_neo, prompt, 12)
    assert "Traceback" not in neo_plain.stderr


def test_neo_loop_with_deepspeed_on_cpu_gives_the_same_tokens(neo_plain, tiny_neo, tmp_path):
    cwd = workdir_with(tmp_path, tiny_neo)
    wrapped = run_script(
        "run_generate_neo.py", ["finetuned", *NEO_FLAGS, "--deepspeed"], cwd, NEO_INPUT
    )
    assert wrapped.returncode == 0, wrapped.stderr
    assert "model wrapped by deepspeed.init_inference (kernel injection off)" in wrapped.stderr
    assert generations(wrapped.stdout) == generations(neo_plain.stdout)


def test_neo_loop_stops_at_exit(tiny_neo, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(sys, "stdin", io.StringIO("First prompt\nexit\nNever generated\n"))
    assert run_generate_neo.main([str(tiny_neo), "--length", "4"]) == 0
    texts = generations(capsys.readouterr().out)
    assert len(texts) == 1 and texts[0].startswith("First prompt")


def test_neo_loop_ctrl_c(monkeypatch, capsys):
    """Ctrl-C during a generation stops only that one; Ctrl-C at the prompt quits cleanly."""
    answers = iter(["slow prompt", "next prompt"])

    def fake_input(prompt: str) -> str:
        print(prompt, end="")
        answer = next(answers, None)
        if answer is None:
            raise KeyboardInterrupt
        return answer

    def fake_stream(model, tokenizer, prompt, args) -> None:
        if prompt == "slow prompt":
            raise KeyboardInterrupt
        print(prompt + " continued")

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(run_generate_neo, "stream_one", fake_stream)
    args = run_generate_neo.build_parser().parse_args(["finetuned"])
    assert run_generate_neo.prompt_loop(None, None, args) == 0
    out = capsys.readouterr().out
    assert "(generation stopped)" in out
    assert "next prompt continued" in out


# --- README -----------------------------------------------------------------------------------


def generation_section() -> str:
    """The README's generation section, from its marker to the next section marker."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start = readme.index(SECTION_START)
    end = readme.find("<!-- section:", start + len(SECTION_START))
    return readme[start : end if end >= 0 else len(readme)]


def snippet_texts(code: str) -> list[str]:
    """The `texts = [...]` list a snippet generates from."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "texts":
            return ast.literal_eval(node.value)
    raise AssertionError("snippet has no `texts = [...]`")


def test_readme_shows_both_script_commands():
    section = generation_section()
    assert GUIDE_COMMAND in section
    assert NEO_COMMAND in section


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_readme_snippet_runs_as_printed(family, roomy_models, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", generation_section(), re.DOTALL)
    assert len(blocks) == 2
    marker = {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM"}[family]
    [code] = [block for block in blocks if marker in block]
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    cwd = workdir_with(tmp_path, roomy_models[family])

    result = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    printed = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    prompts = snippet_texts(code)
    assert len(printed) == len(prompts) >= 2
    for text, prompt in zip(printed, prompts, strict=True):
        assert text.startswith(prompt) and len(text) > len(prompt)
