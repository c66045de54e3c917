"""Chats under the templates the model families ship, as TRL's package holds them: the loss
falls on each assistant turn as the whole conversation renders it, up to the token that ends the
turn; tools and reasoning train; a template's refusal is one line; a trained folder answers
through plain transformers and stops."""

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiny import CHAT, REPO, family_tokenizer, qwen2_tokenizer, tiny_model

sys.path.insert(0, str(REPO))
import chats
import clm_data
import run_clm
import run_generation

FAMILIES = ["llama3", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "qwen3_instruct_2507", "qwen3_5_think",
            "qwen3_6", "gemma", "gemma3", "phi3", "phi3_5", "deepseekv3", "deepseek_r1_distill", "gptoss",
            "glm4moe", "nemotron_3_nano", "cohere", "cohere2", "lfm2"]  # fmt: skip


def trained_text(tokenizer, messages, tools=None) -> str:
    form = chats.chat_format(tokenizer, tokenizer.chat_template)
    ids, trained = chats.encode(tokenizer, form, messages, tools)
    assert ids == tokenizer(chats.render(tokenizer, form, chats.folded(messages) if form.fold_system else messages, tools=tools), add_special_tokens=False)["input_ids"]  # fmt: skip
    return tokenizer.decode([t for t, on in zip(ids, trained, strict=True) if on])


@pytest.mark.parametrize("family", FAMILIES)
def test_each_assistant_turn_and_its_end_are_trained_and_nothing_else(family):
    tokenizer = family_tokenizer(family)
    text = trained_text(tokenizer, CHAT)
    assert text.count("Shakespeare.") == 1 and text.count("Marlowe.") == 1, text
    assert not any(said in text for said in ("Answer in a word", "Hamlet?", "Faustus?")), text
    end = chats.turn_end(tokenizer, chats.chat_format(tokenizer, tokenizer.chat_template))
    # The end of a turn the conversation goes on after (gpt-oss ends the last one otherwise).
    assert end is not None and tokenizer.decode([end]) in text.split("Shakespeare.")[1], text


def test_a_family_without_a_system_role_gets_it_in_the_first_user_turn(tmp_path, capsys):
    tokenizer = family_tokenizer("gemma")  # Gemma 1 and 2 raise on a system message
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    data = clm_data.DataArguments(train_file=str(tmp_path / "chat.jsonl"))
    from transformers import TrainingArguments

    [row] = clm_data.tokenize(clm_data.load_splits(data, tokenizer, None), tokenizer, data, 256, TrainingArguments(str(tmp_path), report_to="none"))["train"]  # fmt: skip
    assert "<start_of_turn>user\nAnswer in a word.\n\nWho wrote Hamlet?" in tokenizer.decode(row["input_ids"])  # fmt: skip
    assert "no system role: a system message opens the first user turn" in capsys.readouterr().out


def test_tool_calls_and_the_final_answer_train_the_tool_results_do_not():
    tokenizer = family_tokenizer("qwen2_5")
    tools = [{"type": "function", "function": {"name": "author_of", "description": "Who wrote a play",
              "parameters": {"type": "object", "properties": {"play": {"type": "string"}}}}}]  # fmt: skip
    messages = [
        {"role": "user", "content": "Who wrote Hamlet?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "author_of", "arguments": {"play": "Hamlet"}}}]},
        {"role": "tool", "name": "author_of", "content": "William Shakespeare"},
        {"role": "assistant", "content": "Shakespeare wrote it."},
    ]  # fmt: skip
    text = trained_text(tokenizer, messages, tools)
    assert '"name": "author_of", "arguments": {"play": "Hamlet"}' in text
    assert "Shakespeare wrote it.<|im_end|>" in text and "William Shakespeare" not in text
    assert "Who wrote a play" not in text  # the tool schemas are prompt, not answer


def test_reasoning_trains_where_given_and_a_chat_without_it_as_prompted():
    tokenizer = family_tokenizer("qwen3")
    thought = [*CHAT[:4], {"role": "assistant", "content": "Marlowe.", "reasoning_content": "Doctor Faustus is Marlowe's."}]  # fmt: skip
    assert "<think>\nDoctor Faustus is Marlowe's.\n</think>\n\nMarlowe.<|im_end|>" in trained_text(tokenizer, thought)  # fmt: skip
    inline = [*CHAT[:4], {"role": "assistant", "content": "<think>\nIt is Marlowe's.\n</think>\n\nMarlowe."}]  # fmt: skip
    assert "<think>\nIt is Marlowe's.\n</think>\n\nMarlowe.<|im_end|>" in trained_text(tokenizer, inline)  # fmt: skip
    # Without reasoning, the turn trains as Qwen3 is prompted with thinking off: an empty think.
    assert trained_text(tokenizer, CHAT).endswith("<think>\n\n</think>\n\nMarlowe.<|im_end|>\n")


def test_a_template_that_refuses_a_record_is_one_line_naming_it(tmp_path):
    tokenizer = qwen2_tokenizer()
    tokenizer.chat_template = (  # Mistral's rule, as its template words it
        "{%- for m in messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{%- endfor %}"
    )
    good = {"messages": CHAT[1:3]}
    bad = {"messages": [CHAT[1], CHAT[1], CHAT[2]]}
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, bad)))
    data = clm_data.DataArguments(train_file=str(tmp_path / "chat.jsonl"))
    from transformers import TrainingArguments

    with pytest.raises(clm_data.UserError) as error:
        clm_data.tokenize(clm_data.load_splits(data, tokenizer, None), tokenizer, data, 64, TrainingArguments(str(tmp_path), report_to="none"))  # fmt: skip
    assert str(error.value) == (
        f"--train_file {tmp_path / 'chat.jsonl'}: record 2: the chat template refuses it: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )


def fine_tune(tmp_path, family: str, chat: list[dict], positions: int):
    """A tiny base model whose EOS is <|endoftext|> (only the turn-end ids saved with the trained
    folder can stop it), fine-tuned on one chat under the family's template until it knows it.
    Returns the saved folder's model and tokenizer, loaded by plain transformers."""
    tokenizer = family_tokenizer(family)
    tokenizer.eos_token = "<|endoftext|>"
    torch.manual_seed(0)
    base = tiny_model("qwen3", positions=positions, vocab_size=len(tokenizer))
    base.config.eos_token_id = base.generation_config.eos_token_id = tokenizer.eos_token_id
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    run_clm.main(["--model_name_or_path", str(tmp_path / "base"), "--train_file", str(tmp_path / "chats.jsonl"),
                  "--do_train", "--output_dir", str(tmp_path / "out"), "--max_steps", "80",
                  "--learning_rate", "1e-2", "--save_strategy", "no", "--block_size", str(positions)])  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "out")  # fmt: skip


