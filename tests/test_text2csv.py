"""text2csv.py as a user runs it: the CSV holds the text exactly; bad files stop with one line."""

import csv
import errno
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

REPO = Path(__file__).resolve().parent.parent
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


def load(path: Path, cache: Path) -> list:
    """The column as run_clm.py gets it: datasets' CSV loader with its defaults."""
    return datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=str(cache))[
        "text"
    ]


def test_no_arguments_converts_the_example_files_exactly(tmp_path):
    for name in ("train.txt", "validation.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    done = text2csv(tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("train", "validation"):
        original = (tmp_path / f"{name}.txt").read_bytes().decode("utf-8")
        assert cells(tmp_path / f"{name}.csv") == [original]
        # what run_clm.py will read, line breaks included
        assert load(tmp_path / f"{name}.csv", tmp_path / "cache") == [original]
        assert f"wrote {name}.csv: 1 row, {len(original):,} characters" in done.stdout
    assert done.stderr == ""
    # Written through a temporary file, but none is left over, and the CSV is as readable as any
    # new file (the user's umask), not owner-only like a tempfile.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [
        "train.csv",
        "train.txt",
        "validation.csv",
        "validation.txt",
    ]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "train.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_explicit_paths_elsewhere(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / "in" / "b.text").write_text("second\n", encoding="utf-8")
    done = text2csv(tmp_path, "in/a.txt", str(tmp_path / "in" / "b.text"))
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "in" / "a.csv") == ["first\n"]
    assert cells(tmp_path / "in" / "b.csv") == ["second\n"]
    done = text2csv(tmp_path, "in/a.txt", "--output", "out/mine.csv")
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "out" / "mine.csv") == ["first\n"]
    assert done.stdout == "wrote out/mine.csv: 1 row, 6 characters\n"
    # Byte for byte: LF row ends (not the csv module's default CRLF), the cell quoted for its newline.
    assert (tmp_path / "out" / "mine.csv").read_bytes() == b'text\n"first\n"\n'


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


def test_line_mode_keeps_indentation_through_datasets(tmp_path):
    shutil.copy(REPO / "validation.txt", tmp_path / "validation.txt")
    done = text2csv(tmp_path, "validation.txt", "--split", "line")
    assert done.returncode == 0, done.stderr
    lines = [
        line
        for line in (REPO / "validation.txt").read_text(encoding="utf-8").split("\n")
        if line.strip()
    ]
    assert "  Pity the world, or else this glutton be," in lines  # a sonnet's indented couplet
    assert load(tmp_path / "validation.csv", tmp_path / "cache") == lines
    assert cells(tmp_path / "validation.csv") == lines


def test_rows_pandas_would_not_read_as_text_are_flagged(tmp_path):
    (tmp_path / "table.txt").write_text("NA\nhello\nnull\n", encoding="utf-8")
    (tmp_path / "numbers.txt").write_text("1\n2.5\n", encoding="utf-8")
    done = text2csv(tmp_path, "table.txt", "numbers.txt", "--split", "line")
    # The CSVs themselves are right, so this is a warning, not an error.
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "table.csv") == ["NA", "hello", "null"]
    assert load(tmp_path / "table.csv", tmp_path / "cache") == [None, "hello", None]
    warnings = done.stderr.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(
        "text2csv.py: warning: table.csv: 2 row(s) (first: row 1, 'NA') are pandas missing-value markers"
    )
    assert warnings[1].startswith("text2csv.py: warning: numbers.csv: every row is a number")
    # Ordinary text, the whole-file default, draws no warning.
    (tmp_path / "table.txt").write_text("NA\n", encoding="utf-8")
    done = text2csv(tmp_path, "table.txt")
    assert done.returncode == 0 and done.stderr == ""


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train.csv",
        "train.txt",
        "validation.csv",
        "validation.txt",
    ]


