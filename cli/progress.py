"""A progress bar on stderr (tqdm): shown on a terminal or when asked, silent otherwise."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from cli.display import shown

MIN_BYTES_FOR_BAR = 4 << 20  # small files finish before a bar would help


@contextlib.contextmanager
def progress_bar(total: int, label: str, wanted: bool | None) -> Iterator[Callable[[int], None]]:
    show = wanted if wanted is not None else (sys.stderr.isatty() and total >= MIN_BYTES_FOR_BAR)
    if not show:
        yield lambda _n: None
        return
    from tqdm import tqdm  # imported only when a bar is shown: keeps scripted calls fast

    with tqdm(
        total=total,
        desc=shown(label[-30:]),  # a file name: escaped like every line for a human
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
    ) as bar:
        yield bar.update
