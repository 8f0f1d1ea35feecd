"""Reading and writing the files users give and get: YAML and JSON (gzip-compressed when the name
ends in ``.gz``), with errors that name the file and say where its text stops being valid.

msgspec checks types while it parses, so a JSON document cut off early is reported as its first
wrong type (``[1,2`` read as an object: "Expected `object`, got `array`"), and its own message
for a cut-off document names no position. ``load`` checks the syntax first and reports a cut-off
document as "not valid JSON (truncated?)" with the byte where the text ends.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import re
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import yaml

from muxserve.errors import InputError

T = TypeVar("T")

_BYTE = re.compile(r"\s*\(byte (\d+)\)$")
JSON_SUFFIXES = (".json", ".json.gz")  # anything else is read as YAML


def load(path: str | Path, what: str = "", as_type: Any = None, error: type[Exception] = InputError,
         source: str | None = None) -> Any:
    """The document of a YAML or JSON file (``.json.gz`` too), as ``as_type`` when given (msgspec rules).

    Every problem raises ``error``: a missing file as "WHAT PATH does not exist", anything in its
    text as "SOURCE: ..." (``source`` defaults to "WHAT PATH").
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist".strip())
    source = source or f"{what} {path}".strip()
    data = read_bytes(path)
    if not path.name.endswith(JSON_SUFFIXES):
        return _load_yaml(data, as_type, source, error)
    if as_type is None:
        return _load_json(data, source, error)
    return decode_json(data, as_type, source, error)


def read_bytes(path: str | Path) -> bytes:
    """The bytes of a file, decompressed when its name ends in ``.gz``."""
    path = Path(path)
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def write_json(path: str | Path, doc: Any, indent: int | None = None) -> None:
    """Write ``doc`` as JSON, gzip-compressed when the name ends in ``.gz``, atomically (a crash leaves
    no half-written file)."""
    path = Path(path)
    data = msgspec.json.encode(doc)
    if indent is not None:
        data = msgspec.json.format(data, indent=indent)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)  # equal documents, equal bytes
    write_atomic(path, data)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def decode_json(data: bytes, as_type: Any, source: str, error: type[Exception] = InputError) -> Any:
    """``msgspec.json.decode(data, type=as_type)``; a syntax or type error raises ``error`` naming ``source``."""
    try:
        return msgspec.json.decode(data, type=as_type)
    except msgspec.ValidationError as e:
        try:  # a broken document is reported as such, not as the first type it seemed to have
            msgspec.json.decode(data)
        except msgspec.DecodeError as syntax:
            raise error(_msgspec_syntax(source, data, syntax)) from None
        raise error(f"{source}: {e}") from None
    except msgspec.DecodeError as e:
        raise error(_msgspec_syntax(source, data, e)) from None


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


def _load_json(data: bytes, source: str, error: type[Exception]) -> Any:
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


def _load_yaml(data: bytes, as_type: Any, source: str, error: type[Exception]) -> Any:
    try:
        doc = yaml.load(data, getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise error(f"{source}: not valid YAML: {e}") from None
    if as_type is None:
        return doc
    try:
        return msgspec.convert(doc, as_type, builtin_types=(datetime.datetime, datetime.date))
    except msgspec.ValidationError as e:
        raise error(f"{source}: {e}") from None
