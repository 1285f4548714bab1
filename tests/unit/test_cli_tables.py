"""captionbus/cli/tables.py: kept columns whole at any width, the rest share the terminal's."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

from captionbus.cli.tables import FLOOR, print_table, shared_widths

ROWS = [["j1a24de4c1eb-7f59b090", "failed", "a-rather-long-film-name.mp4", "asr: [red]the model could not be loaded"],
        ["j1a24de4c1eb-9c2b667a", "running", "x.mp4", ""]]
HEADERS = ["job", "status", "input", "reason"]


def render(width: int, wide: bool = False) -> list[str]:
    out = Console(file=io.StringIO(), width=width)
    print_table(out, HEADERS, ROWS, keep={"job", "status"}, wide=wide)
    return out.file.getvalue().splitlines()


@pytest.mark.parametrize("width", [30, 50, 80, 120])
def test_ids_and_states_are_whole_at_any_width(width):
    lines = render(width)
    assert [line.split()[:2] for line in lines] == [["job", "status"], *([row[0], row[1]] for row in ROWS)]
    if width >= 120:  # room for everything: nothing elided, and no wider than the terminal
        assert ROWS[0][3] in lines[1] and max(map(len, lines)) <= width
    elif width >= 50:  # elided to the terminal's width, ids untouched
        assert "…" in lines[1] and max(map(len, lines)) <= width


def test_wide_wraps_instead_of_eliding():
    lines = render(60, wide=True)
    assert "…" not in "".join(lines) and len(lines) > 3
    assert "[red]" in "".join(lines)  # a reason is text, not markup


def test_shared_widths_give_narrow_columns_all_they_need():
    assert shared_widths([5, 40], 30) == [5, 25]
    assert shared_widths([40, 40], 30) == [15, 15]
    assert shared_widths([40, 3], 0) == [FLOOR, 3]  # never below the floor: the table grows instead
