import sys

from meterware.cli import main

sys.exit(main())
