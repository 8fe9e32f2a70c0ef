"""`python -m dtrain ...`: what torchrun and launch/torchrun.sh run on every worker."""

import sys

from dtrain.entry import main

sys.exit(main())
