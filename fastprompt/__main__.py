"""`python -m fastprompt ...` (also what torchrun launches): the same as the `fastprompt` command."""
import sys

from .cli import main

sys.exit(main())
