"""``python -m jaxmp.policy``: the command's code is :mod:`jaxmp.cli.policy`."""

import sys

from jaxmp.cli.policy import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
