import sys

from fastpeft.tools.cli import main

sys.exit(main())
