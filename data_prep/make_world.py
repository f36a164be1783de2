"""Build the default synthetic world (no network): `python data_prep/make_world.py [--preset base]`.

The same as `muomni data world`; every flag of that command works here.
"""

import sys

from muomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "world", *sys.argv[1:]]))
