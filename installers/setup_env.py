"""The installers' decisions, run as `python installers/setup_env.py SUBCOMMAND` (`--help` lists them).

run.sh, run.bat, test.sh and test.bat call this file. The code is the `setup` package beside it: the subcommands
are in setup/cli.py, each decision in its own module (setup/__init__.py lists them).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `setup` package beside this file, even under -P

from setup.cli import main

if __name__ == "__main__":
    sys.exit(main())
