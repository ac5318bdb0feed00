import sys

from darec.cli import main

sys.exit(main())
