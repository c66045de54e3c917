"""Turn plain-text training data into the one-column CSV files run_clm.py reads.

    python text2csv.py                       # train.txt -> train.csv, validation.txt -> validation.csv
    python text2csv.py notes.txt             # notes.txt -> notes.csv
    python text2csv.py book.txt -o data.csv  # choose the output name
    python text2csv.py --split blank_line    # one row per paragraph (separate examples)

CSV rather than .txt because a CSV cell keeps its line breaks exactly, and the model should learn
where lines end. By default the whole file is one row: run_clm.py concatenates and cuts it into
blocks anyway.
"""

import argparse
import csv
import os
import re
import sys
import tempfile
from pathlib import Path

PROG = "text2csv.py"
DEFAULT_INPUTS = ["train.txt", "validation.txt"]
SPLITS = ("none", "blank_line", "line")


class InputError(Exception):
    """A problem with an input file, reported as one line naming the file and the fix."""


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
            f"{path}: not valid {encoding} (byte 0x{raw[error.start]:02x} at offset {error.start}); convert it "
            f"with `iconv -f latin1 -t utf-8 {path} -o {path}.utf8` or read it as it is with --encoding latin-1."
        ) from None
    except LookupError:
        raise InputError(
            f"--encoding {encoding}: unknown encoding; try utf-8, latin-1 or cp1252."
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


def write_csv(rows: list[str], destination: Path) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves half a CSV."""
    handle, scratch = tempfile.mkstemp(
        dir=destination.parent or ".", prefix=f".{destination.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(["text"])
            writer.writerows([row] for row in rows)
        os.replace(scratch, destination)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def plan(inputs: list[str], output: str | None) -> list[tuple[Path, Path]]:
    if output is not None and len(inputs) != 1:
        raise InputError(f"-o/--output {output}: names one file, so give exactly one input.")
    pairs = []
    for name in inputs:
        source = Path(name)
        target = Path(output) if output is not None else source.with_suffix(".csv")
        if target.resolve() == source.resolve():
            raise InputError(
                f"{source}: would overwrite itself; give an input that does not end in .csv."
            )
        pairs.append((source, target))
    return pairs


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert .txt files to one-column CSV files (header: text)."
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        default=DEFAULT_INPUTS,
        help="Text files to convert; each X.txt becomes X.csv. Default: train.txt validation.txt.",
    )
    parser.add_argument("-o", "--output", help="Output CSV path, when converting a single input.")
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
        help="Encoding of the input files (e.g. latin-1, cp1252). Default: utf-8.",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        pairs = plan(args.inputs, args.output)
        # Read and check every input before writing anything: a bad file leaves all outputs untouched.
        converted = [
            (target, to_rows(read_text(source, args.encoding), args.split))
            for source, target in pairs
        ]
        for target, rows in converted:
            write_csv(rows, target)
            print(
                f"wrote {target}: {len(rows)} row{'s' * (len(rows) != 1)}, {sum(map(len, rows)):,} characters"
            )
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(
            f"{PROG}: error: {error.filename}: cannot write it ({error.strerror}).", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
