"""``python -m muxserve.muxsched.placement``: the original's command for ``muxserve.placement``."""

import sys

from muxserve.placement.cli import main

if __name__ == "__main__":
    sys.exit(main())
