"""`python -m w8a8_jax` runs the command line."""

import sys

from w8a8_jax.cli import main

sys.exit(main())
