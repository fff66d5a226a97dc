"""`python -m draw` is the `draw` command."""

import sys

from draw.cli import main

sys.exit(main())
