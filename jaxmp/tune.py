"""``python -m jaxmp.tune``: the command's code is :mod:`jaxmp.cli.tune`."""

import sys

from jaxmp.cli.tune import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
