"""`claim_work_dir`: Ray Train state left in a work directory by another job is never resumed."""

from __future__ import annotations

import pytest

from pipeline.training import claim_work_dir
from tests.conftest import ROOT
from wpo_ray.config import load_config
from wpo_ray.rundir import RunDirError


def test_another_jobs_ray_train_state_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml")
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(b"x" * 10)
    work = tmp_path / "train"
    claim_work_dir(work, cfg, "/p", "/p", [pairs])
    (work / "ray_train").mkdir()
    claim_work_dir(work, cfg, "/p", "/p", [pairs])  # the same job resumes
    claim_work_dir(work, load_config(ROOT / "configs" / "tiny-cpu.yaml", ["ray.num_cpus=2", "run.dir=x"]),
                   "/p", "/p", [pairs])  # where it runs may change
    with pytest.raises(RunDirError, match=r"holds the training state of another job \(different config\)"):
        claim_work_dir(work, load_config(ROOT / "configs" / "tiny-cpu.yaml", ["train.lr=0.5"]), "/p", "/p", [pairs])
    with pytest.raises(RunDirError, match=r"different policy, reference"):
        claim_work_dir(work, cfg, "/q", "/q", [pairs])
    pairs.write_bytes(b"x" * 11)
    with pytest.raises(RunDirError, match=r"different pairs"):
        claim_work_dir(work, cfg, "/p", "/p", [pairs])
    # Without Ray Train state there is nothing to resume: a new job takes the directory over.
    (work / "ray_train").rmdir()
    claim_work_dir(work, cfg, "/q", "/q", [pairs])
