import sys

from mvar_dist.cli import main

sys.exit(main())
