import sys

from dpcore.cli import main

sys.exit(main())
