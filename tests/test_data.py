"""run_clm.py's data path: every format reads back exactly, blocks are cut as documented."""

import json
import sys

import pytest
from datasets import Dataset, DatasetDict
from tokenizers import AddedToken
from transformers import AutoTokenizer, TrainingArguments

from tiny import REPO, gpt2_tokenizer

sys.path.insert(0, str(REPO))
import run_clm

TEXT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\nJULIET:\nAy me!\n"


def read(tmp_path, name: str, content: str, **options) -> list[str]:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    args = run_clm.DataArguments(train_file=str(path), **options)
    return run_clm.load_texts(args)["train"]["text"]


def test_txt_is_one_document_with_its_line_breaks(tmp_path):
    assert read(tmp_path, "train.txt", TEXT) == [TEXT]


def test_txt_separate_examples_are_paragraphs(tmp_path):
    rows = read(tmp_path, "train.txt", TEXT, separate_examples=True)
    assert [row.strip() for row in rows] == [
        "ROMEO:\nBut, soft! what light through yonder window breaks?",
        "JULIET:\nAy me!",
    ]


def test_csv_cell_keeps_line_breaks(tmp_path):
    content = 'text\n"' + TEXT.replace('"', '""') + '"\n'
    assert read(tmp_path, "train.csv", content) == [TEXT]


def test_jsonl_records(tmp_path):
    records = [{"text": "first record\nwith two lines", "id": 1}, {"text": "second", "id": 2}]
    content = "".join(json.dumps(r) + "\n" for r in records)
    assert read(tmp_path, "train.jsonl", content) == ["first record\nwith two lines", "second"]


def test_blocks_concatenate_documents_with_end_of_text_and_drop_only_the_tail(tmp_path):
    tokenizer = gpt2_tokenizer()
    path = tmp_path / "train.jsonl"
    docs = ["one two three four five", "six seven eight nine ten eleven"]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    args = run_clm.DataArguments(train_file=str(path), preprocessing_num_workers=1)
    blocks = run_clm.tokenize(
        run_clm.load_texts(args), tokenizer, args, 4, TrainingArguments(str(tmp_path))
    )
    eos = tokenizer.eos_token_id
    stream = [t for d in docs for t in [*tokenizer(d)["input_ids"], eos]]
    expected = [stream[i : i + 4] for i in range(0, len(stream) - len(stream) % 4, 4)]
    assert blocks["train"]["input_ids"] == expected
    assert blocks["train"]["labels"] == expected


def test_line_pieces_tokenize_exactly_like_the_whole_text():
    # Lines ending in spaces, blank lines, indented lines, contractions, digits, no final newline.
    line = "ROMEO:  It's 12 o'clock. \n\n  Thou art\nnot\tso.\n \nJULIET:\nAy me!\n"
    text = line * 40 + "The end"
    pieces = run_clm.line_pieces(text, size=50)
    assert len(pieces) > 10 and "".join(pieces) == text
    tokenizer = gpt2_tokenizer()
    joined = [i for ids in tokenizer(pieces)["input_ids"] for i in ids]
    assert joined == tokenizer(text)["input_ids"]


@pytest.mark.parametrize(
    "text", ["b\n\n", "b\n\n c", "b\n\nc", "a\n  b", "a \nb", "x\n's", "a\r\nb", "a'\n'll\n1\n.\n"]
)
def test_a_cut_never_changes_the_tokens_even_where_pieces_are_tiny(text):
    tokenizer = gpt2_tokenizer()
    pieces = run_clm.line_pieces(text, size=1)
    assert "".join(pieces) == text
    joined = [i for ids in tokenizer(pieces)["input_ids"] for i in ids]
    assert joined == tokenizer(text)["input_ids"]


def shakespeare_blocks(tmp_path, tokenizer, block_size: int = 1024, wrap=("", "")):
    """run_clm.tokenize() on the first 200 KB of train.txt (several pieces), and that text.

    `wrap` puts text before and after every line, to put a token at the places pieces are cut."""
    text = (REPO / "train.txt").read_text(encoding="utf-8")[:200_000]
    text = "".join(f"{wrap[0]}{line}{wrap[1]}\n" for line in text.splitlines())
    path = tmp_path / "train.txt"
    if not path.exists():  # rewritten, it would be new data to the datasets cache
        path.write_text(text, encoding="utf-8")
    args = run_clm.DataArguments(train_file=str(path))
    texts = run_clm.load_texts(args)
    training = TrainingArguments(str(tmp_path / "out"), report_to="none")
    return run_clm.tokenize(texts, tokenizer, args, block_size, training), text


