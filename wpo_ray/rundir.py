"""The run directory: its layout, the manifest of completed stages, and the stage protocol.

    <run.dir>/
      config.yaml  manifest.json  run.log  report.html  report/
      round-000/eval.json                                  (the initial policy)
      round-NNN/prompts/ samples/ graded/ pairs/ skips/    (Parquet, the Arrow contracts)
               train/ (Ray Train state, metrics.jsonl)  checkpoint/ (policy/; deepspeed/ if the optimizer
               state carries over)  eval.json

Every path of that layout comes from `RunLayout`; nothing else spells `round-{r:03d}`. The
manifest is the only source of truth for what is done. `RunDir.stage` is the one way a stage
writes: it skips a recorded stage, hands out temporary outputs, renames them into place and only
then records the stage, so a crash mid-stage leaves at most a `*.tmp` that the next run deletes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from .config import Config
from .failpoints import failpoint

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"

# A training checkpoint (a round's checkpoint/, or a Ray Train checkpoint):
POLICY_DIR = "policy"  # HF save_pretrained, safetensors: what vLLM and transformers load
DS_DIR = "deepspeed"  # DeepSpeed engine state, for exact resume
STATE_FILE = "trainer_state.json"  # micro/optimizer steps, γ-PO queue
METRICS_FILE = "metrics.jsonl"  # one JSON line per optimizer step


def ledger_file(rank: int) -> str:
    """The pair ids a rank has applied, in order (exactly-once resume)."""
    return f"pairs-applied-rank{rank:03d}.json"


def gamma_po_file(rank: int) -> str:
    """A rank's γ-PO gap queue (each rank keeps and restores its own; with the gather they agree)."""
    return f"gamma-po-queue-rank{rank:03d}.json"


def checkpoint_has_policy(path: Path) -> bool:
    p = Path(path) / POLICY_DIR
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


class RunDirError(RuntimeError):
    pass


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def temp_path(final: Path) -> Path:
    """Where an output is written before it is renamed to `final` (emptied first)."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    tmp.unlink(missing_ok=True)
    return tmp


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished temporary output into place, replacing what was there."""
    failpoint(f"driver.{final.name}.written")
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    failpoint(f"driver.{final.name}.committed")


class RunLayout:
    """Paths of a run directory; needs no config, so the report can read any run."""

    REPORT_ASSETS = "report"  # the report's PNGs, referenced relatively from report.html

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()  # handed to actors, whose cwd differs

    @staticmethod
    def round_name(r: int) -> str:
        return f"round-{r:03d}"

    def round_dir(self, r: int) -> Path:
        return self.path / self.round_name(r)

    def output(self, r: int, name: str) -> Path:
        """A stage output of round r: `prompts`, `samples`, `graded`, `pairs`, `skips`, `checkpoint`,
        `eval.json`."""
        return self.round_dir(r) / name

    def train_dir(self, r: int) -> Path:
        """Ray Train's working state and the step metrics of round r's training."""
        return self.round_dir(r) / "train"

    @property
    def trainers_dir(self) -> Path:
        """Ray Train's state of the run's trainer group (`run.trainers: persistent`), every round's."""
        return self.path / "trainers"

    @property
    def train_verb_dir(self) -> Path:
        """Where `wpo-ray train --pairs` (outside any round) keeps its state and checkpoint."""
        return self.path / "train"

    def metrics_file(self, r: int) -> Path:
        return self.train_dir(r) / METRICS_FILE

    def policy_dir(self, r: int) -> Path:
        """The HF policy round r trained (what round r + 1 samples)."""
        return self.output(r, "checkpoint") / POLICY_DIR

    @property
    def manifest_file(self) -> Path:
        return self.path / MANIFEST

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def log_file(self) -> Path:
        return self.path / "run.log"

    @property
    def report_file(self) -> Path:
        return self.path / "report.html"

    @property
    def report_assets(self) -> Path:
        return self.path / self.REPORT_ASSETS

    def rounds_on_disk(self) -> set[int]:
        found = set()
        for p in self.path.glob("round-*"):
            num = p.name.removeprefix("round-")
            if p.is_dir() and num.isdigit():
                found.add(int(num))
        return found

    @staticmethod
    def key(r: int, stage: str) -> str:
        return f"{RunLayout.round_name(r)}/{stage}"

    @staticmethod
    def parse_key(key: str) -> Optional[tuple[int, str]]:
        """(round, stage) of a manifest key, or None if it is not one."""
        head, _, stage = key.partition("/")
        num = head.removeprefix("round-")
        return (int(num), stage) if head.startswith("round-") and num.isdigit() and stage else None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# Keys that may change between invocations of the same run without invalidating it.
