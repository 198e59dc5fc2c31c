"""`python -m ddpm_plugin.cli` is the `ddpm` command."""

import sys

from . import main

sys.exit(main())
