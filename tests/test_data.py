"""run_clm.py's data path: every format and record shape reads back exactly, long texts are cut
only where the ids stay the same, the loss falls only where it should, packed examples stay apart."""

import json
import sys
import tracemalloc

import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer, DataCollatorWithFlattening, TrainingArguments

from tiny import CHAT, CHATML, REPO, gpt2_tokenizer, tiny_model

sys.path.insert(0, str(REPO))
import clm_data
import run_clm

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\nJULIET:\nAy me!\n"


@pytest.fixture(scope="module")
def tokenizers(tiny_llama, tiny_qwen) -> dict:
    """The three kinds of tokenizer: GPT-2's byte-level BPE, SentencePiece-style, Qwen2-style."""
    return {
        "gpt2": gpt2_tokenizer(),
        "llama": AutoTokenizer.from_pretrained(tiny_llama),
        "qwen2": AutoTokenizer.from_pretrained(tiny_qwen),
    }


def write(path, content: str) -> None:
    """Written once: rewritten, the same file would be new data to the datasets cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        path.write_text(content, encoding="utf-8")


def records(tmp_path, name: str, content: str, tokenizer=None, **options) -> list[dict]:
    path = tmp_path / name
    write(path, content)
    args = clm_data.DataArguments(train_file=str(path), **options)
    return list(clm_data.load_splits(args, tokenizer or gpt2_tokenizer(), None)["train"])


def rows(tmp_path, name: str, content: str, tokenizer, block_size: int = 64, **options):
    """Records of a file through clm_data.tokenize(): blocks, or examples with labels."""
    path = tmp_path / name
    write(path, content)
    args = clm_data.DataArguments(train_file=str(path), **options)
    splits = clm_data.load_splits(args, tokenizer, None)
    training = TrainingArguments(str(tmp_path / "out"), report_to="none")
    return clm_data.tokenize(splits, tokenizer, args, block_size, training)["train"]


def jsonl(*items: dict) -> str:
    return "".join(json.dumps(item) + "\n" for item in items)


# ---------------------------------------------------------------- formats read back exactly


def test_txt_is_one_document_with_its_line_breaks(tmp_path):
    assert records(tmp_path, "train.txt", TEXT) == [{"text": TEXT, "start": True, "end": True}]


def test_txt_separate_examples_are_paragraphs(tmp_path):
    found = records(tmp_path, "train.txt", TEXT, separate_examples=True)
    assert [r["text"] for r in found] == [
        "ROMEO:\nBut, soft! what light through yonder window breaks?",
        "JULIET:\nAy me!",
    ]


def test_keep_linebreaks_false_makes_each_line_a_document(tmp_path):
    found = records(tmp_path, "train.txt", TEXT, keep_linebreaks=False)
    assert [r["text"] for r in found] == [line for line in TEXT.splitlines() if line]


def test_csv_cell_keeps_line_breaks(tmp_path):
    content = 'text\n"' + TEXT.replace('"', '""') + '"\n'
    assert [r["text"] for r in records(tmp_path, "train.csv", content)] == [TEXT]


@pytest.mark.parametrize(
    ("name", "content"),
    [("excel.csv", "text\nOne.\nTwo.\n"), ("train.jsonl", jsonl({"text": "One."}, {"text": "Two."})),
     ("train.txt", "One.\n\nTwo.\n")],
)  # fmt: skip
def test_a_byte_order_mark_is_read_past_not_trained(tmp_path, name, content):
    """Excel's "CSV UTF-8" and Notepad start a file with U+FEFF; it is not part of the text."""
    found = records(tmp_path, name, "\ufeff" + content, separate_examples=True)
    assert [r["text"] for r in found] == ["One.", "Two."]


def test_csv_cells_that_look_like_missing_values_or_numbers_stay_text(tmp_path):
    assert [r["text"] for r in records(tmp_path, "train.csv", "text\nNA\nnull\n")] == ["NA", "null"]
    assert [r["text"] for r in records(tmp_path, "t2.csv", "text\n1599\n1600\n")] == [
        "1599",
        "1600",
    ]


