import sys

from ctbridge.cli import main

sys.exit(main())