def test_a_qwen3_chat_fine_tune_answers_through_plain_transformers_and_stops(tmp_path):
    # One exchange: Qwen3's training template keeps an empty think in earlier turns, which its
    # inference template drops, so a tiny model that memorised history would see another prompt.
    chat = [CHAT[0], *CHAT[3:]]
    model, saved = fine_tune(tmp_path, "qwen3", chat, 128)
    prompt = saved.apply_chat_template(chat[:2], add_generation_prompt=True, return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)[
        0, prompt["input_ids"].shape[1] :
    ]
    said = saved.decode(out)
    assert said == "<think>\n\n</think>\n\nMarlowe.<|im_end|>", said  # answered, then stopped
    # The generation script, with thinking off as the chat was trained: the answer alone.
    argv = ["--model_name_or_path", str(tmp_path / "out"), "--chat", "--no_thinking", "--temperature", "0",
            "--system", chat[0]["content"], "--prompt", chat[1]["content"], "--length", "20"]  # fmt: skip
    assert [text.strip() for text in run_generation.main(argv)] == ["Marlowe."]


@pytest.mark.parametrize("family", ["llama3_1", "gemma", "gptoss"])
def test_a_multi_turn_fine_tune_answers_the_last_turn_and_stops(tmp_path, family):
    """Through each family's shipped template and plain transformers: the base model's EOS is
    <|endoftext|>, so only the turn-end ids saved in generation_config.json can stop it."""
    model, saved = fine_tune(tmp_path, family, CHAT, 256)
    history = chats.folded(CHAT[:4]) if family == "gemma" else CHAT[:4]  # no system role
    prompt = saved.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=30, do_sample=False)[0, prompt["input_ids"].shape[1] :]  # fmt: skip
    assert "Marlowe." in saved.decode(out, skip_special_tokens=True), saved.decode(out)
    stops = model.generation_config.eos_token_id
    assert out[-1].item() in stops and len(out) < 30, saved.decode(out)  # it ended its turn


def test_weight_zero_turns_and_a_conversational_prompt_are_context_only(tmp_path):
    tokenizer = family_tokenizer("qwen3")
    weighted = [*CHAT[:2], {**CHAT[2], "weight": 0}, *CHAT[3:]]
    assert "Shakespeare" not in trained_text(tokenizer, weighted)
    assert "Marlowe." in trained_text(tokenizer, weighted)
    # TRL's conversational prompt/completion: the prompt's turns, an answer among them, are context.
    record = {"prompt": CHAT[:4], "completion": CHAT[4:]}
    (tmp_path / "pc.jsonl").write_text(json.dumps(record) + "\n")
    data = clm_data.DataArguments(train_file=str(tmp_path / "pc.jsonl"))
    from transformers import TrainingArguments

    [row] = clm_data.tokenize(clm_data.load_splits(data, tokenizer, None), tokenizer, data, 256, TrainingArguments(str(tmp_path), report_to="none"))["train"]  # fmt: skip
    trained = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])  # fmt: skip
    assert "Marlowe." in trained and "Shakespeare" not in trained


def test_show_examples_prints_what_is_trained_and_loads_no_weights(tmp_path, tiny_qwen3, capsys, monkeypatch):  # fmt: skip
    monkeypatch.setattr(run_clm, "load_model", None)  # called, it would fail the test
    run_clm.main(["--model_name_or_path", str(tiny_qwen3), "--train_file", str(REPO / "examples" / "tools.jsonl"),
                  "--output_dir", str(tmp_path / "out"), "--show_examples", "1"])  # fmt: skip
    out = capsys.readouterr().out
    call = '<tool_call>\n{"name": "author_of", "arguments": {"play": "Hamlet"}}\n</tool_call>'
    assert (
        f"<|im_start|>assistant\n[[<think>\n\n</think>\n\n{call}<|im_end|>\n]]<|im_start|>user"
        in out
    )
    assert "[[<think>\n\n</think>\n\nWilliam Shakespeare wrote Hamlet.<|im_end|>\n]]" in out
    assert "--- example 2" not in out and not (tmp_path / "out").exists()