def test_jsonl_and_json_records_of_each_shape(tmp_path):
    texts = jsonl({"text": "first record\nwith two lines", "id": 1}, {"text": "second"})
    assert [r["text"] for r in records(tmp_path, "a.jsonl", texts)] == [
        "first record\nwith two lines",
        "second",
    ]
    pairs = [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    assert records(tmp_path, "b.json", json.dumps(pairs)) == pairs
    csv_pairs = 'prompt,completion\n"Q: 2+2?\nA:", 4\n'
    assert records(tmp_path, "c.csv", csv_pairs) == [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}]
    # Chats are kept as JSON: tool calls' arguments have no fixed Arrow type.
    [chat] = records(tmp_path, "d.jsonl", jsonl({"messages": CHAT}))
    assert json.loads(chat["messages"]) == CHAT and json.loads(chat["tools"]) == []


# ---------------------------------------------------------------- long texts, cut exactly


def whole_stream(tokenizer, documents: list[str]) -> list[int]:
    """What each document encoded whole gives: the tokenizer's own specials, then EOS."""
    stream = []
    for document in documents:
        ids = tokenizer(document)["input_ids"]
        stream += ids if ids[-1:] == [tokenizer.eos_token_id] else [*ids, tokenizer.eos_token_id]
    return stream


def as_blocks(stream: list[int], size: int) -> list[list[int]]:
    return [stream[i : i + size] for i in range(0, len(stream) - size + 1, size)]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_each_kind_of_tokenizer_is_cut_where_the_ids_stay_the_same(tokenizers, family):
    tokenizer = tokenizers[family]
    assert clm_data.cut_rule(tokenizer) == (" " if family == "llama" else "\n")
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:100_000]
    rule = clm_data.cut_rule(tokenizer)
    cut = clm_data.pieces(text, rule, size=300)
    assert len(cut) > 100 and "".join(cut) == text
    joined = [i for ids in tokenizer(cut, add_special_tokens=False)["input_ids"] for i in ids]
    assert joined == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize(
    "text",
    [
        "b\n\n",
        "b\n\n c",
        "a\n  b",
        "a \nb",
        "x\n's",
        "a\r\nb",
        "a'\n'll\n1\n.\n",
        "a b  c d\te",
        "é ́x y",
    ],
)
def test_a_cut_never_changes_the_ids_even_where_pieces_are_tiny(tokenizers, family, text):
    tokenizer = tokenizers[family]
    cut = clm_data.pieces(text, clm_data.cut_rule(tokenizer), size=1)
    assert "".join(cut) == text
    joined = [i for ids in tokenizer(cut, add_special_tokens=False)["input_ids"] for i in ids]
    assert joined == tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_a_long_document_gives_the_blocks_of_encoding_it_whole(tmp_path, tokenizers, family):
    tokenizer = tokenizers[family]
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:200_000]
    expected = as_blocks(whole_stream(tokenizer, [text]), 256)
    assert rows(tmp_path, "train.txt", text, tokenizer, 256)["input_ids"] == expected
    cell = 'text\n"' + text.replace('"', '""') + '"\n'
    assert rows(tmp_path, "train.csv", cell, tokenizer, 256)["input_ids"] == expected


def test_documents_run_together_with_bos_and_eos_and_only_the_tail_is_dropped(tmp_path, tokenizers):
    docs = ["one two three four five", "six seven eight nine ten eleven"]
    for family in ("gpt2", "llama"):
        tokenizer = tokenizers[family]
        found = rows(
            tmp_path / family, "train.jsonl", jsonl(*({"text": d} for d in docs)), tokenizer, 4
        )
        expected = as_blocks(whole_stream(tokenizer, docs), 4)
        assert found["input_ids"] == found["labels"] == expected
        assert found["input_ids"][0][0] == (tokenizer.bos_token_id if family == "llama" else 505)


def test_a_big_txt_file_is_read_in_pieces_with_bounded_memory(tmp_path, tokenizers, monkeypatch):
    """A 2 GiB train.txt would overflow one Arrow cell: it is read a few pieces at a time."""
    monkeypatch.setattr(clm_data, "PIECE_CHARS", 1 << 10)
    monkeypatch.setattr(clm_data, "PIECES_PER_CALL", 4)
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:3_000_000]
    path = tmp_path / "train.txt"
    path.write_text(text, encoding="utf-8")
    tokenizer = tokenizers["qwen2"]
    tracemalloc.start()
    found = list(clm_data.txt_records(str(path), clm_data.cut_rule(tokenizer), False, True))
    peak = tracemalloc.get_traced_memory()[1] - sum(len(r["text"]) for r in found) * 1
    tracemalloc.stop()
    assert "".join(r["text"] for r in found) == text
    assert [r["start"] for r in found].count(True) == [r["end"] for r in found].count(True) == 1
    assert max(len(r["text"]) for r in found) < 3 * (1 << 12)  # a few pieces, not the file
    assert peak < 1_000_000, peak  # reading a 3 MB file held well under 1 MB at once
    expected = as_blocks(whole_stream(tokenizer, [text]), 512)
    assert rows(tmp_path, "train.txt", text, tokenizer, 512)["input_ids"] == expected


