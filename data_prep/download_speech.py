"""Download a speech corpus and write speech manifests.

    python data_prep/download_speech.py librispeech [--out data/librispeech]   # dev-clean, test-clean, train-clean-100*
    python data_prep/download_speech.py ljspeech [--out data/ljspeech]

*train-clean-100 is 6.3 GB: only its first `--max-gb` (default 4.99) GB are fetched, giving a subset of
its speakers. Writes `<out>/speech/{train,val,test}.jsonl`; resumable, SHA-256 checked where published.
Same as `muomni data real librispeech|ljspeech`.
"""

import sys

from muomni.cli import main

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("librispeech", "ljspeech"):
        sys.exit("usage: download_speech.py {librispeech,ljspeech} [--out DIR] [--root DIR] [--no-download] [--max-gb G]")
    sys.exit(main(["data", "real", *sys.argv[1:]]))
