"""Incremental detokenization on SmolLM2's byte-level BPE: multi-byte characters, stop strings."""

from __future__ import annotations

import pytest

from muxserve.server.detokenizer import IncrementalDetokenizer

TEXT = "Hi 👋🏽 世界! café — naïve 😀 日本語のテキスト"


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


def feed(detok, ids) -> list[str]:
    return [detok.add(t) for t in ids] + [detok.flush()]


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    singles = [tokenizer.decode([t]) for t in ids]
    assert sum("\ufffd" in s for s in singles) >= 10  # many tokens hold part of a character
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    deltas = feed(IncrementalDetokenizer(tokenizer, prompt), ids)
    assert "".join(deltas) == TEXT == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[:4] == ["Hi", "", "", " 👋"]  # the emoji's bytes come out together
    assert "世" in deltas and "界" in deltas


def test_special_tokens_are_skipped_and_no_prompt_works(tokenizer):
    ids = tokenizer.encode("Paris.", add_special_tokens=False) + [2]  # 2 = <|im_end|>
    deltas = feed(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(deltas) == "Paris." and deltas[-2:] == ["", ""]


def test_an_incomplete_character_at_the_end_is_flushed_as_decode_shows_it(tokenizer):
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.add(t) for t in ids) == "ok"
    assert "ok" + detok.flush() == tokenizer.decode(ids)


def test_stop_string_cuts_before_it_and_holds_back_a_possible_start(tokenizer):
    ids = tokenizer.encode("one two three four five", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["thr", "zzz"])
    deltas = []
    for t in ids:
        deltas.append(detok.add(t))
        if detok.stopped:
            break
    assert detok.stopped and detok.matched == "thr"
    assert "".join(deltas) + detok.flush() == "one two "
    # while streaming, the last len("zzz") - 1 characters wait: they could start a stop string
    assert deltas[:2] == ["o", "ne t"]


def test_earliest_stop_string_wins_and_spans_tokens(tokenizer):
    ids = tokenizer.encode("abc def ghi", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, stop=["ghi", "c d"])
    out = "".join(detok.add(t) for t in ids) + detok.flush()
    assert (out, detok.matched, detok.stopped) == ("ab", "c d", True)
    assert detok.add(5) == ""  # nothing after the stop


def test_without_a_tokenizer_every_delta_is_empty():
    detok = IncrementalDetokenizer(None, [1, 2, 3], stop=["x"])
    assert feed(detok, [4, 5, 6]) == ["", "", "", ""] and not detok.stopped
