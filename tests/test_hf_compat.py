"""A drop-in for HF's examples/pytorch/language-modeling/run_clm.py: its own tests' argument
lists, its flags and 2021's spellings, called the way HF's tests call it (main() in-process)."""

import json
import sys
from unittest.mock import patch

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tiny import REPO

sys.path.insert(0, str(REPO))
import run_clm

# What HF keeps in tests/fixtures/sample_text.txt: a few paragraphs of plain prose.
SAMPLE_TEXT = "\n".join(
    f"{i}. Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried."
    for i in range(40)
)


@pytest.fixture
def sample_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_text.txt").write_text(SAMPLE_TEXT, encoding="utf-8")
    return "sample_text.txt"


def test_hfs_fine_tune_test_runs_unchanged(sample_text, tmp_path, tiny_gpt2):
    """HF's test_run_clm, with distilgpt2 swapped for a tiny local GPT-2 (and --use_cpu, as HF adds)."""
    testargs = f"""
        run_clm.py --model_name_or_path {tiny_gpt2} --train_file {sample_text}
        --validation_file {sample_text} --do_train --do_eval --block_size 128
        --per_device_train_batch_size 5 --per_device_eval_batch_size 5 --num_train_epochs 2
        --output_dir {tmp_path / "out"} --overwrite_output_dir --use_cpu
        """.split()
    with patch.object(sys, "argv", testargs):
        run_clm.main()
    result = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert result["epoch"] == 2 and result["perplexity"] == pytest.approx(torch.exp(torch.tensor(result["eval_loss"])).item(), rel=1e-4)  # fmt: skip
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.n_embd == 64


def test_hfs_config_overrides_test_builds_the_model_it_asks_for(sample_text, tmp_path, tiny_gpt2, capsys):  # fmt: skip
    """HF's test_run_clm_config_overrides: a new model from --model_type and the overrides."""
    testargs = f"""
        run_clm.py --model_type gpt2 --tokenizer_name {tiny_gpt2} --train_file {sample_text}
        --output_dir {tmp_path / "out"} --config_overrides n_embd=10,n_head=2 --use_cpu
        """.split()
    with patch.object(sys, "argv", testargs):
        run_clm.main()
    out = capsys.readouterr().out
    assert '"n_embd": 10' in out and '"n_head": 2' in out  # what HF's test reads from the log
    with patch.object(sys, "argv", [*testargs, "--do_train", "--max_steps", "2"]):
        run_clm.main()
    saved = AutoConfig.from_pretrained(tmp_path / "out")
    assert (saved.n_embd, saved.n_head, saved.model_type) == (10, 2, "gpt2")


def test_2021_spellings_still_work(sample_text, tmp_path, tiny_gpt2, capsys):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--train_file", sample_text, "--validation_file", sample_text, "--do_train", "--do_eval",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--block_size", "32",
            "--evaluation_strategy=steps", "--eval_steps", "1", "--max_val_samples", "3",
            "--torch_dtype", "bfloat16", "--bf16", "--use_auth_token", "--low_cpu_mem_usage"]  # fmt: skip
    run_clm.main(argv)
    out = capsys.readouterr().out
    assert (
        "warning: --use_auth_token is deprecated; your saved hub login is used (or pass --token)."
        in out
    )
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["eval_samples"] == 3
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e][:2] == [1, 2]  # evaluated every step
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["save_to_disk", "folder of files"])
def test_dataset_name_reads_local_datasets_offline(tmp_path, tiny_gpt2, layout, capsys):
    lines = SAMPLE_TEXT.splitlines()
    if layout == "save_to_disk":
        splits = {"train": lines[:30], "validation": lines[30:]}
        datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(tmp_path / "data")  # fmt: skip
    else:
        (tmp_path / "data").mkdir()
        for split, part in (("train", lines[:30]), ("validation", lines[30:])):
            (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))  # fmt: skip
    argv = ["--model_name_or_path", str(tiny_gpt2), "--dataset_name", str(tmp_path / "data"), "--do_train",
            "--do_eval", "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--block_size", "32"]  # fmt: skip
    run_clm.main(argv)
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["train_samples"] > 0 and results["eval_samples"] > 0


