"""Train on a pairs directory, ours or a TRL-format preference dataset (pipeline/training.py).

    python -m jobs.train --config configs/tiny-cpu.yaml [key=value ...] --pairs DIR [--output DIR]
"""

import sys

from jobs.cli import entry

main = entry("train")

if __name__ == "__main__":
    sys.exit(main())