def test_a_big_text_in_one_csv_cell_is_cut_into_pieces_too(tmp_path, tokenizers, monkeypatch):
    """text2csv.py writes a whole file into one cell: a big one is cut as a .txt is, not held in
    one Arrow cell, and gives the blocks of encoding it whole."""
    monkeypatch.setattr(clm_data, "PIECE_CHARS", 1 << 10)
    monkeypatch.setattr(clm_data, "PIECES_PER_CALL", 4)
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:300_000]
    cell = 'text\n"' + text.replace('"', '""') + '"\n'
    tokenizer = tokenizers["llama"]
    found = records(tmp_path, "train.csv", cell, tokenizer)
    assert "".join(r["text"] for r in found) == text
    assert [r["start"] for r in found].count(True) == [r["end"] for r in found].count(True) == 1
    assert max(len(r["text"]) for r in found) < 3 * (1 << 12)  # a few pieces, not the file
    expected = as_blocks(whole_stream(tokenizer, [text]), 512)
    assert rows(tmp_path, "train.csv", cell, tokenizer, 512)["input_ids"] == expected


def test_a_document_too_big_to_cut_exactly_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(clm_data, "WHOLE_DOCUMENT_LIMIT", 100)
    tokenizer = gpt2_tokenizer()
    tokenizer.add_tokens([AddedToken("}\n{")])  # could span a cut: no cut is exact any more
    with pytest.raises(clm_data.UserError, match="split it into documents"):
        records(tmp_path, "train.txt", "word\n" * 2000, tokenizer)


def test_a_tokenizer_that_pieces_would_change_encodes_whole_documents(tmp_path):
    # With a prefix space, "b" after a cut would become " b": no cut is exact.
    gpt2_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok", add_prefix_space=True)
    assert clm_data.cut_rule(tokenizer) is None
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:150_000]
    found = rows(tmp_path, "train.txt", text, tokenizer, 1024)
    assert found["input_ids"] == as_blocks(whole_stream(tokenizer, [text]), 1024)


@pytest.mark.parametrize(
    ("token", "wrap"),
    [(AddedToken("<mask>", lstrip=True), ("<mask>", "")), (AddedToken("}\n{"), ("{", "}"))],
)
def test_added_tokens_that_could_span_a_cut_make_whole_documents(tmp_path, token, wrap):
    # "<mask>" swallows the newline before it; "}\n{" holds one: a cut would change the ids.
    tokenizer = gpt2_tokenizer()
    tokenizer.add_tokens([token])
    assert clm_data.cut_rule(tokenizer) is None
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:150_000]
    text = "".join(f"{wrap[0]}{line}{wrap[1]}\n" for line in text.splitlines())
    found = rows(tmp_path, "train.txt", text, tokenizer, 1024)
    assert found["input_ids"] == as_blocks(whole_stream(tokenizer, [text]), 1024)


def test_the_cache_is_reused_only_for_the_same_tokenizer_and_block_size(tmp_path):
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:150_000]
    first = rows(tmp_path, "train.txt", text, gpt2_tokenizer(), 1024)
    again = rows(tmp_path, "train.txt", text, gpt2_tokenizer(), 1024)
    assert again.cache_files == first.cache_files
    assert rows(tmp_path, "train.txt", text, gpt2_tokenizer(), 512).cache_files != first.cache_files
    changed = gpt2_tokenizer()
    changed.add_tokens(["Bardolph"])
    other = rows(tmp_path, "train.txt", text, changed, 1024)
    assert other.cache_files != first.cache_files
    assert other["input_ids"] == as_blocks(whole_stream(changed, [text]), 1024)


# ---------------------------------------------------------------- where the loss falls


def trained_and_not(tokenizer, row: dict) -> tuple[str, str]:
    ids, labels = row["input_ids"], row["labels"]
    assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))
    kept = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    return tokenizer.decode(kept), tokenizer.decode(ids)


