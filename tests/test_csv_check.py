"""Local CSV checks before upload: each problem is found and named by its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.client.csv_check import check_csv


def _write(tmp_path: Path, data: bytes | str, name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _problems(path: Path) -> list[str]:
    return [str(p) for p in check_csv(path).problems]


def test_a_clean_file_has_no_problems(tmp_path: Path) -> None:
    report = check_csv(_write(tmp_path, "name,age\nann,61\nbob,\n\ncy,1e3\n"))
    assert report.ok and report.columns == ("name", "age") and report.rows == 3


def test_empty_file(tmp_path: Path) -> None:
    assert _problems(_write(tmp_path, b"")) == ["the file is empty"]


def test_header_only(tmp_path: Path) -> None:
    assert _problems(_write(tmp_path, "a,b\n")) == ["no data rows after the header (line 1)"]


def test_binary_file_names_the_line_of_the_nul_byte(tmp_path: Path) -> None:
    [problem] = check_csv(_write(tmp_path, b"a,b\n1,2\n\x7fELF\x00\x01")).problems
    assert "binary" in problem.message and problem.line == 3


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    [problem] = check_csv(_write(tmp_path, "a,b\n1,2\n3,caf\xe9\n".encode("latin-1"))).problems
    assert "not UTF-8" in problem.message and problem.line == 3


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    assert check_csv(_write(tmp_path, "\ufeffa,b\n1,2\n".encode())).columns == ("a", "b")


def test_ragged_rows_are_named_by_line(tmp_path: Path) -> None:
    rows = "a,b,c\n" + "1,2,3\n" * 3 + "4,5\n" + "6,7,8,9\n" + "1,2\n" * 5
    problems = check_csv(_write(tmp_path, rows)).problems
    ragged = [p for p in problems if "field(s)" in p.message]
    assert [(p.line, p.message) for p in ragged] == [
        (5, "row has 2 field(s), the header has 3"),
        (6, "row has 4 field(s), the header has 3"),
        (7, "row has 2 field(s), the header has 3"),
    ]
    assert any("4 more row(s)" in p.message for p in problems)


def test_type_drift_names_the_column_and_the_lines(tmp_path: Path) -> None:
    data = "id,weight\n" + "".join(f"p{i},{60 + i}\n" for i in range(6)) + "p6,n/a\np7,70\np8,?\n"
    [problem] = check_csv(_write(tmp_path, data)).problems
    assert problem.message == (
        "type drift: column 'weight' is numeric on 7 row(s) but not at line 8 ('n/a'), line 10 ('?')"
    )


def test_a_text_column_with_some_numbers_is_not_drift(tmp_path: Path) -> None:
    assert check_csv(_write(tmp_path, "name\nann\nbob\n42\ncy\n")).ok


def test_unterminated_quote_is_invalid_csv(tmp_path: Path) -> None:
    [problem] = check_csv(_write(tmp_path, 'a,b\n1,"2\n3,4\n')).problems
    assert "not valid CSV" in problem.message and problem.line is not None


@pytest.mark.parametrize("header", ["a,,c", "a,b,a"])
def test_bad_headers(tmp_path: Path, header: str) -> None:
    [problem] = check_csv(_write(tmp_path, f"{header}\n1,2,3\n")).problems
    assert problem.line == 1 and "header" in problem.message
