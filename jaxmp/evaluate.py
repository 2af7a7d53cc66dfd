"""``python -m jaxmp.evaluate``: the command's code is :mod:`jaxmp.cli.evaluate`."""

import sys

from jaxmp.cli.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
