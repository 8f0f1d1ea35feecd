"""The restart policy of runtime groups, on a fake clock with fake processes: back-off, counting, failure."""

from __future__ import annotations

import itertools

from muxserve.instance.processes import Child
from muxserve.instance.supervisor import Failed, Lost, RestartPolicy, Restored, RuntimeState, Supervisor
from muxserve.ipc import runtime as M
from muxserve.ipc.runtime import Phase

_pids = itertools.count(1000)


class FakeProc:
    def __init__(self):
        self.pid = next(_pids)
        self.returncode = None

    def poll(self):
        return self.returncode


class FakeProcesses:
    def __init__(self):
        self.children: list[Child] = []
        self.stopped: list[str] = []

    def start(self, name: str) -> Child:
        child = Child(name, FakeProc(), None)
        self.children.append(child)
        return child

    def stop(self, children, timeout_s=10.0):
        for c in children:
            if c.proc.returncode is None:
                c.proc.returncode = -15
            self.stopped.append(c.name)
        self.children = [c for c in self.children if c not in children]


class Clock:
    t = 0.0

    def __call__(self):
        return self.t


def make(max_restarts=2, size=1):
    procs, clock = FakeProcesses(), Clock()

    def spawn(group):
        ranks = [f"{group.name}/rank{r}" for r in range(group.size)] if group.size > 1 else [group.name]
        return [procs.start(name) for name in ranks]

    sup = Supervisor(procs, spawn, RestartPolicy(max_restarts, backoff_s=1.0, stable_s=60.0), clock)
    group = sup.add("a", Phase.DECODE, size)
    for child in group.children:
        sup.on_ready(M.Ready(child.name, child.proc.pid))
    assert group.state is RuntimeState.READY
    return sup, procs, clock, group


def kill(child: Child, code: int = -9) -> None:
    child.proc.returncode = code


def test_a_death_backs_off_doubling_then_the_llm_fails():
    sup, procs, clock, group = make(max_restarts=2)
    kill(group.children[0])
    [event] = sup.check()
    assert isinstance(event, Lost) and group.state is RuntimeState.BACKOFF and group.restart_at == 1.0
    assert sup.next_restart_in() == 1.0
    clock.t = 0.99
    assert sup.check() == [] and group.state is RuntimeState.BACKOFF
    clock.t = 1.0
    assert sup.check() == [] and group.state is RuntimeState.STARTING and group.starts == 2
    child = group.children[0]
    assert sup.on_ready(M.Ready(child.name, child.proc.pid)) == Restored(group)
    clock.t = 10.0  # dies again before 60 s of service: the second restart in a row, after 2 s
    kill(child)
    sup.on_failure(M.Failure("a/decode", "RuntimeError: boom"))
    [event] = sup.check()
    assert isinstance(event, Lost) and group.restarts == 2 and group.restart_at == 12.0
    clock.t = 12.0
    sup.check()
    kill(group.children[0], 1)  # the third death in a row, before it was even ready
    [event] = sup.check()
    assert isinstance(event, Failed) and group.state is RuntimeState.FAILED
    assert event.message == ("LLM 'a' failed: runtime a/decode exited with code 1; "
                             "2 restarts did not bring it back")


def test_a_group_that_served_long_enough_counts_again_from_zero():
    sup, procs, clock, group = make(max_restarts=1)
    clock.t = 100.0
    kill(group.children[0])
    assert isinstance(sup.check()[0], Lost)
    clock.t = 101.0
    sup.check()
    child = group.children[0]
    sup.on_ready(M.Ready(child.name, child.proc.pid))
    clock.t = 170.0  # 69 s of service since it was back
    kill(child)
    [event] = sup.check()
    assert isinstance(event, Lost) and group.restarts == 1


def test_one_dead_rank_stops_and_restarts_the_whole_group_and_stale_ready_is_ignored():
    sup, procs, clock, group = make(max_restarts=1, size=2)
    rank0, rank1 = group.children
    kill(rank1)
    sup.on_failure(M.Failure("a/decode/rank0", "RuntimeError: gloo connection reset"))
    [event] = sup.check()
    assert isinstance(event, Lost)
    assert procs.stopped == ["a/decode/rank0", "a/decode/rank1"] and rank0.proc.returncode == -15
    clock.t = 1.0
    sup.check()
    new0, new1 = group.children
    assert {new0.proc.pid, new1.proc.pid}.isdisjoint({rank0.proc.pid, rank1.proc.pid})
    assert sup.on_ready(M.Ready("a/decode/rank0", rank0.proc.pid)) is None  # from the dead process
    assert sup.on_ready(M.Ready(new0.name, new0.proc.pid)) is None  # one rank of two
    assert sup.on_ready(M.Ready(new1.name, new1.proc.pid)) == Restored(group)
    kill(new0, 1)  # the old rank0's report does not follow it into the next death
    [event] = sup.check()
    assert event == Failed(group, "LLM 'a' failed: runtime a/decode/rank0 exited with code 1; "
                                  "1 restart did not bring it back")


def test_restarts_off_fail_at_the_first_death():
    sup, procs, clock, group = make(max_restarts=0)
    kill(group.children[0])
    [event] = sup.check()
    assert event == Failed(group, "LLM 'a' failed: runtime a/decode exited with code -9 (SIGKILL); runtimes are "
                                  "not restarted (--max-runtime-restarts 0)")
