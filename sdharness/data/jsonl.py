"""Line-by-line JSONL reading whose every error names the file, the line and the fix: any objects
(:func:`json_objects`, which the chat-log loader reads) and problem rows (:func:`read_jsonl`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from sdharness.errors import DataError

REQUIRED_FIELDS = ("problem", "solution")
EVAL_FIELDS = ("problem", "answer")  # eval prompts with the problem and checks the answer; no solution


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


def read_jsonl(path: str | Path, required: tuple[str, ...] = REQUIRED_FIELDS, *, field: str = "data.path",
               where: bool = False) -> list[dict[str, str]]:
    """Rows of a JSONL file; blank lines are skipped, anything malformed is an error naming file:line
    (a missing file names the config ``field``). ``where=True`` adds ``"where": "FILE:LINE"`` to
    each row, for later errors about that row."""
    rows = []
    for number, row in json_objects(path, field):
        if isinstance(row.get("answer"), (int, float)) and not isinstance(row["answer"], bool):
            row["answer"] = str(row["answer"])  # a numeric answer (42, 0.5) counts as given
        missing = [name for name in required if not isinstance(row.get(name), str) or not row[name].strip()]
        if missing:
            optional = "" if "answer" in required else " (answer is optional)"
            bootstrap = (f"; rows with only problem and answer get worked solutions from `sdharness-bootstrap "
                         f"--problems {path} --out solved.jsonl`, or train on them with algo=grpo or "
                         "algo.hint_source=sibling"
                         if "solution" in missing else "")
            raise DataError(f"{path}:{number}: field(s) {', '.join(missing)} missing or not a non-empty string; "
                            f"every row needs {', '.join(required)}{optional}{bootstrap}")
        if "hint" in row and (not isinstance(row["hint"], str) or not row["hint"].strip()):
            raise DataError(f"{path}:{number}: field hint must be a non-empty string (it replaces the solution in "
                            "the teacher prompt); remove it to use the solution")
        if "answer" in row:
            row["answer"] = str(row["answer"])
        if where:
            row["where"] = f"{path}:{number}"
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty or holds only blank lines. Write one JSON object per "
                        f"line with fields {', '.join(required)}")
    return rows
