"""``python -m poolwatch.cli``, as the tests and the demo run the commands."""

import sys

from poolwatch.cli import main

sys.exit(main())
