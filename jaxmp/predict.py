"""``python -m jaxmp.predict``: the command's code is :mod:`jaxmp.cli.predict`."""

import sys

from jaxmp.cli.predict import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
