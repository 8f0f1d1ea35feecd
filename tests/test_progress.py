"""Progress output: a tqdm bar on a terminal, plain lines at an interval anywhere else."""

from __future__ import annotations

import io

import pytest

from muxserve.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_a_line_per_interval_and_one_at_the_end(tmp_path):
    clock = Clock()
    with open(tmp_path / "log", "w") as file:
        with Progress(400, "requests", "req", file=file, interval_s=15, clock=clock) as bar:
            for _ in range(400):  # one update every 0.25 s: 100 s in all
                clock.now += 0.25
                bar.update()
    text = (tmp_path / "log").read_text()
    assert "\r" not in text
    assert text.splitlines() == [
        "requests: 60/400 req (15 %), after 15 s",
        "requests: 120/400 req (30 %), after 30 s",
        "requests: 180/400 req (45 %), after 45 s",
        "requests: 240/400 req (60 %), after 60 s",
        "requests: 300/400 req (75 %), after 75 s",
        "requests: 360/400 req (90 %), after 90 s",
        "requests: 400/400 req (100 %), done in 100.0 s",
    ]


def test_unknown_total_failure_and_disabled():
    clock, out = Clock(), io.StringIO()
    with pytest.raises(RuntimeError), Progress(None, "cells", "cell", file=out, clock=clock) as bar:
        bar.update(3)
        clock.now += 2
        raise RuntimeError("boom")
    assert out.getvalue() == "cells: 3 cell, stopped after 2.0 s\n"
    quiet = io.StringIO()
    with Progress(5, "generating", file=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == "" and bar.n == 5


def test_a_terminal_gets_a_tqdm_bar():
    out = Terminal()
    with Progress(4, "requests", "req", file=out) as bar:
        bar.update(4)
    assert "\r" in out.getvalue() and "4/4" in out.getvalue()
