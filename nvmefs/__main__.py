"""`python -m nvmefs`: the nvmefs command."""

import sys

from nvmefs.cli import main

sys.exit(main())
