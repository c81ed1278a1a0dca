"""`python -m wan_local` == the `wan-local` command."""

import sys

from wan_local.cli import main

sys.exit(main())
