"""`python -m powersample.cli ...`, the same as the `powersample` command."""

import sys

from powersample.cli import main

sys.exit(main())
