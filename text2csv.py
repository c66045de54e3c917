"""Turn plain-text training data into the one-column CSV files run_clm.py reads.

    python text2csv.py                       # train.txt -> train.csv, validation.txt -> validation.csv
    python text2csv.py notes.txt             # notes.txt -> notes.csv
    python text2csv.py book.txt -o data.csv  # choose the output name (one input only)
    python text2csv.py --split blank_line    # one row per paragraph (separate examples)
    python text2csv.py letters/              # letters/*.txt -> letters.csv, one row per file

CSV rather than .txt because a CSV cell keeps its line breaks exactly, and the model should learn
where lines end. By default the whole file is one row: run_clm.py concatenates and cuts it into
blocks anyway.
"""

import argparse
import csv
import os
import re
import secrets
import sys
from pathlib import Path

PROG = "text2csv.py"
DEFAULT_INPUTS = ["train.txt", "validation.txt"]
SPLITS = ("none", "blank_line", "line")

# datasets' CSV loader goes through pandas.read_csv, which by default turns a cell that is exactly
# one of these into a missing value (quoting does not protect it) ...
PANDAS_MISSING = frozenset(
    {
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)
# ... and reads a column whose every cell looks like a number or a boolean as that type, not text.
PANDAS_NUMBER = re.compile(
    r"\s*[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity)\s*", re.IGNORECASE
)
PANDAS_BOOLEAN = frozenset({"True", "TRUE", "true", "False", "FALSE", "false"})


class InputError(Exception):
    """A problem with the command line or a file, reported as one line naming it and the fix."""


def check_encoding(encoding: str) -> None:
    # Decoding one byte raises the LookupError a real file would (also for codecs such as base64
    # that are not text encodings), but before any file is read. Empty bytes would skip the lookup.
    try:
        b"a".decode(encoding)
    except LookupError:
        raise InputError(
            f"--encoding {encoding}: unknown encoding; try utf-8, latin-1 or cp1252."
        ) from None
    except UnicodeDecodeError:
        pass  # a real encoding (utf-16, say) that one byte is not enough for


def read_text(path: Path, encoding: str) -> str:
    """The file's text with a UTF-8 byte-order mark dropped and every line ending made LF."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give a text file.") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror}).") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path}: not valid {encoding} (byte 0x{raw[error.start]:02x} at offset {error.start}); "
            f"convert it with `iconv -f latin1 -t utf-8 {path} > fixed.txt`, or read it as it is "
            "with --encoding latin-1 (or cp1252)."
        ) from None
    text = text.removeprefix("\ufeff")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise InputError(f"{path}: is empty; put your text in it.")
    return text


def to_rows(text: str, split: str) -> list[str]:
    if split == "none":
        return [text]
    if split == "line":
        return [line for line in text.split("\n") if line.strip()]
    # A line holding only spaces still separates paragraphs, as it does to a reader.
    paragraphs = [block.strip("\n") for block in re.split(r"\n(?:[ \t]*\n)+", text)]
    return [block for block in paragraphs if block.strip()]


def read_rows(source: Path, encoding: str, split: str) -> list[str]:
    """The rows of one input: a text file, or each .txt file of a folder in name order."""
    if not source.is_dir():
        return to_rows(read_text(source, encoding), split)
    files = sorted(source.glob("*.txt"))
    if not files:
        raise InputError(f"{source}: no .txt files in this folder.")
    return [row for file in files for row in to_rows(read_text(file, encoding), split)]


def loader_warning(rows: list[str]) -> str | None:
    """What datasets.load_dataset("csv") would not read back as written, if anything."""
    missing = [number for number, row in enumerate(rows, start=1) if row in PANDAS_MISSING]
    if missing:
        first = missing[0]
        return (
            f"{len(missing)} row(s) (first: row {first}, {rows[first - 1]!r}) are pandas "
            'missing-value markers: datasets.load_dataset("csv") reads them as empty, not as text '
            "(load with keep_default_na=False, or reword those rows)."
        )
    if all(PANDAS_NUMBER.fullmatch(row) for row in rows) or all(
        row in PANDAS_BOOLEAN for row in rows
    ):
        return (
            'every row is a number or true/false: datasets.load_dataset("csv") reads the column '
            'as numbers, not text (load with features={"text": Value("string")}).'
        )
    return None


def plan(inputs: list[str], output: str | None) -> list[tuple[Path, Path]]:
    """Pair each input with its CSV, refusing anything that would fail or clash halfway through."""
    if output is not None and len(inputs) != 1:
        raise InputError(f"-o/--output {output}: names one file, so give exactly one input.")
    pairs = []
    targets: dict[Path, Path] = {}
    for name in inputs:
        source = Path(name)
        try:
            target = Path(output) if output is not None else source.with_suffix(".csv")
        except ValueError:  # a name such as "", "." or "/" has no stem to put .csv on
            raise InputError(
                f"{name!r}: not a file name; give a text file, or a folder and -o NAME.csv."
            ) from None
        if target.resolve() == source.resolve():
            raise InputError(
                f"{source}: would overwrite itself; give an input that does not end in .csv."
            )
        if target.resolve() in targets:
            if source.resolve() == targets[target.resolve()].resolve():
                raise InputError(f"{source}: given twice; name each input once.")
            raise InputError(
                f"{source}: would write {target}, as {targets[target.resolve()]} does; "
                "rename one of them."
            )
        if not target.parent.is_dir():
            raise InputError(f"{target}: folder {target.parent} does not exist; create it first.")
        if target.is_dir():
            raise InputError(f"{target}: is a folder; give a file name ending in .csv.")
        targets[target.resolve()] = source
        pairs.append((source, target))
    return pairs


def write_scratch(rows: list[str], target: Path) -> Path:
    """Write the CSV next to its target under a temporary name, to be renamed once all are done."""
    # A name of our own and mode "x" rather than tempfile: the CSV gets the user's usual
    # permissions (umask) instead of tempfile's owner-only 0600.
    scratch = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(scratch, "x", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["text"])
            writer.writerows([row] for row in rows)
    except BaseException as error:
        scratch.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise InputError(f"{target}: cannot write it ({error.strerror}).") from None
        raise
    return scratch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert .txt files to one-column CSV files (header: text) for run_clm.py.",
        epilog="Every input is read and checked before any CSV is written; each CSV is written "
        "to a temporary file and renamed, so an existing CSV is never left half-written.",
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        default=DEFAULT_INPUTS,
        help="Text files to convert; each X.txt becomes X.csv next to it, a folder X/ becomes X.csv "
        "with one row per .txt file in it. Default: train.txt validation.txt.",
    )
    parser.add_argument(
        "-o", "--output", help="Output CSV path instead of X.csv; only with a single input."
    )
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="none",
        help="none: the whole file is one row (default). blank_line: one row per blank-line-separated "
        "paragraph. line: one row per non-empty line. Use the last two with run_clm.py --separate_examples.",
    )
    parser.add_argument(
        "--encoding",
        default="utf-8",
        help="Encoding of the input files (e.g. latin-1, cp1252). Default: utf-8. "
        "The CSV is always written as UTF-8.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scratches: list[Path] = []
    try:
        check_encoding(args.encoding)
        pairs = plan(args.inputs, args.output)
        # Read and check every input before writing anything: a bad file leaves all outputs untouched.
        converted = [
            (target, read_rows(source, args.encoding, args.split)) for source, target in pairs
        ]
        for target, rows in converted:
            scratches.append(write_scratch(rows, target))
        for (target, rows), scratch in zip(converted, scratches, strict=True):
            try:
                os.replace(scratch, target)
            except OSError as error:
                raise InputError(f"{target}: cannot replace it ({error.strerror}).") from None
            characters = sum(map(len, rows))
            print(
                f"wrote {target}: {len(rows):,} row{'s' * (len(rows) != 1)}, "
                f"{characters:,} character{'s' * (characters != 1)}"
            )
            warning = loader_warning(rows)
            if warning is not None:
                print(f"{PROG}: warning: {target}: {warning}", file=sys.stderr)
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"{PROG}: error: {error}.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        # After a failure, CSVs not yet renamed into place are dropped; the old ones stay.
        for scratch in scratches:
            scratch.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
