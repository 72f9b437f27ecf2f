"""Checkpoints are verified before they are loaded: a changed, extra or missing file is refused
naming it, and nothing is unpickled first (the resume path of the training worker included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wpo_ray.integrity import (
    HashingCheckpointEngine,
    IntegrityError,
    verify_checkpoint,
    verify_policy_dir,
    write_manifest,
)


class _TorchEngine:
    """DeepSpeed's TorchCheckpointEngine, as far as the wrapper uses it."""

    def load(self, path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    def makedirs(self, path, exist_ok=False):
        Path(path).mkdir(parents=True, exist_ok=exist_ok)


def _checkpoint(root: Path, world: int = 2, engine_state: bool = True) -> Path:
    """A checkpoint as the training workers write it: per rank a DeepSpeed shard hashed while
    written (without `engine_state`: none, as in a round's final checkpoint when the optimizer
    restarts), a ledger, then the rank's manifest; rank 0 adds the state and the HF policy."""
    for rank in range(world):
        part = root / f"part{rank}"  # each rank writes its own directory; Ray Train merges them
        part.mkdir(parents=True)
        engine = HashingCheckpointEngine(_TorchEngine())
        if engine_state:
            engine.makedirs(part / "deepspeed" / "ds", exist_ok=True)
            engine.save({"w": torch.full((4,), float(rank))}, str(part / "deepspeed" / "ds" / f"zero_rank{rank}.pt"))
        (part / f"pairs-applied-rank{rank:03d}.json").write_text(json.dumps([f"p{rank}"]))
        if rank == 0:
            (part / "trainer_state.json").write_text(json.dumps({"round": 1, "micro_steps": 2, "optimizer_steps": 1,
                                                                 "world_size": world, "final": True}))
            (part / "policy").mkdir()
            (part / "policy" / "config.json").write_text("{}")
            (part / "policy" / "model.safetensors").write_bytes(b"weights")
        write_manifest(part, rank, engine.written)
    ckpt = root / "checkpoint"
    ckpt.mkdir()
    for rank in range(world):
        for p in sorted((root / f"part{rank}").rglob("*")):
            dest = ckpt / p.relative_to(root / f"part{rank}")
            if p.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
            else:
                dest.write_bytes(p.read_bytes())
    return ckpt


def test_hashing_while_writing_gives_the_file_s_digest(tmp_path):
    import hashlib

    engine = HashingCheckpointEngine(_TorchEngine())
    path = tmp_path / "x.pt"
    engine.save({"a": torch.arange(5)}, str(path))
    assert engine.written[str(path)] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_intact_checkpoint_verifies_every_file(tmp_path):
    ckpt = _checkpoint(tmp_path)
    verified = verify_checkpoint(ckpt)
    assert {Path(p).relative_to(ckpt).as_posix() for p in verified} == {
        "deepspeed/ds/zero_rank0.pt", "deepspeed/ds/zero_rank1.pt", "pairs-applied-rank000.json",
        "pairs-applied-rank001.json", "trainer_state.json", "policy/config.json", "policy/model.safetensors"}
    verify_policy_dir(ckpt / "policy")


@pytest.mark.parametrize("damage, named, why", [
    ("flip", "deepspeed/ds/zero_rank1.pt", "SHA-256 differs"),
    ("add", "deepspeed/ds/evil.pt", "no checkpoint manifest lists"),
    ("remove", "pairs-applied-rank000.json", "missing"),
    ("flip-policy", "policy/model.safetensors", "SHA-256 differs"),
    ("add-policy", "policy/pytorch_model.bin", "no checkpoint manifest lists"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, named, why):
    ckpt = _checkpoint(tmp_path)
    target = ckpt / named
    if damage.startswith("flip"):
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01  # one byte
        target.write_bytes(bytes(data))
    elif damage.startswith("add"):
        target.write_bytes(b"not in any manifest")
    else:
        target.unlink()
    with pytest.raises(IntegrityError, match=why) as e:
        verify_checkpoint(ckpt)
    assert str(target) in str(e.value)
    if "policy" in damage:  # the samplers' and the trainers' check of a policy directory
        with pytest.raises(IntegrityError, match=why):
            verify_policy_dir(ckpt / "policy")


def test_a_checkpoint_without_manifest_is_refused_but_a_plain_model_dir_is_not_checked(tmp_path):
    (tmp_path / "ckpt" / "deepspeed").mkdir(parents=True)
    (tmp_path / "ckpt" / "deepspeed" / "x.pt").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="no checkpoint manifest"):
        verify_checkpoint(tmp_path / "ckpt")
    (tmp_path / "model").mkdir()
    verify_policy_dir(tmp_path / "model")  # a user's HF directory (nothing to check it against)


def _round(index: int):
    """A staged round (fixed shards) with that index, as the feed hands it to a worker."""
    from actors.train_worker import Round

    return Round(index=index, policy_path="", reference_path="", total_steps=1, shards=[])


def test_resume_refuses_a_tampered_shard_before_anything_is_unpickled(tmp_path, monkeypatch):
    """The training worker's resume path on a checkpoint with one flipped byte, and with one added
    file: refused naming the file; torch.load (every unpickling load goes through it) never runs."""
    import ray.train

    from actors.train_worker import _restore

    def no_unpickling(*a, **kw):
        raise AssertionError("torch.load reached before the checkpoint was verified")

    class Engine:  # the DeepSpeed engine's side of a resume
        checkpoint_engine = HashingCheckpointEngine(_TorchEngine())

        def load_checkpoint(self, path, tag):
            self.checkpoint_engine.load(str(Path(path) / tag / "zero_rank0.pt"))

    ckpt = _checkpoint(tmp_path / "flip")
    shard = ckpt / "deepspeed" / "ds" / "zero_rank0.pt"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x80
    shard.write_bytes(bytes(data))
    added = _checkpoint(tmp_path / "add")
    (added / "deepspeed" / "ds" / "extra.pt").write_bytes(b"\x80\x04")
    monkeypatch.setattr(torch, "load", no_unpickling)
    for d, named in ((ckpt, shard), (added, added / "deepspeed" / "ds" / "extra.pt")):
        with pytest.raises(IntegrityError) as e:
            _restore(Engine(), None, 0, ray.train.Checkpoint.from_directory(str(d)), _round(1))
        assert str(named) in str(e.value)

    # Intact, the same path verifies, then loads through the verified set.
    monkeypatch.undo()
    intact = _checkpoint(tmp_path / "ok")
    progress = _restore(Engine(), None, 0, ray.train.Checkpoint.from_directory(str(intact)), _round(1))
    assert progress.step == 1 and progress.applied == ["p0"] and progress.final

    # A (re)started worker of the trainer group pending round 2 does not resume round 1's state:
    # it starts round 2 from round 2's starting policy.
    class NoLoad(Engine):
        def load_checkpoint(self, path, tag):
            raise AssertionError("round 1's state loaded into round 2")

    fresh = _restore(NoLoad(), None, 0, ray.train.Checkpoint.from_directory(str(intact)), _round(2))
    assert (fresh.step, fresh.micro_done, fresh.applied, fresh.final) == (0, 0, [], False)


def test_a_final_checkpoint_without_engine_state_marks_the_round_trained_and_a_streamed_round_resumes_none(
        tmp_path):
    import ray.train

    from actors.train_worker import _restore

    class NoLoad:
        def load_checkpoint(self, *a, **kw):
            raise AssertionError("DeepSpeed state loaded")

    final = ray.train.Checkpoint.from_directory(str(_checkpoint(tmp_path / "a", engine_state=False)))
    progress = _restore(NoLoad(), None, 0, final, _round(1))
    assert progress.final and progress.stale and progress.step == 0  # trained; the engine must be built again
    # A streamed round (no fixed shards) is trained again from its start, whatever its checkpoint holds.
    streamed = _round(1)
    streamed.shards = None
    with_state = ray.train.Checkpoint.from_directory(str(_checkpoint(tmp_path / "b")))
    progress = _restore(NoLoad(), None, 0, with_state, streamed)
    assert (progress.final, progress.stale, progress.micro_done) == (False, False, 0)


def test_a_rank_s_files_and_manifest_removed_together_are_noticed(tmp_path):
    import ray.train

    from actors.train_worker import _restore

    ckpt = _checkpoint(tmp_path)
    for rel in ("deepspeed/ds/zero_rank1.pt", "pairs-applied-rank001.json", "sha256-rank001.json"):
        (ckpt / rel).unlink()
    with pytest.raises(IntegrityError, match="1 rank manifest"):
        _restore(object(), None, 0, ray.train.Checkpoint.from_directory(str(ckpt)), _round(1))


def test_the_wrapper_refuses_to_load_an_unverified_file(tmp_path):
    engine = HashingCheckpointEngine(_TorchEngine())
    engine.save({"a": 1}, str(tmp_path / "a.pt"))
    with pytest.raises(IntegrityError, match="not among the checkpoint files verified"):
        engine.load(str(tmp_path / "a.pt"))
