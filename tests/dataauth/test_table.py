"""A dataset's plaintext reads as the CSV its owner wrote, and nothing malformed gets through."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmnode.dataauth.table import MAX_ROWS, Table, TableError, parse_table

MARKER = "SECRET-CELL-91c2"

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
any_cell = st.text(
    st.characters(blacklist_categories=["Cs"]), max_size=12
)  # every character but lone surrogates: commas, quotes, line ends, NUL included
plain_cell = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters=',"\r\n'), max_size=12
)


@st.composite
def tables(draw: st.DrawFn, cells: st.SearchStrategy[str]) -> tuple[list[str], list[list[str]]]:
    header = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    rows = draw(st.lists(st.lists(cells, min_size=len(header), max_size=len(header)), max_size=15))
    return header, rows


def _csv(header: list[str], rows: list[list[str]], line_end: str = "\n") -> bytes:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=line_end)
    writer.writerows([header, *rows])
    return out.getvalue().encode()


def _columns(header: list[str], rows: list[list[str]]) -> dict[str, tuple[str, ...]]:
    return {name: tuple(row[i] for row in rows) for i, name in enumerate(header)}


@settings(max_examples=200, deadline=None)
@given(table=tables(any_cell), line_end=st.sampled_from(["\n", "\r\n"]))
def test_a_table_reads_as_the_csv_module_wrote_it(
    table: tuple[list[str], list[list[str]]], line_end: str
) -> None:
    header, rows = table  # (csv.writer quotes a lone empty cell: a row, not a blank line)
    if line_end == "\n":  # Python 3.11's writer quotes a "\r" only when it ends its lines
        rows = [[cell.replace("\r", "\n") for cell in row] for row in rows]
    parsed = parse_table(_csv(header, rows, line_end))
    assert parsed.header == tuple(header) and parsed.rows == len(rows)
    assert parsed.columns == _columns(header, rows)


@settings(max_examples=200, deadline=None)
@given(table=tables(plain_cell), final_line_end=st.booleans())
def test_the_fast_path_and_the_csv_module_agree(
    table: tuple[list[str], list[list[str]]], final_line_end: bool
) -> None:
    """Without quotes the fast path reads the table; a quoted header name sends the same table
    through the csv module: both must see the same cells (or both refuse it)."""
    header, rows = table
    text = "\n".join(",".join(row) for row in [header, *rows]) + ("\n" if final_line_end else "")
    quoted = f'"{header[0]}"' + text[len(header[0]) :]
    outcomes: list[tuple[tuple[str, ...], Mapping[str, tuple[str, ...]]] | None] = []
    for variant in (text, quoted):
        try:
            parsed = parse_table(variant.encode())
            outcomes.append((parsed.header, parsed.columns))
        except TableError:
            outcomes.append(None)
    assert outcomes[0] == outcomes[1]
    if all(row != [""] for row in rows):  # a lone empty cell is a blank line: refused
        assert outcomes[0] == (tuple(header), _columns(header, rows))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_garbage_is_a_table_or_a_table_error_never_anything_else(data: bytes) -> None:
    try:
        table = parse_table(data)
    except TableError:
        return
    assert all(len(column) == table.rows for column in table.columns.values())


def test_line_ends_a_byte_order_mark_and_the_last_line_end_are_all_optional() -> None:
    expected = {"a": ("1", "3"), "b": ("2", "4")}
    for text in (
        b"a,b\n1,2\n3,4\n",
        b"a,b\n1,2\n3,4",
        b"a,b\r\n1,2\r\n3,4\r\n",
        b"\xef\xbb\xbfa,b\n1,2\n3,4",
    ):
        assert parse_table(text).columns == expected
    assert parse_table(b"only_header").rows == 0
    assert parse_table(b'x\n""\n').columns == {"x": ("",)}  # one empty cell, quoted


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (b"", "no header"),
        (b"\n1\n", "no header"),
        (b"\xff\xfe", "not UTF-8"),
        (b"a,\xc3\n", r"not UTF-8 text \(byte 2\)"),
        (b"a,a\n1,2\n", "twice"),
        (b"1a\n", "column 1: a name"),
        (b"a,b c\n", "column 2: a name"),
        (b"a," + b"x" * 65 + b"\n", "column 2: a name"),
        (",".join(f"c{i}" for i in range(65)).encode(), "1 to 64 columns"),
        (b"a,b\n1,2\n3\n", "row 3 has 1 cells, the header 2"),
        (b"a,b\n1,2,3\n", "row 2 has 3 cells, the header 2"),
        (b"a,b\n1,2\n\n3,4\n", "row 3 has 0 cells"),
        (b"a\n1\n\n2\n", "row 3 has 0 cells"),
        (b"a\n1\n\n", "row 3 has 0 cells"),
        (b'a,b\n"1,2\n', "malformed CSV"),
        (b'a,b\n"1"x,2\n', "malformed CSV"),
        (b'a,b\n"1",2\n3\n', "row 3 has 1 cells"),
        (b"a,b\n1," + b"x" * 257 + b"\n", "row 2, column 2: a cell is longer than 256"),
        (b'a,b\n1,"' + b"x" * 257 + b'"\n', "row 2, column 2: a cell is longer than 256"),
        (b"a\n" + "é".encode() * 257 + b"\n", "row 2, column 1: a cell is longer"),
    ],
)
def test_a_malformed_table_is_refused_saying_where(text: bytes, says: str) -> None:
    with pytest.raises(TableError, match=says):
        parse_table(text)


def test_the_cell_limit_counts_characters_not_bytes() -> None:
    longest = "é" * 256  # 512 bytes, 256 characters
    assert parse_table(f"a,b\n1,{longest}\n".encode()).column("b") == (longest,)
    assert parse_table(f"a\n{'x' * 256}\n".encode()).rows == 1


def test_at_most_a_million_rows() -> None:
    at_limit = b"a\n" + b"1\n" * MAX_ROWS
    assert parse_table(at_limit).rows == MAX_ROWS
    with pytest.raises(TableError, match="more than 1000000 rows"):
        parse_table(at_limit + b"1\n")
    with pytest.raises(TableError, match="more than 1000000 rows"):
        parse_table(b'"a"\n' + b"1\n" * (MAX_ROWS + 1))  # the csv module's path


def test_a_column_reads_as_finite_numbers_or_names_the_row() -> None:
    table = parse_table(b"x,y,z\n1,-2.5e3, 7 \n2,1_000,x\n")
    assert table.numeric("x") == (1.0, 2.0)
    assert table.numeric("y") == (-2500.0, 1000.0)
    with pytest.raises(TableError, match=r"row 3, column 'z': not a finite number"):
        table.numeric("z")
    with pytest.raises(TableError, match="no column 'w'"):
        table.numeric("w")
    with pytest.raises(TableError, match="no column"):
        table.column("w")


@pytest.mark.parametrize(
    "cell", ["nan", "NaN", "inf", "-Infinity", "1e999", "", "١", "0x10", "1,5"]
)
def test_what_is_not_a_finite_number(cell: str) -> None:
    table = parse_table(f'x\n1\n"{cell}"\n'.encode())
    with pytest.raises(TableError, match="row 3, column 'x'"):
        table.numeric("x")


def test_no_cell_content_in_an_error_or_a_repr() -> None:
    table = parse_table(f"name,pay\n{MARKER},12\nbob,{MARKER}\n".encode())
    assert MARKER not in repr(table) and repr(table) == "Table(columns=2, rows=2)"
    with pytest.raises(TableError) as caught:
        table.numeric("pay")
    assert MARKER not in str(caught.value)
    for bad in (
        f"a,b\n{MARKER},1,2\n",
        f"a,b\n{MARKER}{'x' * 300},1\n",
        f'a,b\n"{MARKER}\n',
        f"a,{MARKER}-\n",
    ):
        with pytest.raises(TableError) as refused:
            parse_table(bad.encode())
        assert MARKER not in str(refused.value)


def test_a_table_is_read_only_by_column() -> None:
    table = parse_table(b"a,b\n1,2\n")
    assert isinstance(table, Table) and table.column("a") == ("1",)
    with pytest.raises(AttributeError):
        table.extra = 1  # type: ignore[attr-defined]
