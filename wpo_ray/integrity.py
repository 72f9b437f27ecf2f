"""Checkpoints verified before they are loaded: a SHA-256 of every file, checked before any read.

A training checkpoint is written by every rank into its own directory, which Ray Train merges;
each rank adds `sha256-rank<NNN>.json` (its files and their digests), written last and renamed
into place. DeepSpeed's state, the bulk of a checkpoint, is hashed while it is written
(`HashingCheckpointEngine`); the smaller files (the HF policy, JSON state) are hashed once after
writing. Before a checkpoint is loaded (a resumed worker, a policy directory taken from a run, the
samplers' reload), `verify_checkpoint` refuses a missing, extra or changed file, naming it, before
anything is unpickled. DeepSpeed's optimizer state is still pickled (`torch.save`); the digests
are what make loading it safe against a tampered run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

MANIFEST_PREFIX = "sha256-rank"
_CHUNK = 1 << 20


class IntegrityError(RuntimeError):
    """A checkpoint file is missing, extra or changed since its manifest was written."""


def manifest_name(rank: int) -> str:
    return f"{MANIFEST_PREFIX}{rank:03d}.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


class HashingCheckpointEngine:
    """Wraps a DeepSpeed checkpoint engine: `save` hashes each file as torch writes it, `load`
    reads only files whose digest was verified first (`verified`)."""

    def __init__(self, inner):
        self.inner = inner
        self.written: dict[str, str] = {}  # absolute path -> sha256
        self.verified: dict[str, str] = {}

    def __getattr__(self, name):  # create / commit / makedirs / ... as DeepSpeed's own
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        import torch

        with open(path, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state_dict, writer)
        self.written[str(Path(path).absolute())] = writer.hash.hexdigest()

    def load(self, path: str, map_location=None):
        key = str(Path(path).absolute())
        if key not in self.verified:
            raise IntegrityError(f"{path}: not among the checkpoint files verified before loading; refusing to "
                                 "unpickle it")
        return self.inner.load(path, map_location=map_location)


def write_manifest(root: Path, rank: int, known: Optional[dict[str, str]] = None) -> Path:
    """Record every file under `root` that is not a manifest, with its digest (from `known`,
    absolute path -> sha256, when hashed while written; else read now). Written last, atomically."""
    root = Path(root)
    known = known or {}
    files = {}
    for p in sorted(x for x in root.rglob("*") if x.is_file()):
        rel = p.relative_to(root).as_posix()
        if p.name.startswith(MANIFEST_PREFIX):
            continue
        files[rel] = known.get(str(p.absolute())) or sha256_file(p)
    out = root / manifest_name(rank)
    tmp = root / f".{out.name}.tmp"
    tmp.write_text(json.dumps({"rank": rank, "files": files}, indent=0))
    os.replace(tmp, out)
    return out


def _manifests(root: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for m in sorted(root.glob(f"{MANIFEST_PREFIX}*.json")):
        try:
            entries = json.loads(m.read_text())["files"]
        except (ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{m}: unreadable checkpoint manifest ({e!r})") from None
        files.update(entries)
    return files


def has_manifest(root: Path) -> bool:
    return any(Path(root).glob(f"{MANIFEST_PREFIX}*.json"))


def verify_checkpoint(root: str | Path, under: str = "") -> dict[str, str]:
    """Check every file of the checkpoint at `root` (or only those below `under`, e.g. "policy")
    against its manifests; returns {absolute path: sha256} of the verified files.

    Refused, naming the file: a file the manifests list that is missing or changed, a file present
    that no manifest lists, or no manifest at all.
    """
    root = Path(root).absolute()
    if not has_manifest(root):
        raise IntegrityError(f"{root}: no checkpoint manifest ({MANIFEST_PREFIX}NNN.json); it was not written by "
                             "this project's trainer, or it is incomplete; refusing to load it")
    expected = {k: v for k, v in _manifests(root).items() if not under or k.startswith(under.rstrip("/") + "/")}
    base = root / under if under else root
    present = {p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()
               and not (p.parent == root and p.name.startswith(MANIFEST_PREFIX))}
    extra = sorted(present - set(expected))
    if extra:
        raise IntegrityError(f"{root / extra[0]}: a file no checkpoint manifest lists ({len(extra)} such); "
                             "refusing to load the checkpoint")
    missing = sorted(set(expected) - present)
    if missing:
        raise IntegrityError(f"{root / missing[0]}: listed in the checkpoint manifest but missing "
                             f"({len(missing)} such); refusing to load the checkpoint")
    verified = {}
    for rel in sorted(expected):
        digest = sha256_file(root / rel)
        if digest != expected[rel]:
            raise IntegrityError(f"{root / rel}: SHA-256 differs from the checkpoint manifest (changed since it was "
                                 "written); refusing to load the checkpoint")
        verified[str(root / rel)] = digest
    return verified


def check_rank_manifests(root: str | Path, world_size: int) -> None:
    """Every rank that wrote the checkpoint left its manifest (a rank's files and manifest cannot
    be removed together unnoticed)."""
    found = len(list(Path(root).glob(f"{MANIFEST_PREFIX}*.json")))
    if found != world_size:
        raise IntegrityError(f"{root}: {found} rank manifest(s) for a checkpoint written by {world_size} rank(s); "
                             "refusing to load it")


def verify_policy_dir(policy: str | Path) -> None:
    """A policy directory inside one of our checkpoints (`…/checkpoint/policy`) is verified
    against that checkpoint's manifests before it is loaded; any other directory (a user's model,
    the bootstrap cache) has none and is taken as it is."""
    policy = Path(policy).absolute()
    if has_manifest(policy.parent):
        verify_checkpoint(policy.parent, under=policy.name)
