"""Entry point: ``python -m cloudmap.node NODE_ROOT_DIR`` (see cloudmap.node.agent)."""

import sys

from .agent import main

sys.exit(main())
