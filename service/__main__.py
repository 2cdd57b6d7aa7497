"""`python -m service ...` is the `shardprop` command."""

import sys

from service.cli import main

sys.exit(main())
