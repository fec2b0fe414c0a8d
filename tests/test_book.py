"""Book-wide checks: run records are complete, chapters are in the table of contents."""

from pathlib import Path

import pytest
import yaml

from scratchlm.runs import read_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("record", sorted((ROOT / "book/_runs").glob("*.json")), ids=lambda p: p.name)
def test_every_run_record_is_complete(record):
    command = read_record(record)["command"]
    if command.startswith("python book/_ext/"):  # a script outside the package
        assert (ROOT / command.split()[1]).is_file()
    else:
        assert command.startswith("python -m scratchlm")


def test_every_chapter_is_in_the_table_of_contents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    listed = {toc["root"]} | {entry["file"] for entry in toc["chapters"]}
    chapters = {f"book/{p.stem}" for p in (ROOT / "book").glob("[0-9][0-9]_*.md")}
    assert chapters <= listed


def code_cell_lines(chapter: Path):
    """(line number, text) of every line inside a ``{code-cell}`` of a chapter."""
    inside = False
    for number, line in enumerate(chapter.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```{code-cell}"):
            inside = True
        elif inside and line.startswith("```"):
            inside = False
        elif inside:
            yield number, line


@pytest.mark.parametrize("chapter", sorted((ROOT / "book").glob("[0-9][0-9]_*.md")), ids=lambda p: p.name)
def test_code_lines_fit_in_88_columns(chapter):
    long = [f"{chapter.name}:{number} ({len(line)})" for number, line in code_cell_lines(chapter)
            if len(line) > 88]
    assert not long, f"code lines over 88 columns: {', '.join(long)}"
