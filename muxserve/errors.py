"""The errors that report bad user input: one hierarchy, each message naming the file or flag and the value.

Command-line tools print an ``InputError`` as ``error: ...`` and exit with status 2, without a
traceback. Failures of running processes are not here: they belong to the part that runs them
(``instance.processes.ChildDied``, ``flexstore.FlexStoreError``, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class InputError(ValueError):
    """A user input (file, flag, value) that is missing or malformed; the message names it."""


class ConfigError(InputError):
    """A model_config (or a flag that shapes an instance) that cannot run."""


class WorkloadError(InputError):
    """A workload file that cannot be replayed."""


class ClusterError(InputError):
    """A placement that cannot run as a cluster, or a cluster command that cannot be carried out."""


def command_status(body: Callable[[], int]) -> int:
    """Run a command-line tool's ``body``: bad input (InputError) prints ``error: ...`` and gives status 2."""
    try:
        return body()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
