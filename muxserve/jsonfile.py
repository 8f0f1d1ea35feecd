"""JSON files read with errors that name the file and say where its text stops being JSON.

msgspec checks types while it parses, so a document cut off early is reported as its first wrong
type (``[1,2`` read as an object: "Expected `object`, got `array`"), and its own message for a
cut-off document names no position. ``decode`` checks the syntax first; both helpers report a
cut-off document as "not valid JSON (truncated?)" with the byte where the text ends.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, TypeVar

import msgspec

T = TypeVar("T")

_BYTE = re.compile(r"\s*\(byte (\d+)\)$")


class JSONFileError(ValueError):
    """A file that is not valid JSON, or not of the expected shape; the message names the file."""


def truncated(source: str, size: int) -> str:
    if size == 0:
        return f"{source}: not valid JSON: the file is empty"
    return f"{source}: not valid JSON (truncated?): the text ends at byte {size} before the document is complete"


def _msgspec_syntax(source: str, data: bytes, error: msgspec.DecodeError) -> str:
    text = str(error)
    match = _BYTE.search(text)
    if match is None:  # msgspec's "Input data was truncated" names no position
        return truncated(source, len(data))
    reason = text[: match.start()].removeprefix("JSON is malformed: ")
    return f"{source}: not valid JSON near byte {match.group(1)}: {reason}"


def decode(data: bytes, type: type[T], source: str, error: type[Exception] = JSONFileError) -> T:
    """``msgspec.json.decode(data, type=type)``; a syntax or type error raises ``error`` naming ``source``."""
    try:
        return msgspec.json.decode(data, type=type)
    except msgspec.ValidationError as e:
        try:  # a broken document is reported as such, not as the first type it seemed to have
            msgspec.json.decode(data)
        except msgspec.DecodeError as syntax:
            raise error(_msgspec_syntax(source, data, syntax)) from None
        raise error(f"{source}: {e}") from None
    except msgspec.DecodeError as e:
        raise error(_msgspec_syntax(source, data, e)) from None


def load(path: str | Path, what: str = "", error: type[Exception] = JSONFileError) -> Any:
    """The JSON document of a file (any shape); a file that is not UTF-8 JSON raises ``error``."""
    path = Path(path)
    source = f"{what} {path}".strip()
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text at byte {e.start}") from None
    except json.JSONDecodeError as e:
        # At the end of the text, or a string that runs to it: the text stops mid-document.
        if e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated string"):
            raise error(truncated(source, len(data))) from None
        byte = len(e.doc[: e.pos].encode("utf-8"))
        raise error(f"{source}: not valid JSON at byte {byte} (line {e.lineno} column {e.colno}): {e.msg}") from None
