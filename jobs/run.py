"""The main job: iterative weighted preference rounds end to end (pipeline/round.py), resumable.
On a cluster: `ray job submit --working-dir . -- python -m jobs.run --config configs/<recipe>.yaml`.

    python -m jobs.run --config configs/tiny-cpu.yaml [key=value ...] [--fresh]
"""

import sys

from jobs.cli import entry

main = entry("run")

if __name__ == "__main__":
    sys.exit(main())
