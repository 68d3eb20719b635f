"""`python -m gemma4.train` (and `torchrun ... -m gemma4.train`): the finetune command."""

import sys

from .cli import main

sys.exit(main())
