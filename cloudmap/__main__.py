"""``python -m cloudmap ...`` is the ``cloudmap`` command."""

import sys

from .cli import main

sys.exit(main())
