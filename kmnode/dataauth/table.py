"""A dataset's plaintext: a small, strict CSV, read fast inside the service enclave.

The format (what an owner registers; anything else is a ``TableError``):

* UTF-8 text (a leading byte-order mark is ignored), CSV as Python's ``csv`` module reads its
  default dialect: comma-separated, ``"`` quotes, ``\\n`` or ``\\r\\n`` line ends, the last
  line end optional;
* the first row is the header: 1 to ``MAX_COLUMNS`` unique names matching ``COLUMN_NAME``;
* then at most ``MAX_ROWS`` rows, each with exactly as many cells as the header (a blank line
  is a row with no cells, so it is refused), each cell at most ``MAX_CELL_CHARS`` characters;
* a number (``Table.numeric``) is an ASCII float literal as Python's ``float`` reads it
  (``-1.5``, `` 2e3 ``), finite; an empty cell is not a number.

Why a fast path: a compute reads the whole dataset for every token, and the service enclave's
budget for a 1 MiB dataset is a few milliseconds. Most datasets have no quotes, and for those
everything but the cells themselves is checked over the bytes at C speed: one
``bytes.translate`` maps every byte but the comma and the line feed to ``x``, a cell too long
is then a run of ``x`` (a substring search), and with the ``x`` deleted the commas and line
ends must repeat ``n - 1`` commas and a line end per row. The cells come from one
``bytes.split``, with no Python object per row, and stay bytes until a column is read as text
(a number parses from the bytes directly). Anything quoted (or with a lone ``\\r``) takes the
``csv`` module. Both paths give the same ``Table`` for the same text.

Error messages name a row (1 is the header) and a column, never a cell's content.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping

MAX_ROWS = 1_000_000
MAX_COLUMNS = 64
MAX_CELL_CHARS = 256
COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: Every byte to ``x`` but the comma and the line feed: a table's shape.
_SHAPE = bytes(b if b in b",\n" else ord("x") for b in range(256))
_LONG_CELL = b"x" * (MAX_CELL_CHARS + 1)
_LINE_TO_COMMA = bytes.maketrans(b"\n", b",")


class TableError(ValueError):
    """A plaintext that is not a table of this format, or a column read as what it is not."""


class Table:
    """A parsed dataset: a header and rows of cells, read by column.

    The cells are kept row after row in one list (UTF-8 bytes), so a column is one slice;
    nothing else is built until a column is asked for. Its repr shows the shape only.
    """

    __slots__ = ("_cells", "_index", "header", "rows")

    def __init__(self, header: tuple[str, ...], cells: list[bytes]) -> None:
        self.header = header
        self.rows = len(cells) // len(header) - 1
        self._cells = cells
        self._index = {name: i for i, name in enumerate(header)}

    def __repr__(self) -> str:
        return f"Table(columns={len(self.header)}, rows={self.rows})"

    @property
    def columns(self) -> Mapping[str, tuple[str, ...]]:
        """Every column by name, in header order."""
        return {name: self.column(name) for name in self.header}

    def column(self, name: str) -> tuple[str, ...]:
        """The cells of column ``name``, in row order."""
        return tuple(map(bytes.decode, self._raw(name)))

    def numeric(self, name: str) -> tuple[float, ...]:
        """Column ``name`` as finite numbers, or a ``TableError`` naming the first row that
        is not one (see the module docstring)."""
        cells = self._raw(name)
        try:
            values = tuple(map(float, cells))
        except ValueError:
            values = ()
        if len(values) == len(cells) and all(map(math.isfinite, values)):
            return values
        row = next(i for i, cell in enumerate(cells) if not _is_finite_number(cell))
        raise TableError(f"row {row + 2}, column {_shown(name)}: not a finite number")

    def _raw(self, name: str) -> list[bytes]:
        index = self._index.get(name)
        if index is None:
            raise TableError(f"the table has no column {_shown(name)}")
        width = len(self.header)
        return self._cells[width + index :: width]


def parse_table(plaintext: bytes) -> Table:
    """The ``Table`` in ``plaintext``, or a ``TableError`` saying what is malformed."""
    try:
        text = plaintext.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TableError(f"not UTF-8 text (byte {e.start})") from None
    text = text.removeprefix("\ufeff")
    if "\r" in text and '"' not in text:
        text = text.replace("\r\n", "\n")
    if '"' in text or "\r" in text:
        return _by_csv(text)
    return _by_split(text)


def _by_split(text: str) -> Table:
    """A table without quotes or ``\\r`` (see the module docstring). The header and the row
    count are judged before any cell is built."""
    if not text:
        raise TableError("no header row")
    if not text.endswith("\n"):
        text += "\n"
    header = text[: text.index("\n")].split(",", MAX_COLUMNS)  # 65 parts say "too many"
    _check_header(header)
    width, data = len(header), text.encode()
    shape = data.translate(_SHAPE)
    structure = shape.translate(None, b"x")
    lines = structure.count(b"\n")
    if lines - 1 > MAX_ROWS:
        raise TableError(f"more than {MAX_ROWS} rows")
    row = b"," * (width - 1) + b"\n"
    if (
        len(structure) != width * lines
        or structure != row * lines
        or (width == 1 and b"\n\n" in data)
    ):
        _raise_row_width(text.split("\n")[:-1], width)
    if _LONG_CELL in shape:  # a cell of more bytes than the limit: count its characters
        _check_cell_chars(text[:-1].replace("\n", ",").split(","), width)
    return Table(tuple(header), data[:-1].translate(_LINE_TO_COMMA).split(b","))


def _by_csv(text: str) -> Table:
    """Any table, by the ``csv`` module (quotes, ``\\r``)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    cells: list[str] = []
    width = 0
    try:
        for number, row in enumerate(reader, start=1):
            if number == 1:
                _check_header(row)
                width = len(row)
            elif len(row) != width:
                raise TableError(f"row {number} has {len(row)} cells, the header {width}")
            elif number > MAX_ROWS + 1:
                raise TableError(f"more than {MAX_ROWS} rows")
            cells.extend(row)
    except csv.Error:
        raise TableError(f"malformed CSV at line {reader.line_num}") from None
    if not cells:
        raise TableError("no header row")
    _check_cell_chars(cells, width)
    return Table(tuple(cells[:width]), [cell.encode() for cell in cells])


