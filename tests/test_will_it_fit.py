"""will_it_fit.py: its model-state figures are DeepSpeed's, its verdicts match the guide's machines,
and a run too big for its GPU gets a change that fits."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import REPO, tiny_model

sys.path.insert(0, str(REPO))
import will_it_fit as wif

GIB = 2**30
V100 = wif.Machine(gpu=16 * GIB, ram=78 * GIB, gpu_source="test", ram_source="test")

# What the guide's configs hold; used only where the repo's own files are missing.
GUIDE_ZERO2 = {
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "zero_optimization": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        "allgather_partitions": True,
        "allgather_bucket_size": 2e8,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 2e8,
        "contiguous_gradients": True,
    },
    "train_micro_batch_size_per_gpu": "auto",
}


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    """ds_config.json and ds_config_gptneo.json from the repo, or the guide's content if absent."""
    found = {}
    scratch = tmp_path_factory.mktemp("ds")
    for name, bucket in (("ds_config.json", 2e8), ("ds_config_gptneo.json", 5e7)):
        path = REPO / name
        if not path.is_file():
            config = json.loads(json.dumps(GUIDE_ZERO2))
            config["zero_optimization"]["allgather_bucket_size"] = bucket
            config["zero_optimization"]["reduce_bucket_size"] = bucket
            path = scratch / name
            path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        found[name] = path
    found["ds_config_zero3.json"] = REPO / "ds_config_zero3.json"
    return found


@pytest.fixture(scope="module")
def facts():
    """ModelFacts per published name, each built once (meta device, so no memory)."""
    cache = {}

    def get(name: str) -> wif.ModelFacts:
        if name not in cache:
            cache[name] = wif.model_facts(name)
        return cache[name]

    return get


def zero(configs, name: str, model: wif.ModelFacts) -> wif.ZeroSettings:
    return wif.load_zero_settings(configs[name], model.hidden)


