"""Reading JSON lines with the place of a bad line: the one loop behind the data files and the code-eval CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) of every non-empty line; a line that is not JSON raises ValueError `FILE:LINE: ...`."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg}, column {err.colno})") from None
