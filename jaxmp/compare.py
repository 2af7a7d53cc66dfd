"""``python -m jaxmp.compare``: the command's code is :mod:`jaxmp.cli.compare`."""

import sys

from jaxmp.cli.compare import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
