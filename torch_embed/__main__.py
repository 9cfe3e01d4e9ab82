"""``python -m torch_embed``: the ``torch-embed`` command (:mod:`torch_embed.cli`)."""

import sys

from torch_embed.cli import main

if __name__ == "__main__":
    sys.exit(main())
