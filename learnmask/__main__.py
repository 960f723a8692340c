"""``python -m learnmask`` (and ``torchrun ... -m learnmask``): the ``learnmask`` command."""
import sys

from learnmask.cli import main

sys.exit(main())
