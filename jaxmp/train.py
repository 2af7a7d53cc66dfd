"""``python -m jaxmp.train``: the command's code is :mod:`jaxmp.cli.train`."""

import sys

from jaxmp.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
