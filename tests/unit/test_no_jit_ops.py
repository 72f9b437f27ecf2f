"""DeepSpeed on CPU compiles nothing in a training call: the shm all-reduce op (used only by
inference) is skipped. (Torch's Adam instead of FusedAdam on CPU: tests/unit/test_config.py.)"""

from __future__ import annotations


def test_the_training_worker_keeps_deepspeed_from_building_its_shm_op():
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from actors.train_worker import skip_shm_comm_build

    skip_shm_comm_build()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None  # what DeepSpeed's TorchBackend calls when it starts

