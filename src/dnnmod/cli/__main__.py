"""``python -m dnnmod.cli``: the ``dnnmod`` command without its console script."""

import sys

from dnnmod.cli import main

sys.exit(main())
