"""The sampling half of one round: prompts -> samples -> graded -> pairs + skips (pipeline/sampling.py).

    python -m jobs.sample --config configs/tiny-cpu.yaml [key=value ...] [--round N]
"""

import sys

from jobs.cli import entry

main = entry("sample")

if __name__ == "__main__":
    sys.exit(main())