def test_disk_full_while_writing_leaves_every_old_csv_whole(tmp_path, monkeypatch, capsys):
    # A crash cannot be caused from outside on demand, so this one runs main() in-process with a
    # CSV writer that fails partway through the second file, as a full disk would.
    spec = importlib.util.spec_from_file_location("text2csv", SCRIPT)
    text2csv_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text2csv_module)
    files_started = []

    class FailingCsv:
        @staticmethod
        def writer(out, **options):
            files_started.append(out)
            if len(files_started) < 2:
                return csv.writer(out, **options)
            return FullDisk(out)

    class FullDisk:
        def __init__(self, out):
            self.out = out

        def writerow(self, row):
            self.out.write("text\n")

        def writerows(self, rows):
            self.out.write('"half a ro')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(text2csv_module, "csv", FailingCsv)
    monkeypatch.chdir(tmp_path)
    for name in ("train", "validation"):
        (tmp_path / f"{name}.txt").write_text(f"new {name}\n", encoding="utf-8")
        (tmp_path / f"{name}.csv").write_text(f"text\nold {name}\n", encoding="utf-8")
    assert text2csv_module.main([]) == 2
    out, err = capsys.readouterr()
    assert err == "text2csv.py: error: validation.csv: cannot write it (No space left on device).\n"
    assert out == ""  # nothing was renamed into place, so nothing is reported as written
    for name in ("train", "validation"):
        assert (tmp_path / f"{name}.csv").read_text(encoding="utf-8") == f"text\nold {name}\n"
    assert len(files_started) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "train.csv",
        "train.txt",
        "validation.csv",
        "validation.txt",
    ]


def test_a_bad_second_input_stops_before_the_first_is_written(tmp_path):
    (tmp_path / "train.txt").write_text("fine\n", encoding="utf-8")
    done = text2csv(tmp_path)  # validation.txt is missing
    assert done.returncode == 2
    assert done.stderr == "text2csv.py: error: validation.txt: no such file.\n"
    assert not (tmp_path / "train.csv").exists()


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_encoding_option_reads_other_encodings(tmp_path, encoding):
    (tmp_path / "train.txt").write_bytes("Première scène\r\n".encode(encoding))
    done = text2csv(tmp_path, "train.txt", "--encoding", encoding)
    assert done.returncode == 0, done.stderr
    assert cells(tmp_path / "train.csv") == ["Première scène\n"]
    # The CSV is UTF-8 whatever the input was.
    assert "Première".encode() in (tmp_path / "train.csv").read_bytes()


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
            ["empty.txt", "--encoding", "base64"],
            "text2csv.py: error: --encoding base64: unknown encoding",
        ),
        (
            "x",
            ["empty.txt", "empty.txt", "-o", "a.csv"],
            "text2csv.py: error: -o/--output a.csv: names one file",
        ),
        ("x", ["empty.txt", "empty.txt"], "text2csv.py: error: empty.txt: given twice"),
        (
            "x",
            ["empty.txt", "-o", "nowhere/a.csv"],
            "text2csv.py: error: nowhere/a.csv: folder nowhere does not exist",
        ),
        (
            "x",
            ["."],
            "text2csv.py: error: '.': not a file name; give a text file, or a folder and -o NAME.csv.",
        ),
        ("x", ["sub"], "text2csv.py: error: sub: no .txt files in this folder."),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, args, message):
    if setup is not None:
        (tmp_path / "empty.txt").write_text(setup, encoding="utf-8")
    (tmp_path / "sub").mkdir()
    done = text2csv(tmp_path, *args)
    assert done.returncode == 2
    assert done.stderr.strip().startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.csv"))


def test_a_folder_becomes_one_csv_with_a_row_per_file(tmp_path):
    (tmp_path / "letters").mkdir()
    for name, text in (("b.txt", "Second letter.\n"), ("a.txt", "First letter,\ntwo lines.\n")):
        (tmp_path / "letters" / name).write_text(text, encoding="utf-8")
    (tmp_path / "letters" / "notes.md").write_text("not a text file", encoding="utf-8")
    done = text2csv(tmp_path, "letters")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wrote letters.csv: 2 rows, 40 characters"
    with open(tmp_path / "letters.csv", newline="", encoding="utf-8") as stream:
        assert list(csv.reader(stream)) == [
            ["text"],
            ["First letter,\ntwo lines.\n"],
            ["Second letter.\n"],
        ]
