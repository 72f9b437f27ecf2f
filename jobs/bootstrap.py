"""SFT bootstrap of the built-in tiny policy (cached by config hash).

    python -m jobs.bootstrap --config configs/tiny-cpu.yaml [key=value ...] [--force]
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from wpo_ray.cli import main as cli_main

    return cli_main(["bootstrap", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
