"""Line-by-line JSONL reading whose every error names the file, the line and the fix.

Shared by the problem loader (``data.py``) and the chat-log loader (``chatlog.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from sdharness.errors import DataError


def json_objects(path: str | Path, field: str = "data.path") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; Windows line endings and a UTF-8 byte
    order mark (as Windows editors write) are fine."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{field}: {path} does not exist; point {field} at an existing JSONL file")
    if path.is_dir():
        raise DataError(f"{field}: {path} is a directory; point {field} at a JSONL file in it (one JSON object "
                        "per line)")
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8").strip()  # strip() also drops Windows' \r
        except UnicodeDecodeError as error:
            raise DataError(f"{where}: not valid UTF-8 ({error.reason} at byte {error.start}); "
                            "re-encode the file as UTF-8") from None
        if not text:
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg}, column {error.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; "
                            "each line must be one JSON object {...}")
        yield number, row
