import sys

from stm_live.cli import main

sys.exit(main())
