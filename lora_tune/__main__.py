"""`python -m lora_tune` (and `accelerate launch -m lora_tune train ...`)."""

import sys

from lora_tune.cli import main

sys.exit(main())