def run(micro: int = 8, accum: int = 2, gpus: int = 1, nodes: int = 1) -> wif.Run:
    return wif.Run(micro, accum, 1024, gpus, nodes, "fp16")


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    return subprocess.run(
        [sys.executable, str(REPO / "will_it_fit.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def total(stdout: str, title: str) -> float:
    """The GiB total printed under a section ("GPU memory" or "host RAM")."""
    section = stdout.split(title, 1)[1]
    return float(re.search(r"^\s+total\s+([\d.]+)", section, flags=re.MULTILINE).group(1))


# --- model states are DeepSpeed's -------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo"])
def test_counts_from_config_equal_deepspeeds_count_of_the_real_model(tmp_path, family):
    from deepspeed.runtime.zero.stage3 import model_to_params

    model = tiny_model(family)
    model.config.save_pretrained(tmp_path)
    planned = wif.model_facts(str(tmp_path))
    assert (planned.params, planned.largest_layer_params) == model_to_params(model)


@pytest.mark.parametrize(
    ("config", "gpus", "nodes"),
    [
        ("ds_config.json", 1, 1),
        ("ds_config.json", 4, 2),
        ("ds_config_zero3.json", 1, 1),
        ("ds_config_zero3.json", 8, 2),
    ],
)
@pytest.mark.parametrize("name", ["gpt2-xl", "EleutherAI/gpt-neo-2.7B"])
def test_model_states_equal_deepspeeds_estimators(configs, facts, name, config, gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = facts(name)
    planned = wif.plan(model, zero(configs, config, model), run(gpus=gpus, nodes=nodes), V100)
    if config == "ds_config.json":
        expected = estimate_zero2_model_states_mem_needs(
            total_params=model.params, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=True
        )
    else:
        expected = estimate_zero3_model_states_mem_needs(
            total_params=model.params,
            largest_layer_params=model.largest_layer_params,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=True,
            cpu_offload_params=True,
            zero_init=True,
        )[:2]
    assert (planned.states_cpu, planned.states_gpu) == expected
    # The figures the user reads are those same numbers, first line of each section.
    assert planned.gpu_items[0].size == expected[1]
    assert planned.ram_items[0].size == expected[0]


def test_without_offload_deepspeed_charges_the_optimizer_to_the_gpu(facts):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = facts("gpt2-xl")
    settings = wif.zero_settings({"zero_optimization": {"stage": 2}}, "inline", model.hidden)
    planned = wif.plan(model, settings, run(), V100)
    expected = estimate_zero2_model_states_mem_needs(total_params=model.params, cpu_offload=False)
    assert (planned.states_cpu, planned.states_gpu) == expected
    assert not planned.gpu_fits  # 20 bytes a parameter: 29 GiB before any activation


def test_published_counts():
    # Parameter counts of the released checkpoints (tied embeddings counted once).
    assert wif.model_facts("gpt2-xl").params == 1_557_611_200
    assert wif.model_facts("EleutherAI/gpt-neo-2.7B").params == 2_651_307_520
    assert wif.model_facts("openai-community/GPT2-XL").name == "gpt2-xl"


# --- the guide's two runs ---------------------------------------------------------------------


def test_gpt2_xl_with_ds_config_fits_a_16gb_gpu_and_needs_the_guides_ram(configs):
    done = cli(
        "--model",
        "gpt2-xl",
        "--deepspeed",
        str(configs["ds_config.json"]),
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--gpu_memory",
        "16GB",
        "--ram",
        "78GB",
    )
    assert done.returncode == 0, done.stderr
    assert "verdict: fits" in done.stdout
    assert "--deepspeed" in done.stdout.splitlines()[-1]
    gpu, ram = total(done.stdout, "GPU memory"), total(done.stdout, "host RAM")
    assert 8 < gpu <= 16
    # The guide: 60 GB of RAM is enough, a small machine crashes when saving.
    assert 35 <= ram <= 60
    # Nothing DeepSpeed logs may land among the plan.
    assert "[WARNING]" not in done.stdout and "[INFO]" not in done.stdout


def test_gpt2_xl_does_not_fit_a_small_host(configs, facts):
    model = facts("gpt2-xl")
    small = wif.Machine(gpu=16 * GIB, ram=32 * GIB, gpu_source="test", ram_source="test")
    planned = wif.plan(model, zero(configs, "ds_config.json", model), run(), small)
    assert planned.gpu_fits and not planned.ram_fits


def test_gpt_neo_with_its_config_fits_16gb_and_needs_about_70gb(configs, facts):
    model = facts("EleutherAI/gpt-neo-2.7B")
    planned = wif.plan(model, zero(configs, "ds_config_gptneo.json", model), run(micro=4), V100)
    assert planned.fits
    assert planned.gpu_total <= 16 * GIB
    # The guide: "needs at least 70 GB RAM", and it ran on a 78 GB machine.
    assert 62 * GIB <= planned.ram_total <= 78 * GIB


def test_activations_grow_with_the_micro_batch(configs, facts):
    model = facts("gpt2-xl")
    settings = zero(configs, "ds_config.json", model)
    small, big = (wif.plan(model, settings, run(micro=m), V100) for m in (1, 12))
    assert big.gpu_total > small.gpu_total + 5 * GIB
    assert big.ram_total == small.ram_total


# --- activation checkpointing ------------------------------------------------------------------


def saved_activation_bytes(model, micro_batch: int, block_size: int) -> int:
    """Bytes autograd keeps for backward over the transformer blocks of a real bf16 model."""
    blocks = model.transformer.h
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def keep(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    hidden = torch.randn(micro_batch, block_size, model.config.n_embd, dtype=torch.bfloat16)
    hidden.requires_grad_(True)
    start = hidden.untyped_storage().data_ptr()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        for block in blocks:
            hidden = block(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return sum(size for ptr, size in kept.items() if ptr not in weights and ptr != start)


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_no_checkpointing_estimate_covers_what_autograd_really_keeps(tmp_path, activation):
    from transformers import GPT2Config, GPT2LMHeadModel

    # Fine-tuning configs keep dropout; without it nothing but activations is saved, so the
    # estimate (which counts dropout masks) may only be a little above the measurement.
    config = GPT2Config(
        n_layer=2, n_embd=256, n_head=4, n_positions=512, vocab_size=512,
        activation_function=activation, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
    )  # fmt: skip
    config.save_pretrained(tmp_path)
    model = GPT2LMHeadModel(config).to(torch.bfloat16).train()
    measured = saved_activation_bytes(model, micro_batch=2, block_size=512)
    facts = wif.model_facts(str(tmp_path))
    items = wif.activation_items(facts, wif.Run(2, 1, 512, 1, 1, "bf16", checkpointing=False))
    planned = next(item.size for item in items if "not checkpointed" in item.label)
    assert measured <= planned <= 1.25 * measured, (planned, measured)


def guide_gpt2_xl(configs, gpu: str, *extra: str, micro: str = "8", accum: str = "2") -> list[str]:
    return [
        *("--model", "gpt2-xl", "--deepspeed", str(configs["ds_config.json"])),
        *("--per_device_train_batch_size", micro, "--gradient_accumulation_steps", accum),
        *("--gpu_memory", gpu, "--ram", "78GB", *extra),
    ]


def test_a_big_gpu_is_told_it_can_drop_checkpointing_and_a_16gb_one_is_not(configs, capsys):
    assert wif.main(guide_gpt2_xl(configs, "80GB")) == 0
    faster = [line for line in capsys.readouterr().out.splitlines() if line.startswith("faster:")]
    assert len(faster) == 1 and faster[0].endswith("add --gradient_checkpointing False")
    assert wif.main(guide_gpt2_xl(configs, "16GB")) == 0
    assert "faster:" not in capsys.readouterr().out


def test_dropping_checkpointing_is_suggested_only_with_10_percent_to_spare(configs, facts, capsys):
    model = facts("gpt2-xl")
    settings = zero(configs, "ds_config.json", model)
    off = wif.Run(8, 2, 1024, 1, 1, "fp16", checkpointing=False)
    needed = wif.plan(model, settings, off, V100).gpu_total / GIB
    for gpu, hinted in ((needed + 0.5, False), (needed / 0.88, True)):
        assert wif.main(guide_gpt2_xl(configs, f"{gpu:.2f}GB")) == 0
        assert ("faster:" in capsys.readouterr().out) is hinted, gpu


def last_line(capsys) -> tuple[str, str]:
    out = capsys.readouterr().out
    return out, out.strip().splitlines()[-1]


def test_no_checkpointing_on_16gb_keeps_it_off_with_a_smaller_micro_batch(configs, capsys):
    assert wif.main(guide_gpt2_xl(configs, "16GB", "--gradient_checkpointing", "False")) == 1
    out, suggested = last_line(capsys)
    assert "activation checkpointing off" in out and "does NOT fit" in out
    assert "Cheapest change that fits: smaller micro-batch" in out
    micro = int(re.search(r"--per_device_train_batch_size (\d+)", suggested).group(1))
    accum = int(re.search(r"--gradient_accumulation_steps (\d+)", suggested).group(1))
    assert micro < 8 and micro * accum == 16
    assert suggested.endswith("--gradient_checkpointing False")


def test_checkpointing_comes_back_on_when_no_smaller_micro_batch_fits(configs, capsys):
    argv = guide_gpt2_xl(configs, "8GB", "--gradient_checkpointing", "False", micro="1", accum="16")
    assert wif.main(argv) == 1
    out, suggested = last_line(capsys)
    assert "Cheapest change that fits: activation checkpointing back on (drop" in out
    assert "--per_device_train_batch_size 1 --gradient_accumulation_steps 16" in suggested
    assert "--gradient_checkpointing" not in suggested
    assert wif.main(argv[:-2]) == 0  # the plan it names really fits


def test_checkpointing_back_on_is_named_when_a_bigger_change_follows(configs, capsys):
    argv = [
        *("--model", "facebook/opt-13b", "--deepspeed", str(configs["ds_config.json"])),
        *("--gpu_memory", "16GB", "--ram", "512GB", "--gradient_checkpointing", "False"),
    ]
    assert wif.main(argv) == 1
    out, suggested = last_line(capsys)
    assert "activation checkpointing back on (drop --gradient_checkpointing False) + ZeRO-3" in out
    assert "ds_config_zero3.json" in suggested and "--gradient_checkpointing" not in suggested
    assert wif.main(guide_gpt2_xl(configs, "80GB", "--gradient_checkpointing", "false")) == 0
    _, last = last_line(capsys)
    assert last.startswith("verdict: fits.") and last.endswith("--gradient_checkpointing False")


def test_a_checkpointing_value_that_is_not_true_or_false_is_refused(configs):
    done = cli(*guide_gpt2_xl(configs, "16GB", "--gradient_checkpointing", "maybe"))
    assert done.returncode == 2 and done.stdout == ""
    assert "--gradient_checkpointing: 'maybe' is not True or False" in done.stderr


# --- too big: the cheapest change -------------------------------------------------------------


def test_gpt_j_on_16gb_gets_a_smaller_micro_batch_with_the_same_effective_batch(configs, capsys):
    code = wif.main(
        [
            "--model",
            "EleutherAI/gpt-j-6b",
            "--deepspeed",
            str(configs["ds_config.json"]),
            "--per_device_train_batch_size",
            "8",
            "--gradient_accumulation_steps",
            "2",
            "--gpu_memory",
            "16GB",
            "--ram",
            "256GB",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "does NOT fit" in out
    change = out.split("Cheapest change that fits:", 1)[1]
    match = re.search(
        r"--per_device_train_batch_size (\d+) --gradient_accumulation_steps (\d+)", change
    )
    micro, accum = int(match.group(1)), int(match.group(2))
    assert micro < 8 and micro * accum == 16
    assert "smaller micro-batch" in change


def test_a_13b_model_on_16gb_is_sent_to_zero3_and_that_plan_fits(configs, facts):
    model = facts("facebook/opt-13b")
    big_host = wif.Machine(gpu=16 * GIB, ram=512 * GIB, gpu_source="test", ram_source="test")
    settings = zero(configs, "ds_config.json", model)
    assert not wif.plan(model, settings, run(micro=1, accum=16), big_host).gpu_fits
    change = wif.cheapest_change(model, settings, run(), big_host)
    assert change is not None and change.plan.fits
    assert change.plan.zero.stage == 3 and change.plan.zero.source.endswith("ds_config_zero3.json")
    assert change.plan.run.effective_batch == run().effective_batch


def test_smaller_buckets_come_before_zero3_and_name_the_neo_config(configs, facts):
    model = facts("EleutherAI/gpt-neo-2.7B")
    settings = zero(configs, "ds_config.json", model)
    one = wif.plan(model, settings, run(micro=1, accum=16), V100)
    small = wif.small_bucket_settings(model, settings)
    with_small = wif.plan(model, small, run(micro=1, accum=16), V100)
    between = (one.gpu_total + with_small.gpu_total) // 2
    tight = wif.Machine(gpu=between, ram=78 * GIB, gpu_source="test", ram_source="test")
    change = wif.cheapest_change(model, settings, run(), tight)
    assert change is not None and change.plan.fits
    assert change.what.startswith("5e7 buckets")
    assert change.plan.zero.reduce_bucket_size == change.plan.zero.allgather_bucket_size == 5e7
    if (REPO / "ds_config_gptneo.json").is_file():
        assert change.plan.zero.source.endswith("ds_config_gptneo.json")


def test_a_host_too_small_for_any_single_node_plan_gets_more_nodes(configs, facts):
    model = facts("EleutherAI/gpt-j-6b")
    settings = zero(configs, "ds_config.json", model)
    before = run(micro=2, accum=8)
    change = wif.cheapest_change(model, settings, before, V100)
    assert change is not None and change.plan.fits
    assert change.what.startswith("more GPUs")
    assert change.plan.run.nodes > 1 and change.plan.zero.stage == 3
    # Spread over more GPUs, it accumulates less but trains on as many sequences per step.
    assert change.plan.run.effective_batch == before.effective_batch
    assert change.plan.run.grad_accum < before.grad_accum


# --- the ZeRO-3 config ------------------------------------------------------------------------


def test_zero3_config_offloads_both_and_saves_a_normal_model(configs, facts):
    raw = json.loads(configs["ds_config_zero3.json"].read_text(encoding="utf-8"))
    zero_opt = raw["zero_optimization"]
    assert zero_opt["stage3_gather_16bit_weights_on_model_save"] is True
    # Everything TrainingArguments owns is left to it.
    assert raw["train_micro_batch_size_per_gpu"] == raw["gradient_accumulation_steps"] == "auto"
    model = facts("EleutherAI/gpt-j-6b")
    settings = zero(configs, "ds_config_zero3.json", model)
    assert (settings.stage, settings.offload_optimizer, settings.offload_param) == (3, "cpu", "cpu")
    # "auto" sizes come out as the Trainer fills them in.
    assert settings.reduce_bucket_size == 4096 * 4096
    assert settings.prefetch_bucket_size == int(0.9 * 4096 * 4096)
    assert settings.persistence_threshold == 40960
    planned = wif.plan(model, settings, run(), V100)
    assert planned.gpu_fits
    assert planned.ram_items[1].label.startswith("16-bit weights gathered")


# --- input handling ---------------------------------------------------------------------------


def test_malformed_deepspeed_json_is_one_line_naming_file_and_line(tmp_path):
    (tmp_path / "broken.json").write_text(
        '{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n', encoding="utf-8"
    )
    done = cli(
        "--model", "gpt2-xl", "--deepspeed", "broken.json", "--gpu_memory", "16GB", cwd=tmp_path
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("will_it_fit.py: error: broken.json, line 4: malformed JSON")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--model", "gpt2-xxl"], "unknown model 'gpt2-xxl'"),
        (["--model", "gpt2-xl", "--deepspeed", "missing.json"], "missing.json: no such file"),
        (
            ["--model", "gpt2-xl", "--block_size", "2048"],
            "block size 2048 is longer than gpt2-xl's 1024",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(configs, capsys, argv, fragment):
    if "--deepspeed" not in argv:
        argv = [*argv, "--deepspeed", str(configs["ds_config.json"])]
    assert wif.main([*argv, "--gpu_memory", "16GB", "--ram", "78GB"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("will_it_fit.py: error: ") and fragment in captured.err


def test_zero_stage_without_an_estimator_is_refused(tmp_path, capsys):
    (tmp_path / "stage1.json").write_text('{"zero_optimization": {"stage": 1}}', encoding="utf-8")
    assert wif.main(["--model", "gpt2", "--deepspeed", str(tmp_path / "stage1.json")]) == 2
    assert "ZeRO stage 1" in capsys.readouterr().err


def test_memory_sizes():
    assert wif.parse_size("16GB") == wif.parse_size("16GiB") == wif.parse_size("16") == 16 * GIB
    assert wif.parse_size("16160MiB") == 16160 * 2**20
    assert wif.parse_size("1.5tb") == int(1.5 * 2**40)
    with pytest.raises(argparse.ArgumentTypeError):
        wif.parse_size("sixteen")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU to compare with")
def test_without_a_gpu_here_the_planner_says_so(configs, capsys):
    code = wif.main(
        ["--model", "gpt2", "--deepspeed", str(configs["ds_config.json"]), "--ram", "78GB"]
    )
    assert code == 1
    assert "no GPU here" in capsys.readouterr().out


def test_planning_a_6b_model_allocates_no_weights():
    import psutil

    before = psutil.Process().memory_info().rss
    model = wif.model_facts("EleutherAI/gpt-j-6b")
    grown = psutil.Process().memory_info().rss - before
    # Real fp32 weights would take 22 GiB; the meta device takes none.
    assert model.params > 6e9 and grown < 1 * GIB
