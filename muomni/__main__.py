import sys

from muomni.cli import main

sys.exit(main())
