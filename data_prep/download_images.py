"""Download an image-caption corpus and write image manifests.

    python data_prep/download_images.py coco [--out data/coco]          # COCO 2017 val images + captions
    python data_prep/download_images.py flickr8k [--out data/flickr8k]

Writes `<out>/images/{train,val,test}.jsonl`; resumable, each download capped under 5 GB.
Same as `muomni data real coco|flickr8k`.
"""

import sys

from muomni.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("coco", "flickr8k"):
        sys.exit("usage: download_images.py {coco,flickr8k} [--out DIR] [--root DIR] [--no-download] [--max-gb G]")
    sys.exit(main(["data", "real", *sys.argv[1:]]))
