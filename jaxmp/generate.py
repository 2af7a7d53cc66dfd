"""``python -m jaxmp.generate``: the command's code is :mod:`jaxmp.cli.generate`."""

import sys

from jaxmp.cli.generate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
