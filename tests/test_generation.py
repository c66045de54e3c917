"""Sampling from what run_clm.py writes: run_generation.py, run_generate_neo.py, docs/generation.md.

Everything runs offline on the CPU with two-layer models. The commands a user types run as
subprocesses where the process itself is under test (exit status, what reaches stdout and stderr);
everything else goes through `main()` in-process, which is much faster than starting Python again.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch import markdown_blocks, shell_commands
from tiny import CHATML, REPO, gpt2_tokenizer, tiny_model

sys.path.insert(0, str(REPO))

import generation
import run_generate_neo
import run_generation

DOCS = REPO / "docs" / "generation.md"
GUIDE_COMMAND = (
    "python run_generation.py --model_type=gpt2 --model_name_or_path=finetuned --length 200"
)
NEO_COMMAND = "python run_generate_neo.py finetuned"
HEADER = re.compile(r"^=== GENERATED SEQUENCE (\d+) \((\d+) new tokens\) ===$", re.MULTILINE)
SCRIPTS = {"run_generation.py": run_generation, "run_generate_neo.py": run_generate_neo}
NEO_PROMPTS = ["Hello there", "Once upon a time"]
NEO_INPUT = "Hello there\n\n   \nOnce upon a time\n"  # two prompts, blank lines skipped, then EOF
NEO_FLAGS = ["--length", "12", "--temperature", "0", "--seed", "0"]
CPU = torch.device("cpu")


def start_script(
    script: str, args: list[str], cwd: Path, stdin: str = "", unset: str = ""
) -> subprocess.Popen:
    """Start one of the repository's scripts the way a user would, from `cwd`, without `unset`."""
    # Two cores shared with other jobs: OpenMP threads spinning on each other make a tiny model's
    # generate() some 30 times slower, so the subprocesses use one thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(unset, None)
    (cwd / "typed.txt").write_text(stdin, encoding="utf-8")
    with open(cwd / "typed.txt", encoding="utf-8") as typed:
        return subprocess.Popen(
            [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, stdin=typed,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip


def finished(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def workdir_with(tmp_path: Path, model_dir: Path) -> Path:
    """A directory in which `finetuned` is the model, as after the guide's training command."""
    (tmp_path / "finetuned").symlink_to(model_dir, target_is_directory=True)
    return tmp_path


def only_our_lines(stderr: str, script: str) -> bool:
    """Nothing on stderr but the script's own notes and errors: no warnings, bars or tracebacks."""
    return all(line.startswith(f"{script}: ") for line in stderr.splitlines())


def sequences(stdout: str) -> list[tuple[int, int, str]]:
    """(number, new tokens, text) for each '=== GENERATED SEQUENCE n ===' block of the output."""
    headers = list(HEADER.finditer(stdout))
    blocks = []
    for index, match in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(stdout)
        text = stdout[match.end() + 1 : end].removesuffix("\n")
        blocks.append((int(match.group(1)), int(match.group(2)), text))
    return blocks


def texts_of(stdout: str) -> list[str]:
    return [text for *_, text in sequences(stdout)]


def load(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)


def greedy_ids(model, ids: list[int], length: int, **kwargs) -> list[int]:
    """The new ids greedy decoding gives after `ids`, computed without our scripts."""
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=length,
        pad_token_id=0,
        **kwargs,
    )
    return out[0, len(ids) :].tolist()


def greedy_continuation(model_dir: Path, prompt: str, length: int) -> str:
    """What greedy decoding of exactly `length` new tokens gives, computed without our scripts."""
    tokenizer, model = load(model_dir)
    ids = tokenizer(prompt)["input_ids"]
    new = greedy_ids(model, ids, length, min_new_tokens=length)
    assert len(new) == length
    return tokenizer.decode(new, skip_special_tokens=True)


def greedy_answer(tokenizer, model, messages: list[dict], template: str, length: int) -> str:
    """A chat answer as the model gives it greedily, up to the first end id, without our scripts."""
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    # The tokenizer's own special tokens (Llama's BOS), unless the template wrote the BOS itself.
    bos_written = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=not bos_written)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == (1 if tokenizer.bos_token else 0)
    # These tokenizers' EOS is also what their template closes a turn with.
    new = greedy_ids(model, ids, length, eos_token_id=tokenizer.eos_token_id)
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def copy_of(model_dir: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / name))


