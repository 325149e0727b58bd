"""`python -m sidecar.emulator`: the same as `fip-sidecar emulate`."""

import sys

from .cli import main

sys.exit(main())
