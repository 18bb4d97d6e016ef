import sys

from lsbert.cli import main

sys.exit(main())
