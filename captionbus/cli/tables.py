"""Tables that never cut an id, at the terminal's width.

`captionbus jobs` used to cap itself at 80 columns and cut every cell to a fixed width, so once a
job had a reason its id printed as `j1a24d72458c-096cb…`, which `status` cannot take; `workers`
cut the busy job's id; `--wide` let rich wrap the id over two lines. rich's own column
collapsing shrinks, and can drop, even `no_wrap` columns when a row is wider than the console,
so the widths are decided here: the `keep` columns (ids, states, times) always get their full
width; the rest share what is left of the console's width (the terminal's, or COLUMNS; 80 when
the output is not a terminal), elided with "…", or wrapped with `--wide`. When the kept columns
alone are wider than the terminal the table is printed wider, never cut.
"""
from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

GAP = 2  # Table(box=None, pad_edge=False): one space of padding either side of an inner edge
FLOOR = 8  # a shared column is never made narrower than this (or its own content)


def shared_widths(needs: list[int], room: int) -> list[int]:
    """Widths for columns that need `needs` cells, sharing `room`: the narrow ones get all they
    need, the wide ones split the rest evenly; none below min(need, FLOOR)."""
    widths = [0] * len(needs)
    order = sorted(range(len(needs)), key=lambda i: needs[i])
    for done, i in enumerate(order):
        share = max(room // (len(order) - done), 0)
        widths[i] = max(min(needs[i], share), min(needs[i], FLOOR))
        room -= widths[i]
    return widths


def print_table(out: Console, headers: list[str], rows: list[list[str]], keep: set[str], wide: bool = False) -> None:
    """Rows under `headers`; `keep` names the columns printed whole on every row."""
    needs = [max([cell_len(h), *(cell_len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    shared = [i for i, h in enumerate(headers) if h not in keep]
    room = out.width - GAP * (len(headers) - 1) - sum(needs[i] for i, h in enumerate(headers) if h in keep)
    widths = list(needs)
    for i, width in zip(shared, shared_widths([needs[i] for i in shared], room)):
        widths[i] = width
    table = Table(box=None, pad_edge=False)
    for i, header in enumerate(headers):
        wraps = wide and i in shared
        table.add_column(header, width=widths[i], no_wrap=not wraps, overflow="fold" if wraps else "ellipsis")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: a reason with [brackets] is not markup
    needed = sum(widths) + GAP * (len(headers) - 1)
    if needed > out.width:  # print(width=) is capped at the console's: a wider one, same stream
        out = Console(file=out.file, width=needed, color_system=out.color_system, force_terminal=out.is_terminal)
    out.print(table)
