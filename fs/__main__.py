"""`python -m fs` runs the sluice command."""

import sys

from .cli import main

sys.exit(main())
