"""run_clm.py's data path: every format reads back exactly, blocks are cut as documented."""

import json
import sys

import pytest
from datasets import Dataset, DatasetDict
from transformers import TrainingArguments

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