def expected_blocks(tokenizer, text: str, block_size: int) -> list[list[int]]:
    stream = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def test_a_long_document_gives_the_blocks_of_encoding_it_whole(tmp_path):
    tokenizer = gpt2_tokenizer()
    blocks, text = shakespeare_blocks(tmp_path, tokenizer)
    assert len(run_clm.line_pieces(text)) >= 3
    assert blocks["train"]["input_ids"] == expected_blocks(tokenizer, text, 1024)


def test_a_tokenizer_that_pieces_would_change_encodes_whole_documents(tmp_path):
    # With a prefix space, "b" after a cut would become " b": pieces must not be used.
    gpt2_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok", add_prefix_space=True)
    assert run_clm.tokenizer_identity(tokenizer)[1] is False
    blocks, text = shakespeare_blocks(tmp_path, tokenizer)
    assert blocks["train"]["input_ids"] == expected_blocks(tokenizer, text, 1024)


@pytest.mark.parametrize(
    ("token", "wrap"),
    [(AddedToken("<mask>", lstrip=True), ("<mask>", "")), (AddedToken("}\n{"), ("{", "}"))],
)
def test_added_tokens_that_could_span_a_cut_make_whole_documents(tmp_path, token, wrap):
    # "<mask>" swallows the newline before it; "}\n{" holds one: a cut would change the tokens.
    tokenizer = gpt2_tokenizer()
    tokenizer.add_tokens([token])
    assert run_clm.tokenizer_identity(tokenizer)[1] is False
    blocks, text = shakespeare_blocks(tmp_path, tokenizer, wrap=wrap)
    assert blocks["train"]["input_ids"] == expected_blocks(tokenizer, text, 1024)


def test_the_cache_is_reused_only_for_the_same_tokenizer_and_block_size(tmp_path):
    tokenizer = gpt2_tokenizer()
    first, _ = shakespeare_blocks(tmp_path, tokenizer)
    again, _ = shakespeare_blocks(tmp_path, gpt2_tokenizer())
    assert again["train"].cache_files == first["train"].cache_files
    smaller, _ = shakespeare_blocks(tmp_path, tokenizer, block_size=512)
    assert smaller["train"].cache_files != first["train"].cache_files
    changed = gpt2_tokenizer()
    changed.add_tokens(["Bardolph"])
    other, text = shakespeare_blocks(tmp_path, changed)
    assert other["train"].cache_files != first["train"].cache_files
    assert other["train"]["input_ids"] == expected_blocks(changed, text, 1024)


@pytest.mark.parametrize(("requested", "positions", "expected"), [(None, 1024, 1024), (None, 2048, 1024), (None, 128, 128), (512, 1024, 512), (4096, 2048, 2048)])  # fmt: skip
def test_block_size_defaults_to_the_context_and_is_capped_there(requested, positions, expected):
    assert run_clm.pick_block_size(requested, positions) == expected


def test_validation_is_held_out_from_train_when_no_file_is_given(tmp_path):
    args = run_clm.DataArguments(train_file="train.txt", validation_split_percentage=10)
    blocks = DatasetDict({"train": Dataset.from_dict({"input_ids": [[i] for i in range(50)]})})
    split = run_clm.split_for_eval(blocks, args, seed=0)
    assert len(split["train"]) == 45 and len(split["validation"]) == 5
    train_ids = {row[0] for row in split["train"]["input_ids"]}
    assert train_ids.isdisjoint(row[0] for row in split["validation"]["input_ids"])


def test_csv_cells_that_look_like_missing_values_or_numbers_stay_text(tmp_path):
    assert read(tmp_path, "train.csv", "text\nNA\nnull\n") == ["NA", "null"]
    assert read(tmp_path, "train.csv", "text\n1599\n1600\n") == ["1599", "1600"]
