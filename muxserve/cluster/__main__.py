import sys

from muxserve.cluster.cli import main

sys.exit(main())
