"""Greedy accuracy and maj@N of a policy on the test split (pipeline/evaluation.py).

    python -m jobs.evaluate --config configs/tiny-cpu.yaml [key=value ...] [--model DIR]
"""

import sys

from jobs.cli import entry

main = entry("eval")

if __name__ == "__main__":
    sys.exit(main())
