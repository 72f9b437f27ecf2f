"""Screenshot a run's report.html with headless Chromium, to look at it without a browser.

    python bench/screenshot_report.py <run_dir> <out.png> [--rebuild]

Writes the report first when <run_dir>/report.html does not exist (or with --rebuild).
Needs Chromium: apt-get install -y chromium.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def screenshot(html: Path, out: Path, size: str = "1200,2000", timeout: float = 120) -> Path:
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not exe:
        raise FileNotFoundError("install chromium: apt-get install -y chromium")
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
               f"--window-size={size}", Path(html).absolute().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"chromium failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("out_png")
    ap.add_argument("--rebuild", action="store_true", help="rewrite report.html first")
    ap.add_argument("--size", default="1200,2000", help="window size W,H (default 1200,2000)")
    args = ap.parse_args(argv)
    html = Path(args.run_dir) / "report.html"
    if args.rebuild or not html.exists():
        from wpo_ray.report import write_report

        html = write_report(args.run_dir)
    print(screenshot(html, Path(args.out_png), size=args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
