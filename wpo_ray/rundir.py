"""The run directory (DESIGN §8): config, manifest of completed stages, per-round outputs.

The manifest is the only source of truth for what is done. Stage outputs are written under a
temporary name and renamed into place before the manifest records them, so a crash mid-stage
leaves at most a `*.tmp` directory that the next run deletes and redoes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .config import Config
from .failpoints import failpoint

MANIFEST = "manifest.json"


class RunDirError(RuntimeError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# Keys that may change between invocations of the same run without invalidating it.
_VOLATILE = ("ray",)


class RunDir:
    def __init__(self, cfg: Config, fresh: bool = False, log=print):
        self.cfg = cfg
        self.path = Path(cfg.run.dir).absolute()  # handed to actors, whose cwd differs
        self.log = log
        if fresh and self.path.exists():
            log(f"[run] --fresh: removing {self.path}")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = self._read_manifest()
        cfg_file = self.path / "config.yaml"
        current = cfg.model_dump(mode="json")
        if cfg_file.exists():
            saved = yaml.safe_load(cfg_file.read_text()) or {}
            diffs = _diff({k: v for k, v in saved.items() if k not in _VOLATILE},
                          {k: v for k, v in current.items() if k not in _VOLATILE})
            if diffs and self.manifest["stages"]:
                raise RunDirError(
                    f"run directory {self.path} was made with a different config:\n  "
                    + "\n  ".join(diffs)
                    + "\nUse the same config to resume, --fresh to start over, or another run.dir."
                )
            if diffs:
                # No stage was ever recorded (e.g. the first attempt stopped on bad input), so no
                # output depends on the old config: adopt the new one instead of refusing it.
                log(f"[run] {self.path}: no stage completed yet; replacing its config.yaml with the new "
                    "config:\n  " + "\n  ".join(diffs))
                atomic_write_text(cfg_file, cfg.to_yaml())
        else:
            atomic_write_text(cfg_file, cfg.to_yaml())
        # Leftovers of a stage that died mid-write are never mistaken for output.
        for tmp in self.path.glob("round-*/*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _read_manifest(self) -> dict:
        p = self.path / MANIFEST
        if not p.exists():
            return {"stages": {}}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{p} is not valid JSON ({e}); remove the run directory or use --fresh") from None

    def round_dir(self, r: int) -> Path:
        d = self.path / f"round-{r:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @staticmethod
    def key(r: int, stage: str) -> str:
        return f"round-{r:03d}/{stage}"

    def done(self, r: int, stage: str) -> Optional[dict]:
        return self.manifest["stages"].get(self.key(r, stage))

    def mark_done(self, r: int, stage: str, **info) -> None:
        info["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.manifest["stages"][self.key(r, stage)] = info
        atomic_write_text(self.path / MANIFEST, json.dumps(self.manifest, indent=2))

    def stage_output(self, r: int, name: str) -> tuple[Path, Path]:
        """(final, temporary) paths of a stage's output directory; the temp one starts empty."""
        final = self.round_dir(r) / name
        tmp = final.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if final.exists() and not self.done(r, name):
            shutil.rmtree(final)  # present but never recorded: incomplete by definition
        return final, tmp

    @staticmethod
    def commit(tmp: Path, final: Path) -> None:
        failpoint(f"driver.{final.name}.written")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        failpoint(f"driver.{final.name}.committed")