def _raise_row_width(lines: list[str], width: int) -> None:
    """Name the first row whose cell count is not the header's (a blank line has none)."""
    for number, line in enumerate(lines, start=1):
        count = line.count(",") + 1 if line else 0
        if count != width:
            raise TableError(f"row {number} has {count} cells, the header {width}")
    raise AssertionError("unreachable: some row has the wrong width")  # pragma: no cover


def _check_cell_chars(cells: list[str], width: int) -> None:
    if max(map(len, cells)) > MAX_CELL_CHARS:
        at = next(i for i, cell in enumerate(cells) if len(cell) > MAX_CELL_CHARS)
        raise TableError(
            f"row {at // width + 1}, column {at % width + 1}: "
            f"a cell is longer than {MAX_CELL_CHARS} characters"
        )


def _check_header(header: list[str]) -> None:
    if not header or header == [""]:
        raise TableError("no header row")
    if len(header) > MAX_COLUMNS:
        raise TableError(f"a header has 1 to {MAX_COLUMNS} columns, not {len(header)}")
    for number, name in enumerate(header, start=1):
        if not COLUMN_NAME.fullmatch(name):
            raise TableError(f"column {number}: a name is [A-Za-z_][A-Za-z0-9_]{{0,63}}")
    if len(set(header)) != len(header):
        raise TableError("the header names a column twice")


def _is_finite_number(cell: bytes) -> bool:
    try:
        return math.isfinite(float(cell))
    except ValueError:
        return False


def _shown(name: str) -> str:
    """A column name as an error shows it: quoted, cut to the longest name allowed."""
    return repr(name[:64])
