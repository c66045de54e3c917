"""text2csv.py as a user runs it: the CSV holds the text exactly; bad files stop with one line."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from tiny import REPO

SCRIPT = str(REPO / "text2csv.py")


def text2csv(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def cells(path: Path) -> list[str]:
    csv.field_size_limit(sys.maxsize)  # one cell holds a whole 5 MB file
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["text"]
    return [row[0] for row in rows[1:]]


def test_no_arguments_converts_the_example_files_exactly(tmp_path):
    for name in ("train.txt", "validation.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    done = text2csv(tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("train", "validation"):
        original = (tmp_path / f"{name}.txt").read_bytes().decode("utf-8")
        assert cells(tmp_path / f"{name}.csv") == [original]
        loaded = datasets.load_dataset(
            "csv", data_files=str(tmp_path / f"{name}.csv"), split="train"
        )
        assert loaded["text"] == [original]  # what run_clm.py will read, line breaks included
        assert f"wrote {name}.csv: 1 row, {len(original):,} characters" in done.stdout


def test_the_shipped_example_is_plain_utf8_shakespeare():
    train = (REPO / "train.txt").read_bytes()
    validation = (REPO / "validation.txt").read_bytes()
    assert 2_000_000 < len(train) < 8_000_000 and 10_000 < len(validation) < 30_000
    for data in (train, validation):
        assert b"\r" not in data and not data.startswith(b"\xef\xbb\xbf")
        data.decode("utf-8")
    assert (
        b"HAMLET, PRINCE OF DENMARK" in train
        and b"From fairest creatures we desire increase" in validation
    )
    assert b"From fairest creatures" not in train  # the sonnets are held out


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("blank_line", ["ROMEO:\nBut soft!", "JULIET:\nAy me!", "Exeunt."]),
        ("line", ["ROMEO:", "But soft!", "JULIET:", "Ay me!", "Exeunt."]),
    ],
)
def test_separate_examples_one_row_each(tmp_path, split, expected):
    (tmp_path / "play.txt").write_text(
        "ROMEO:\nBut soft!\n\n\nJULIET:\nAy me!\n\n  \nExeunt.\n", encoding="utf-8"
    )
    done = text2csv(tmp_path, "play.txt", "--split", split)
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "play.csv") == expected
    assert f"wrote play.csv: {len(expected)} rows" in done.stdout


def test_crlf_and_bom_are_normalised(tmp_path):
    (tmp_path / "win.txt").write_bytes(
        b"\xef\xbb\xbfFirst line\r\nSecond line\r\nOld Mac\rline\r\n"
    )
    done = text2csv(tmp_path, "win.txt", "-o", "out.csv")
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "out.csv") == ["First line\nSecond line\nOld Mac\nline\n"]


def test_not_utf8_names_file_and_offset_and_keeps_existing_output(tmp_path):
    (tmp_path / "train.txt").write_bytes("Première".encode("latin-1"))
    (tmp_path / "validation.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "train.csv").write_text("text\nprecious earlier output\n", encoding="utf-8")
    (tmp_path / "validation.csv").write_text("text\nalso precious\n", encoding="utf-8")
    done = text2csv(tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("text2csv.py: error: train.txt: not valid utf-8 (byte 0xe8 at offset 5)")
    assert "iconv -f latin1 -t utf-8" in line and "--encoding latin-1" in line
    assert (tmp_path / "train.csv").read_text(encoding="utf-8") == "text\nprecious earlier output\n"
    assert (tmp_path / "validation.csv").read_text(encoding="utf-8") == "text\nalso precious\n"


def test_encoding_option_reads_latin1(tmp_path):
    (tmp_path / "train.txt").write_bytes("Première scène\n".encode("latin-1"))
    done = text2csv(tmp_path, "train.txt", "--encoding", "latin-1")
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "train.csv") == ["Première scène\n"]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["missing.txt"], "text2csv.py: error: missing.txt: no such file."),
        ("", ["empty.txt"], "text2csv.py: error: empty.txt: is empty; put your text in it."),
        (" \n\t\n", ["empty.txt"], "text2csv.py: error: empty.txt: is empty; put your text in it."),
        (
            "x",
            ["empty.txt", "--encoding", "klingon"],
            "text2csv.py: error: --encoding klingon: unknown encoding",
        ),
        (
            "x",
            ["empty.txt", "empty.txt", "-o", "a.csv"],
            "text2csv.py: error: -o/--output a.csv: names one file",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, args, message):
    if setup is not None:
        (tmp_path / "empty.txt").write_text(setup, encoding="utf-8")
    done = text2csv(tmp_path, *args)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.csv"))
