"""``python -m gluonq.convert``: the same as the ``gluonq-convert`` script."""
import sys

from ..cli import main

sys.exit(main())