def test_a_dataset_of_chats_is_read_like_a_file_of_them(tmp_path, tiny_gpt2, capsys):
    """A `messages` column, as the hub's chat datasets have it (it was refused row by row)."""
    chat = [{"role": "user", "content": "Who is Prospero?"}, {"role": "assistant", "content": "The right Duke of Milan."}]  # fmt: skip
    datasets.Dataset.from_list([{"messages": chat}] * 4).save_to_disk(tmp_path / "chats")
    run_clm.main(["--model_name_or_path", str(tiny_gpt2), "--dataset_name", str(tmp_path / "chats"),
                  "--output_dir", str(tmp_path / "out"), "--show_examples", "1"])  # fmt: skip
    assert "[[ The right Duke of Milan." in capsys.readouterr().out


def test_a_dataset_that_is_not_there_is_one_line(tmp_path, tiny_gpt2, capsys):
    argv = ["--model_name_or_path", str(tiny_gpt2), "--dataset_name", "no-such-org/no-such-data",
            "--do_train", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        run_clm.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        "run_clm.py: error: --dataset_name no-such-org/no-such-data: cannot load it"
    )


@pytest.mark.parametrize("eos_between_rows", [False, True])
def test_dataset_rows_give_the_tokens_of_hfs_script(tmp_path, eos_between_rows):
    """wikitext's layout: lines of articles as rows, a third of them empty. HF's script encodes
    each row as the tokenizer does (BOS first for Llama) and runs them together; empty rows add
    nothing here, and --eos_between_rows puts an end-of-text token after each row."""
    from transformers import TrainingArguments

    import clm_data
    from tiny import gpt2_tokenizer, llama_tokenizer

    lines = SAMPLE_TEXT.splitlines()
    rows = [" = Heading = ", *(row for line in lines for row in (line, ""))]
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(tmp_path / "data")
    data = clm_data.DataArguments(dataset_name=str(tmp_path / "data"), eos_between_rows=eos_between_rows)  # fmt: skip
    training = TrainingArguments(str(tmp_path / "out"), report_to="none")
    for tokenizer in (gpt2_tokenizer(), llama_tokenizer()):
        splits = clm_data.load_splits(data, tokenizer, run_clm.ModelArguments())
        blocks = clm_data.tokenize(splits, tokenizer, data, 32, training)["train"]["input_ids"]
        eos = [tokenizer.eos_token_id] * eos_between_rows
        stream = [i for row in rows if row for i in tokenizer(row)["input_ids"] + eos]
        assert blocks == [stream[at : at + 32] for at in range(0, len(stream) - 31, 32)]


def test_a_new_model_and_an_adapter_take_the_tokenizers_vocabulary(sample_text, tmp_path, tiny_gpt2, tiny_llama):  # fmt: skip
    """A Llama built from scratch with GPT-2's tokenizer (50257 ids against Llama's 32000), and a
    LoRA run on a model whose tokenizer gained tokens: the embeddings grow, as in HF's script."""
    from transformers import AutoTokenizer

    argv = ["--model_type", "llama", "--tokenizer_name", str(tiny_gpt2), "--train_file", sample_text,
            "--config_overrides", "hidden_size=32,intermediate_size=64,num_hidden_layers=1,num_attention_heads=2,num_key_value_heads=2",
            "--do_train", "--max_steps", "2", "--block_size", "32", "--output_dir", str(tmp_path / "new")]  # fmt: skip
    run_clm.main(argv)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    assert model.config.vocab_size == 50257 and model.generation_config.eos_token_id == 50256
    grown = tmp_path / "grown"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_tokens(["<|tool|>", "<|answer|>"])
    tokenizer.save_pretrained(grown)
    for name in ("config.json", "model.safetensors"):
        (grown / name).write_bytes((tiny_llama / name).read_bytes())
    text = tmp_path / "tools.txt"
    text.write_text("<|tool|> look it up <|answer|> Marlowe.\n" * 100, encoding="utf-8")
    run_clm.main(["--model_name_or_path", str(grown), "--train_file", str(text), "--use_peft", "--do_train",
                  "--max_steps", "2", "--block_size", "32", "--output_dir", str(tmp_path / "lora")])  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert merged.get_input_embeddings().weight.shape[0] == len(tokenizer)
    ids = torch.tensor([tokenizer("<|tool|> look it up <|answer|>")["input_ids"]])
    assert torch.isfinite(merged(ids).logits).all()
