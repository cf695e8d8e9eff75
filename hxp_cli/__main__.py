"""`python -m hxp_cli`: the same as the `hxp` script."""

import sys

from hxp_cli import main

sys.exit(main())
