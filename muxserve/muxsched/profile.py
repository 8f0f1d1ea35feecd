"""``python -m muxserve.muxsched.profile``: the original's command for ``muxserve.placement.profiler``."""

import sys

from muxserve.placement.profiler import main

if __name__ == "__main__":
    sys.exit(main())
