"""`python -m lmforge` (what torchrun launches) is the `lmforge` command."""

import sys

from lmforge.cli import main

sys.exit(main())
