"""`python -m costmodel ...` is the `costmodel` command."""

import sys

from costmodel.cli import main

sys.exit(main())
