"""``python -m lsbert.trainer ...`` = ``lsbert train ...``."""

import sys

from lsbert.trainer.main import main

sys.exit(main())
