"""SFT bootstrap of the built-in tiny policy (cached by config hash).

    python -m jobs.bootstrap --config configs/tiny-cpu.yaml [key=value ...] [--force]
"""

import sys

from jobs.cli import entry

main = entry("bootstrap")

if __name__ == "__main__":
    sys.exit(main())