_VOLATILE = ("ray",)


class RunDir(RunLayout):
    """A run directory opened for writing with its config: refuses another config once a stage
    is recorded, and runs stages under the manifest."""

    def __init__(self, cfg: Config, fresh: bool = False):
        super().__init__(cfg.run.dir)
        self.cfg = cfg
        if fresh and self.path.exists():
            log.info("[run] --fresh: removing %s", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.manifest = self._read_manifest()
        self._manifest_lock = threading.Lock()
        current = cfg.model_dump(mode="json")
        if self.config_file.exists():
            saved = yaml.safe_load(self.config_file.read_text()) or {}
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
                log.info("[run] %s: no stage completed yet; replacing its config.yaml with the new config:\n  %s",
                         self.path, "\n  ".join(diffs))
                atomic_write_text(self.config_file, cfg.to_yaml())
        else:
            atomic_write_text(self.config_file, cfg.to_yaml())
        # Leftovers of a stage that died mid-write are never mistaken for output.
        for tmp in self.path.glob("round-*/*.tmp"):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()

    def _read_manifest(self) -> dict:
        p = self.manifest_file
        if not p.exists():
            return {"stages": {}}
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{p} is not valid JSON ({e}); remove the run directory or use --fresh") from None

    def done(self, r: int, stage: str) -> Optional[dict]:
        """What the manifest recorded for the stage, or None if it is not done."""
        return self.manifest["stages"].get(self.key(r, stage))

    def mark_done(self, r: int, stage: str, **info) -> None:
        info["completed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        with self._manifest_lock:  # a round's evaluation may finish while the next round records a stage
            self.manifest["stages"][self.key(r, stage)] = info
            atomic_write_text(self.manifest_file, json.dumps(self.manifest, indent=2))

    def stage(self, r: int, name: str, produce: Callable[[Callable[[str], Path]], dict],
              outputs: tuple[str, ...] | None = None) -> dict:
        """Run stage `name` of round r once; return what the manifest records for it.

        Recorded already: nothing runs. Otherwise `produce(out)` writes each of the stage's
        `outputs` (default: one named like the stage) at the temporary path `out(output)` and
        returns the stage's record; then every output is renamed into place and the stage is
        recorded. Outputs present on disk but not recorded are incomplete by definition and are
        removed first.
        """
        info = self.done(r, name)
        if info is not None:
            log.info("[round %d] %s: already done", r, name)
            return info
        outputs = outputs or (name,)
        self.round_dir(r).mkdir(parents=True, exist_ok=True)
        finals = {o: self.output(r, o) for o in outputs}
        for final in finals.values():
            if final.is_dir():
                shutil.rmtree(final)
            final.unlink(missing_ok=True)
        temps = {o: temp_path(f) for o, f in finals.items()}
        t0 = time.time()
        info = produce(temps.__getitem__)
        info.setdefault("seconds", round(time.time() - t0, 1))
        # When it ran (Unix seconds): stages of consecutive rounds can overlap (eval.overlap).
        info["started_unix"], info["ended_unix"] = round(t0, 2), round(time.time(), 2)
        for o in outputs:
            commit(temps[o], finals[o])
        self.mark_done(r, name, **info)
        log.info("[round %d] %s: done in %.1fs%s", r, name, info["seconds"],
                 "".join(f", {k} {info[k]}" for k in ("rows", "pairs", "skips", "steps") if k in info))
        return self.done(r, name)
