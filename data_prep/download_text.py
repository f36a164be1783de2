"""Download TinyStories and write text manifests: `python data_prep/download_text.py [--out data/tinystories]`.

Writes `<out>/text/{train,val,test}.jsonl` ({"text"}); resumable, each download capped under 5 GB.
Same as `muomni data real tinystories`.
"""

import sys

from muomni.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "real", "tinystories", *sys.argv[1:]]))
