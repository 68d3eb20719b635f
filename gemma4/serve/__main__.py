"""`python -m gemma4.serve --model PATH ...` (the same as `gemma4 serve`)."""

import sys

from .cli import serve_cli

sys.exit(serve_cli(sys.argv[1:]))
