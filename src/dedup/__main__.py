"""`python -m dedup`: the `dedup` command."""

import sys

from dedup.cli.main import main

sys.exit(main())
