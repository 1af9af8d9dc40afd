"""``python -m dynamic_s2``: the ``dynamic-s2`` command (see :mod:`dynamic_s2.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
