"""``python -m ncp.cache``: build or check a latent cache. The cache lives in :mod:`ncp.data.cache`."""
from __future__ import annotations

import sys

from ncp.data.cache import main

if __name__ == "__main__":
    sys.exit(main())
