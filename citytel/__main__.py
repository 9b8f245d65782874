import sys

from citytel.cli import main

sys.exit(main())
