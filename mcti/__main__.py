import sys

from mcti.cli import main

sys.exit(main())