def test_chat_labels_cover_the_assistant_turns_and_their_eos_only(tmp_path, tokenizers):
    # GPT-2 has no chat template: the repo's chat_template.jinja closes each answer with EOS.
    row = rows(tmp_path / "a", "train.jsonl", jsonl({"messages": CHAT}), tokenizers["gpt2"], 128)[0]
    trained, whole = trained_and_not(tokenizers["gpt2"], row)
    assert trained == " Shakespeare.<|endoftext|> Marlowe.<|endoftext|>"
    assert whole == (
        "Answer in a word.\nUser: Who wrote Hamlet?\nAssistant: Shakespeare.<|endoftext|>"
        "\nUser: And Faustus?\nAssistant: Marlowe.<|endoftext|>"
    )
    # Qwen2's own template ends each turn with <|im_end|>, its EOS.
    row = rows(tmp_path / "b", "train.jsonl", jsonl({"messages": CHAT}), tokenizers["qwen2"], 128)[
        0
    ]
    trained, whole = trained_and_not(tokenizers["qwen2"], row)
    assert trained == "Shakespeare.<|im_end|>\nMarlowe.<|im_end|>\n"
    assert whole.startswith("<|im_start|>system\nAnswer in a word.<|im_end|>\n<|im_start|>user\n")
    # Llama's tokenizer has no template either, but its BOS still comes first.
    row = rows(tmp_path / "c", "train.jsonl", jsonl({"messages": CHAT}), tokenizers["llama"], 128)[
        0
    ]
    assert row["input_ids"][0] == tokenizers["llama"].bos_token_id and row["labels"][0] == -100


