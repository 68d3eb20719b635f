"""`python -m gemma4 ...`: the `gemma4` command; also what torchrun launches in every process
(`torchrun --nproc-per-node 2 -m gemma4 finetune ...`)."""

import sys

from .cli import main

sys.exit(main())
