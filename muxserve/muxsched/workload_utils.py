"""The original's workload generator command, which runs as written, as a script or a module::

    python muxserve/muxsched/workload_utils.py --dataset-source ShareGPT_V3_unfiltered_cleaned_split.json \\
        --workload_info_from_yaml True --output-file examples/basic/workload.json \\
        --model-yaml examples/basic/models.yaml
    python -m muxserve.muxsched.workload_utils --model-yaml examples/basic/models.yaml --output-file w.json

The generator itself is ``muxserve.workload`` (``cli.py``).
"""

import os
import sys

if __name__ == "__main__" and not __package__:
    # Run as a script: its own folder must not shadow the standard library (profile.py).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    try:
        import muxserve  # noqa: F401
    except ImportError:  # not installed: use the checkout this file is in
        sys.path.insert(0, os.path.dirname(os.path.dirname(_here)))

from muxserve.workload.cli import main

if __name__ == "__main__":
    sys.exit(main())