@pytest.fixture(scope="module")
def roomy_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-2 and GPT-Neo with 256 positions: the guide asks for 200 new tokens.

    The GPT-Neo is saved in float16, as after the guide's --fp16 run, so its snippet meets a model
    a CPU cannot run as saved.
    """
    models = {}
    for family, dtype in (("gpt2", torch.float32), ("gpt_neo", torch.float16)):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp("roomy") / family
        tiny_model(family, positions=256).to(dtype).save_pretrained(path)
        gpt2_tokenizer().save_pretrained(path)
        models[family] = path
    return models


@pytest.fixture(scope="module")
def lora_run(tiny_gpt2, tmp_path_factory) -> Path:
    """What run_clm.py --use_peft leaves: the merged model in out/, the adapter alone in out/adapter."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("lora") / "out"
    torch.manual_seed(1)
    tokenizer, base = load(tiny_gpt2)
    # Random B matrices (init_lora_weights=False): a fresh adapter would change nothing.
    adapter = LoraConfig(
        r=4,
        target_modules=["c_attn"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, adapter)
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def processes(roomy_models, tiny_neo, tmp_path_factory) -> Iterator[dict[str, subprocess.Popen]]:
    """The commands under test as processes of their own, all started before the first test.

    Each spends seconds importing torch and transformers, so they run while the in-process tests
    do; the tests that read them come last in this file.
    """
    guide = workdir_with(tmp_path_factory.mktemp("guide"), roomy_models["gpt2"])
    neo = workdir_with(tmp_path_factory.mktemp("neo"), tiny_neo)
    started = {
        "guide": start_script(
            "run_generation.py", GUIDE_COMMAND.split()[2:], guide, "From off a hill\n"
        ),
        # DS_ACCELERATOR unset, as on a user's machine: DeepSpeed then guesses, out loud.
        "neo_deepspeed": start_script(
            "run_generate_neo.py", ["finetuned", *NEO_FLAGS, "--deepspeed"], neo, NEO_INPUT,
            unset="DS_ACCELERATOR",
        ),
        "unknown_hub": start_script(
            "run_generation.py", ["--model_name_or_path", "no-such-org/no-such-model"],
            tmp_path_factory.mktemp("hub"),
        ),
    }  # fmt: skip
    yield started
    for process in started.values():
        process.kill()  # only those a failed test left running
        process.wait()


@pytest.fixture
def one_thread():
    """In-process generation with one thread, for the same reason as the subprocesses."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- run_generation.py, as the guide calls it -------------------------------------------------


def test_prompt_flag_gives_same_text_as_standard_input_for_same_seed(
    tiny_gpt2, monkeypatch, capsys, one_thread
):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--length", "20", "--num_return_sequences", "2"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("From off a hill\n"))
    piped = run_generation.main(argv)
    # Same default seed (42), same prompt: where the prompt came from must not matter.
    assert run_generation.main([*argv, "--prompt", "From off a hill"]) == piped
    assert piped[0].startswith("From off a hill") and piped[0] != piped[1]


def test_hf_example_test_runs_unchanged(tiny_gpt2, monkeypatch, capsys, one_thread):
    """Hugging Face's test of its run_generation.py, with a local tiny GPT-2 for the hub one."""
    testargs = ["run_generation.py", "--prompt=Hello", "--length=10", "--seed=42"]
    testargs += ["--model_type=gpt2", f"--model_name_or_path={tiny_gpt2}"]
    monkeypatch.setattr(sys, "argv", testargs)
    result = run_generation.main()
    assert len(result[0]) >= 10
    # main() returns the texts exactly as printed.
    assert result == texts_of(capsys.readouterr().out)
    assert result[0].startswith("Hello") and len(result) == 1


def test_length_means_exactly_that_many_new_tokens(tiny_gpt2, capsys, one_thread):
    result = run_generation.main(
        ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hello world", "--length", "15"]
        + ["--temperature", "0"]
    )
    [(number, tokens, text)] = sequences(capsys.readouterr().out)
    assert (number, tokens) == (1, 15)
    assert [text] == result
    assert text == "Hello world" + greedy_continuation(tiny_gpt2, "Hello world", 15)


@pytest.fixture
def eager_to_stop(tiny_gpt2, tmp_path) -> Path:
    """The tiny GPT-2, told that the token it picks first after "Hello world" ends a text."""
    path = copy_of(tiny_gpt2, tmp_path, "eager")
    tokenizer, model = load(path)
    first = greedy_ids(model, tokenizer("Hello world")["input_ids"], 1)[0]
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
    run_generation.main(argv)
    [(_, tokens, text)] = sequences(capsys.readouterr().out)
    assert tokens == 10 and len(text) > len("Hello world")

    # With a stop token the model may end the text: here at once, and the end token is not shown.
    assert run_generation.main([*argv, "--stop_token", "\n\n"]) == ["Hello world"]
    assert sequences(capsys.readouterr().out) == [(1, 0, "Hello world")]


def test_seed_decides_the_sample(tiny_gpt2, capsys, one_thread):
    texts = []
    for seed in ("1", "1", "2"):
        argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hi", "--length", "8"]
        texts += run_generation.main([*argv, "--seed", seed])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_stop_token_cuts_only_where_it_occurs(tiny_gpt2, capsys, one_thread):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hello", "--length", "12"]
    argv += ["--temperature", "0"]
    [full] = run_generation.main(argv)
    continuation = full.removeprefix("Hello")
    stop = continuation[len(continuation) // 2 :][:3]

    assert run_generation.main([*argv, "--stop_token", stop]) == [
        "Hello" + continuation[: continuation.index(stop)]
    ]
    # A stop token that never occurs leaves the text whole (the HF example lost its last char).
    assert run_generation.main([*argv, "--stop_token", "\x07never\x07"]) == [full]


# --- precision --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_in(tiny_gpt2, tmp_path_factory) -> dict[str, Path]:
    """The tiny GPT-2 saved in float16 and in bfloat16, as after run_clm.py --fp16 / --bf16."""
    folders = {}
    for name in ("float16", "bfloat16"):
        path = tmp_path_factory.mktemp(name) / name
        AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=name).save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(path)
        assert json.loads((path / "config.json").read_text())["dtype"] == name
        folders[name] = path
    return folders


@pytest.mark.parametrize(
    "saved, runs_in",
    [("bfloat16", torch.bfloat16), ("float16", torch.float32)],
)
def test_model_runs_in_its_saved_dtype_where_the_cpu_can(
    saved, runs_in, saved_in, capsys, one_thread
):
    path = saved_in[saved]
    model, _ = generation.load_model("test", str(path), CPU, "auto", False, "--dtype auto")
    assert model.dtype == runs_in
    capsys.readouterr()

    [text] = run_generation.main(
        ["--model_name_or_path", str(path), "--prompt", "Hi", "--length", "3"]
    )
    err = capsys.readouterr().err.splitlines()
    loading = f"run_generation.py: loading {path} on cpu in {str(runs_in).removeprefix('torch.')}"
    fallback = f"run_generation.py: {path} is saved in float16, which needs a GPU; running in float32 on the CPU"
    assert err == ([loading] if saved == "bfloat16" else [fallback, loading])
    assert text.startswith("Hi") and len(text) > 2


def test_dtype_flags_override_the_saved_dtype(tiny_gpt2, saved_in, monkeypatch, capsys, one_thread):
    # --dtype on a float32 model; --fp32, the old neo flag, on a bfloat16 one.
    argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hi", "--length", "2"]
    run_generation.main([*argv, "--dtype", "bfloat16"])
    assert f"loading {tiny_gpt2} on cpu in bfloat16" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert run_generate_neo.main([str(saved_in["bfloat16"]), "--fp32", "--length", "2"]) == 0
    assert f"loading {saved_in['bfloat16']} on cpu in float32" in capsys.readouterr().err
    model, _ = generation.load_model("test", str(tiny_gpt2), CPU, "bfloat16", False, "--dtype x")
    assert model.dtype == torch.bfloat16


def test_fp16_on_cpu_is_a_note_not_a_crash(tiny_gpt2, capsys, one_thread):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--prompt", "Hi", "--length", "3", "--fp16"]
    result = run_generation.main(argv)
    captured = capsys.readouterr()
    assert "run_generation.py: --fp16 needs a GPU; running in float32 on the CPU" in captured.err
    assert f"loading {tiny_gpt2} on cpu in float32" in captured.err
    assert len(sequences(captured.out)) == len(result) == 1


# --- any causal LM: Llama, Qwen, LoRA adapters ------------------------------------------------


def test_llama_prompt_gets_one_bos_and_keeps_the_space_after_it(tiny_llama, capsys, one_thread):
    tokenizer, model = load(tiny_llama)
    assert tokenizer.pad_token is None  # generation must cope without one
    prompt = "KING HENRY:"
    ids = tokenizer(prompt)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    new = greedy_ids(model, ids, 12, min_new_tokens=12)
    # The first new token starts a word: decoded on its own it would lose its space.
    assert tokenizer.convert_ids_to_tokens(new[0]).startswith("▁")
    whole = tokenizer.decode(ids + new, skip_special_tokens=True)
    expected = prompt + whole[len(tokenizer.decode(ids, skip_special_tokens=True)) :]
    assert expected != prompt + tokenizer.decode(new, skip_special_tokens=True)

    argv = ["--model_name_or_path", str(tiny_llama), "--prompt", prompt, "--length", "12"]
    assert run_generation.main([*argv, "--temperature", "0"]) == [expected]


def test_chat_uses_the_tokenizers_template_and_prints_only_the_answer(
    tiny_qwen, capsys, one_thread
):
    tokenizer, model = load(tiny_qwen)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = greedy_answer(tokenizer, model, messages, tokenizer.chat_template, 12)
    argv = ["--model_name_or_path", str(tiny_qwen), "--chat", "--system", "Be brief."]
    result = run_generation.main([*argv, "--prompt", "Hi", "--length", "12", "--temperature", "0"])
    assert result == [expected] == texts_of(capsys.readouterr().out)


@pytest.mark.parametrize("template_writes_bos", [False, True])
def test_llama_chat_prompt_has_one_bos_whether_or_not_the_template_writes_it(
    template_writes_bos, tiny_llama, tmp_path, capsys, one_thread
):
    tokenizer, model = load(tiny_llama)
    assert tokenizer.chat_template is None  # so the script uses the repo's, which writes no BOS
    template = (REPO / "chat_template.jinja").read_text(encoding="utf-8")
    path = tiny_llama
    if template_writes_bos:  # as Llama's own templates do
        path = copy_of(tiny_llama, tmp_path)
        template = tokenizer.chat_template = "{{ bos_token }}" + template
        tokenizer.save_pretrained(path)
    expected = greedy_answer(tokenizer, model, [{"role": "user", "content": "Hi"}], template, 12)
    argv = ["--model_name_or_path", str(path), "--chat", "--prompt", "Hi", "--length", "12"]
    assert run_generation.main([*argv, "--temperature", "0"]) == [expected]


@pytest.fixture
def ends_turns_at_once(tiny_qwen, tmp_path) -> Path:
    """A Qwen whose every next token is id 0, and a template that ends answers with that token.

    Id 0 is <|endoftext|>, not the EOS (<|im_end|>): only the template says that it ends a turn.
    """
    path = copy_of(tiny_qwen, tmp_path)
    tokenizer, model = load(path)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks the first id
    model.save_pretrained(path)
    tokenizer.chat_template = CHATML.replace("<|im_end|>", "<|endoftext|>")
    tokenizer.save_pretrained(path)
    assert tokenizer.convert_ids_to_tokens(0) == "<|endoftext|>" != tokenizer.eos_token
    return path


def test_chat_stops_at_the_templates_end_of_turn_not_at_length(
    ends_turns_at_once, capsys, one_thread
):
    argv = ["--model_name_or_path", str(ends_turns_at_once), "--prompt", "Hi", "--length", "10"]
    run_generation.main([*argv, "--temperature", "0"])
    assert sequences(capsys.readouterr().out)[0][1] == 10  # a continuation runs to --length
    assert run_generation.main([*argv, "--temperature", "0", "--chat"]) == [""]
    assert sequences(capsys.readouterr().out) == [(1, 0, "")]


def test_lora_adapter_folder_samples_like_the_merged_model(
    lora_run, tiny_gpt2, monkeypatch, capsys, one_thread
):
    def greedy(model_dir: Path) -> list[str]:
        argv = ["--model_name_or_path", str(model_dir), "--prompt", "ROMEO:", "--length", "12"]
        return run_generation.main([*argv, "--temperature", "0"])

    adapter = greedy(lora_run / "adapter")
    assert adapter == greedy(lora_run) != greedy(tiny_gpt2)
    # The interactive script takes the adapter folder the same way.
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\n"))
    argv = [str(lora_run / "adapter"), "--length", "12", "--temperature", "0"]
    assert run_generate_neo.main(argv) == 0
    assert generations(capsys.readouterr().out) == adapter


def test_adapter_folder_without_peft_installed_says_what_to_do(lora_run, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "peft" else find_spec(name, *rest),
    )
    with pytest.raises(SystemExit) as stop:
        run_generation.main(["--model_name_or_path", str(lora_run / "adapter"), "--prompt", "Hi"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"run_generation.py: error: {lora_run / 'adapter'} is a LoRA adapter, which needs the peft "
        "package: pip install peft, or pass the merged model folder that run_clm.py wrote above it"
    ]


# --- bad input --------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "script, argv, says",
    [
        ("run_generation.py", ["--length", "0"], "argument --length: must be at least 1, got 0"),
        ("run_generation.py", ["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
        ("run_generation.py", ["--system", "Hi"], "--system is a chat message: add --chat"),
        (
            "run_generation.py",
            ["--fp16", "--dtype", "bfloat16"],
            "--fp16 and --dtype bfloat16 disagree",
        ),
        ("run_generate_neo.py", ["--system", "Hi"], "--system is a chat message: add --chat"),
        ("run_generate_neo.py", ["--top_p", "0"], "argument --top_p: must be above 0"),
    ],
)
def test_bad_flags_are_one_line_before_any_model_loads(script, argv, says, tiny_gpt2, capsys):
    model = (
        [str(tiny_gpt2)]
        if script == "run_generate_neo.py"
        else ["--model_name_or_path", str(tiny_gpt2)]
    )
    with pytest.raises(SystemExit) as stop:
        SCRIPTS[script].main([*model, *argv])
    assert stop.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{script}: error: ") and says in line


def test_inputs_the_model_cannot_take_are_one_line(
    tiny_gpt2, tmp_path, monkeypatch, capsys, one_thread
):
    with pytest.raises(SystemExit):
        run_generation.main(["--model_name_or_path", str(tiny_gpt2), "--prompt", "word" * 200])
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        "run_generation.py: error: the prompt is 200 tokens, the model reads at most 128; shorten it"
    )
    strict = copy_of(tiny_gpt2, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(strict)
    tokenizer.chat_template = "{{ raise_exception('a system message must come first') }}"
    tokenizer.save_pretrained(strict)
    with pytest.raises(SystemExit):
        run_generation.main(["--model_name_or_path", str(strict), "--chat", "--prompt", "Hi"])
    refused = "error: the chat template refused the conversation: a system message must come first"
    assert capsys.readouterr().err.splitlines()[-1] == f"run_generation.py: {refused}"
    # The loop finds out at the first prompt, and stops the same way.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    with pytest.raises(SystemExit) as stop:
        run_generate_neo.main([str(strict), "--chat"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"run_generate_neo.py: {refused}"


# --- run_generate_neo.py ----------------------------------------------------------------------


def generations(stdout: str) -> list[str]:
    """The streamed texts: what follows each prompt marker, without the blank-line re-prompts."""
    return [part.strip() for part in stdout.split(run_generate_neo.PROMPT) if part.strip()]


def test_neo_loop_prints_one_generation_per_prompt_and_exits_on_eof(
    tiny_neo, neo_expected, monkeypatch, capsys, one_thread
):
    monkeypatch.setattr(sys, "stdin", io.StringIO(NEO_INPUT))
    assert run_generate_neo.main([str(tiny_neo), *NEO_FLAGS]) == 0
    assert generations(capsys.readouterr().out) == neo_expected


@pytest.fixture(scope="module")
def neo_expected(tiny_neo: Path) -> list[str]:
    """What the loop must print for NEO_INPUT with NEO_FLAGS, computed without our scripts."""
    return [(prompt + greedy_continuation(tiny_neo, prompt, 12)).strip() for prompt in NEO_PROMPTS]


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


def reference_chat(
    model_dir: Path, system: str, questions: list[str], length: int
) -> tuple[list[str], int]:
    """Greedy answers to a conversation kept within the model's context, and messages dropped."""
    tokenizer, model = load(model_dir)
    template = (REPO / "chat_template.jinja").read_text(encoding="utf-8")
    limit = model.config.max_position_embeddings
    messages, answers, dropped = [{"role": "system", "content": system}], [], 0
    for question in questions:
        messages.append({"role": "user", "content": question})
        while True:
            text = tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
            if len(tokenizer(text)["input_ids"]) + length <= limit or len(messages) < 4:
                break
            del messages[1:3]
            dropped += 2
        answers.append(greedy_answer(tokenizer, model, messages, template, length))
        messages.append({"role": "assistant", "content": answers[-1]})
    return answers, dropped


def test_neo_chat_keeps_the_conversation_and_drops_the_oldest_turns(
    tiny_llama, monkeypatch, capsys, one_thread
):
    questions = ["Who art thou?", "Whence comest thou?", "What news?", "Farewell."]
    answers, dropped = reference_chat(tiny_llama, "Be brief.", questions, 30)
    assert dropped > 0  # 128 positions: the fourth question no longer fits beside them all
    # The model sees the history: alone, the second question gets another answer.
    assert reference_chat(tiny_llama, "Be brief.", questions[1:2], 30)[0] != answers[1:2]

    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n"))
    argv = [str(tiny_llama), "--chat", "--system", "Be brief.", "--length", "30"]
    assert run_generate_neo.main([*argv, "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert generations(captured.out) == [answer for answer in answers if answer]
    notes = re.findall(r"dropped the (\d+) oldest messages", captured.err)
    assert sum(map(int, notes)) == dropped


# --- docs/generation.md -----------------------------------------------------------------------


DOC_COMMANDS = [argv for block in markdown_blocks(DOCS, "bash") for argv in shell_commands(block)]
# The guide's command runs in a process of its own, in guide_run.
IN_PROCESS = [argv for argv in DOC_COMMANDS if argv != GUIDE_COMMAND.split()]


def test_docs_show_the_guides_commands_and_make_no_speed_claim():
    assert GUIDE_COMMAND.split() in DOC_COMMANDS
    assert NEO_COMMAND.split() in DOC_COMMANDS
    assert {argv[1] for argv in DOC_COMMANDS} == set(SCRIPTS)
    claims = r"\bspeed|faster|slower|\b\d+(\.\d+)?\s*x\b"
    assert not re.search(claims, DOCS.read_text(encoding="utf-8"), re.I)


@pytest.mark.parametrize("argv", IN_PROCESS, ids=[" ".join(argv[1:]) for argv in IN_PROCESS])
def test_docs_command_runs_as_printed(argv, lora_run, tmp_path, monkeypatch, capsys, one_thread):
    """Each command of the page, from a folder whose `finetuned` is a LoRA run's output."""
    assert argv[0] == "python" and argv[1] in SCRIPTS
    monkeypatch.chdir(workdir_with(tmp_path, lora_run))
    monkeypatch.setattr(sys, "stdin", io.StringIO("From off a hill\n"))
    result = SCRIPTS[argv[1]].main(argv[2:])
    captured = capsys.readouterr()
    assert only_our_lines(captured.err, argv[1]), captured.err
    printed = (
        texts_of(captured.out) if argv[1] == "run_generation.py" else generations(captured.out)
    )
    assert printed and all(printed)
    if argv[1] == "run_generation.py":
        assert result == printed
    else:
        assert result == 0


def snippet(markdown: Path, family: str) -> str:
    """The Python snippet a markdown file (this page, or the README) shows for a model family."""
    blocks = markdown_blocks(markdown, "python")
    assert len(blocks) == 2
    marker = {"gpt2": "GPT2LMHeadModel", "gpt_neo": "GPTNeoForCausalLM"}[family]
    [code] = [block for block in blocks if marker in block]
    return code


def snippet_texts(code: str) -> list[str]:
    """The `texts = [...]` list a snippet generates from."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "texts":
            return ast.literal_eval(node.value)
    raise AssertionError("snippet has no `texts = [...]`")


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_docs_snippet_runs_as_printed(
    family, roomy_models, tmp_path, monkeypatch, capsys, one_thread
):
    code = snippet(DOCS, family)
    (tmp_path / "snippet.py").write_text(code, encoding="utf-8")
    monkeypatch.chdir(workdir_with(tmp_path, roomy_models[family]))
    # In this process (a new one would cost seconds), the file as a user saves and runs it.
    names = runpy.run_path("snippet.py", run_name="__main__")
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    prompts = snippet_texts(code)
    assert len(printed) == len(prompts) >= 2
    for text, prompt in zip(printed, prompts, strict=True):
        assert text.startswith(prompt) and len(text) > len(prompt)
    # The GPT-Neo folder is saved in float16, which a CPU runs in float32; GPT-2's is float32.
    assert names["model"].dtype == torch.float32


# --- the commands in processes of their own (started by `processes`) --------------------------


def test_guide_command_prints_a_sequence_of_the_requested_length(processes):
    guide_run = finished(processes["guide"])
    assert guide_run.returncode == 0, guide_run.stderr
    [(number, tokens, text)] = sequences(guide_run.stdout)
    assert (number, tokens) == (1, 200)
    assert text.startswith("From off a hill")
    assert len(text) > len("From off a hill") + 200  # 200 BPE tokens are more than 200 chars
    assert only_our_lines(guide_run.stderr, "run_generation.py"), guide_run.stderr


def test_neo_loop_with_deepspeed_on_cpu_gives_the_same_tokens(processes, neo_expected):
    neo_deepspeed = finished(processes["neo_deepspeed"])
    assert neo_deepspeed.returncode == 0, neo_deepspeed.stderr
    assert (
        "model wrapped by deepspeed.init_inference (kernel injection off)" in neo_deepspeed.stderr
    )
    # DeepSpeed's own chatter would land in stdout or stderr: neither may hold anything but ours.
    assert only_our_lines(neo_deepspeed.stderr, "run_generate_neo.py"), neo_deepspeed.stderr
    assert generations(neo_deepspeed.stdout) == neo_expected
    assert neo_deepspeed.stdout.startswith(run_generate_neo.PROMPT)


def test_unknown_hub_id_is_one_line_error_from_the_command_line(processes):
    # A subprocess: only a fresh interpreter is sure to see HF_HUB_OFFLINE (conftest sets it after
    # transformers is imported), so this stays offline and fast. The config is fetched first, so
    # nothing is said about loading a model that is not there.
    result = finished(processes["unknown_hub"])
    assert result.returncode == 2
    assert result.stdout == ""
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(
        "run_generation.py: error: cannot load no-such-org/no-such-model "
        "(not a local directory, tried as a hub model id): "
    )
