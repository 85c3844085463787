"""Tables of results that fit a terminal: one line a row at 80 columns where the names allow, file names
whole (folders shortened in the middle), emotion names never cut."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

#: The narrowest a path column gets: a phone photo's name (IMG_20240101_123456.jpg) and a little more.
MIN_PATH_WIDTH = 24
ELLIPSIS = "…"


def display_path(source: str) -> str:
    """A path relative to the working folder where it lies below it, else as given; bytes of a name
    that are not UTF-8 shown as U+FFFD, since a strict terminal encoding would refuse them."""
    try:
        shown = str(Path(source).resolve().relative_to(Path.cwd()))
    except (ValueError, OSError, RuntimeError):
        shown = source
    return shown.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def shortened(path: str, width: int) -> str:
    """``path`` in at most ``width`` characters where its file name allows: the name whole, the folders
    before it cut in the middle (``/home/ann/pho…/IMG_0001.jpg``); a longer name is kept whole."""
    if len(path) <= width:
        return path
    folders, sep, name = path.rpartition("/")
    keep = width - len(name) - len(ELLIPSIS) - len(sep)
    return f"{folders[:keep]}{ELLIPSIS}{sep}{name}" if sep and keep > 0 else (f"{ELLIPSIS}{sep}{name}" if sep else name)


def result_table(title: str) -> Table:
    """A table of results: a rule under the header and one space between columns, nothing else, so that
    a row of paths and figures fits 80 columns."""
    return Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=0, collapse_padding=True)


def room_for_paths(width: int, columns: dict[str, list[str]]) -> int:
    """The characters left for the path column of a :func:`result_table` ``width`` wide whose other
    ``columns`` (name -> cells) are shown whole."""
    return width - sum(max([len(name), *map(len, cells)]) for name, cells in columns.items()) - len(columns)


def fitted_table(title: str, paths: list[str], columns: dict[str, list[str]], width: int,
                 before: dict[str, list[str]] | None = None, left: tuple[str, ...] = ()) -> Table:
    """A :func:`result_table`: the ``before`` columns (a rank), the paths shortened to the room the other
    columns leave (never below :data:`MIN_PATH_WIDTH`), then ``columns``; every column but the paths whole.
    Columns named in ``left`` are left-aligned (text), the others right-aligned (figures)."""
    before = before or {}
    room = max(MIN_PATH_WIDTH, room_for_paths(width, {**before, **columns}))
    table = result_table(title)
    for name in before:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("image", overflow="fold")
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right", no_wrap=True)
    for i, path in enumerate(paths):
        table.add_row(*(cells[i] for cells in before.values()), shortened(display_path(path), room),
                      *(cells[i] for cells in columns.values()))
    return table
