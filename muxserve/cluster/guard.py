"""``python -m muxserve.cluster.guard PARENT_PID -- COMMAND...``: run COMMAND so that it is
SIGKILLed when PARENT_PID dies (Linux ``PR_SET_PDEATHSIG``, kept across exec).

Set in the child rather than with Popen's ``preexec_fn``, which is unsafe in a threaded parent
such as a Ray worker. The command also gets the default signal handling back."""

from __future__ import annotations

import os
import signal
import sys

from muxserve.ipc.process import exit_with_parent


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        print("usage: python -m muxserve.cluster.guard PARENT_PID -- COMMAND...", file=sys.stderr)
        sys.exit(2)
    parent, command = int(sys.argv[1]), sys.argv[3:]
    # A Ray worker ignores SIGINT (and may block signals in its threads); both are inherited
    # across exec, so an instance would not stop on Ctrl-C: give it the defaults back.
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    exit_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
