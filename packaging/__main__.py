"""python -m omk_llm: the command line."""

import sys

from omk_llm import main

sys.exit(main())