def test_completion_labels_cover_the_completion_and_eos_and_padding_is_inert(tmp_path, tokenizers):
    tokenizer = tokenizers["llama"]
    pairs = jsonl({"prompt": "Q: Who wrote Hamlet?\nA:", "completion": " Shakespeare."},
                  {"prompt": "Q: Faustus?\nA:", "completion": " Marlowe, in 1592 or so."})  # fmt: skip
    found = rows(tmp_path, "train.jsonl", pairs, tokenizer, 128)
    trained, _ = trained_and_not(tokenizer, found[0])
    assert trained == tokenizer.decode(tokenizer(" Shakespeare.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])  # fmt: skip
    assert found[0]["input_ids"][0] == tokenizer.bos_token_id
    batch = clm_data.PadToLongest(pad_id=0)(list(found))
    short = len(found[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (
        batch["input_ids"].shape[1] - short
    )
    assert set(batch["labels"][0, short:].tolist()) == {-100}
    everything = rows(
        tmp_path / "all", "train.jsonl", pairs, tokenizer, 128, completion_only_loss=False
    )
    assert everything[0]["labels"] == everything[0]["input_ids"]


def test_separate_text_examples_never_see_each_other(tmp_path):
    examples = ["Friends, Romans, countrymen", "lend me your ears", "I come to bury Caesar, not to praise him."]  # fmt: skip
    tokenizer = gpt2_tokenizer()
    found = rows(tmp_path, "train.jsonl", jsonl(*({"text": t} for t in examples)), tokenizer, 8,
                 separate_examples=True)  # fmt: skip
    eos = tokenizer.eos_token_id
    assert found["input_ids"] == [(tokenizer(t)["input_ids"] + [eos])[:8] for t in examples]


def test_answers_cut_by_the_block_size_are_counted_and_never_dropped_silently(tmp_path, capsys):
    pairs = jsonl(
        {"prompt": "word " * 50, "completion": " yes"}, {"prompt": "Q:", "completion": " no"},
        {"prompt": "Q:", "completion": " no" * 30},
    )  # fmt: skip
    found = rows(tmp_path, "train.jsonl", pairs, gpt2_tokenizer(), 16)
    assert len(found) == 2  # the one with nothing left to train is dropped, the cut one kept
    assert (
        "train: 2 of 3 example(s) lose trained tokens past --block_size 16; 1 kept nothing to "
        "train and were dropped." in capsys.readouterr().out
    )
    chat = jsonl({"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "yes"}]})  # fmt: skip
    with pytest.raises(clm_data.UserError) as error:
        rows(tmp_path, "chat.jsonl", chat, gpt2_tokenizer(), 16)
    assert str(error.value).endswith(
        "chat.jsonl: all 1 examples lose what they train past --block_size 16; raise "
        "--block_size or shorten the examples."
    )


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_examples_attend_only_to_themselves(family):
    torch.manual_seed(0)
    model = tiny_model(family, vocab_size=300).eval()
    assert clm_data.supports_packing(model)
    examples = [
        {"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n))} for n in (7, 3, 11)
    ]
    packed = DataCollatorWithFlattening()(examples)
    starts = [0, 7, 10]
    assert packed["position_ids"][0].tolist() == [*range(7), *range(3), *range(11)]
    assert [packed["labels"][0, s].item() for s in starts] == [
        -100
    ] * 3  # no label across a boundary
    with torch.no_grad():  # training never uses a KV cache, and packing needs none
        inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
        together = model(**inputs, use_cache=False).logits[0]
        for start, example in zip(starts, examples, strict=True):
            alone = model(input_ids=torch.tensor([example["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(
                together[start : start + len(alone)], alone, atol=1e-5, rtol=1e-4
            )


def test_a_model_whose_attention_cannot_keep_examples_apart_is_padded_instead(capsys):
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=100))
    neo = tiny_model("gpt_neo", vocab_size=300)
    neo.config._attn_implementation = "sdpa"  # its local-attention layers lose the boundaries
    for model in (mamba, neo):
        assert not clm_data.supports_packing(model)
        collator = run_clm.collator_for(
            model, gpt2_tokenizer(), clm_data.DataArguments(packing=True), True
        )
        assert isinstance(collator, clm_data.PadToLongest)
        kind = model.config.model_type
        assert (
            f"--packing: {kind}'s attention cannot keep packed examples apart; padding each batch instead."
            in capsys.readouterr().out
        )
    assert isinstance(
        run_clm.collator_for(
            tiny_model("qwen2", vocab_size=300),
            gpt2_tokenizer(),
            clm_data.DataArguments(packing=True),
            True,
        ),
        DataCollatorWithFlattening,
    )


# ---------------------------------------------------------------- blocks and held-out data


@pytest.mark.parametrize(("requested", "positions", "expected"), [(None, 1024, 1024), (None, 2048, 1024), (None, 128, 128), (512, 1024, 512), (4096, 2048, 2048)])  # fmt: skip
def test_block_size_defaults_to_the_context_and_is_capped_there(requested, positions, expected):
    assert clm_data.pick_block_size(requested, positions) == expected


def test_validation_is_held_out_from_train_when_no_file_is_given():
    from datasets import Dataset

    args = clm_data.DataArguments(train_file="train.txt", validation_split_percentage=10)
    sets = {"train": Dataset.from_dict({"input_ids": [[i] for i in range(50)]})}
    split = clm_data.split_for_eval(sets, args, seed=0)
    assert len(split["train"]) == 45 and len(split["validation"]) == 5
    train_ids = {row[0] for row in split["train"]["input_ids"]}
    assert train_ids.isdisjoint(row[0] for row in split["validation"]["input_ids"])


def test_the_cache_sees_every_change_to_the_ids(tmp_path, tokenizers):
    """Each change that alters the trained ids gets new ids, not a cached run's: the end-of-text
    token and BOS (from tokenizer_config.json), the chat template, and the loss flags."""
    import copy

    def fresh_and_cached(name: str, content: str, tokenizer, **options):
        cached = rows(tmp_path, name, content, tokenizer, 128, **options)
        fresh = rows(tmp_path, name, content, tokenizer, 128, overwrite_cache=True, **options)
        return cached[:], fresh[:]

    qwen, llama = tokenizers["qwen2"], tokenizers["llama"]
    texts = jsonl(*[{"text": "To be, or not to be: that is the question."}] * 40)
    first, _ = fresh_and_cached("texts.jsonl", texts, qwen)
    other_eos = copy.deepcopy(qwen)
    other_eos.eos_token = (
        "<|endoftext|>"  # a base model's EOS where the instruct one has <|im_end|>
    )
    cached, fresh = fresh_and_cached("texts.jsonl", texts, other_eos)
    assert cached == fresh and cached != first
    chat, llama = jsonl({"messages": CHAT}), copy.deepcopy(llama)
    llama.chat_template = "{{ bos_token }}" + CHATML  # as Llama 3's template starts
    first, _ = fresh_and_cached("chat.jsonl", chat, llama)
    other_bos = copy.deepcopy(llama)
    other_bos.bos_token = "</s>"
    cached, fresh = fresh_and_cached("chat.jsonl", chat, other_bos)
    assert cached == fresh and cached != first
    other_template = copy.deepcopy(llama)
    other_template.chat_template = CHATML
    cached, fresh = fresh_and_cached("chat.jsonl", chat, other_template)
    assert cached == fresh and cached != first
    cached, fresh = fresh_and_cached("chat.jsonl", chat, llama, assistant_only_loss=False)
    assert cached == fresh and cached != first
