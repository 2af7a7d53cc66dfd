"""``python -m jaxmp.diagnose``: the command's code is :mod:`jaxmp.cli.diagnose`."""

import sys

from jaxmp.cli.diagnose import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
