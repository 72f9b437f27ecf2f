"""Training half on the real stack: Ray Train + DeepSpeed (ZeRO-2 / ZeRO-3, gloo on CPU) + Ray Data pairs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def zero2_run(ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs, tmp_path_factory):
    from pipeline.training import run_training

    cfg = tiny_cfg_factory("train.epochs=3", "train.deepspeed.zero_stage=2", "train.lr=0.002", "train.loss.base=dpo")
    out = tmp_path_factory.mktemp("zero2")
    info = run_training(cfg, arithmetic_pairs, out / "checkpoint", tiny_policy, tiny_policy, out)
    return cfg, out, info


def test_zero2_loss_goes_down_and_starts_at_ln2(zero2_run):
    cfg, out, info = zero2_run
    m = _metrics(out / "metrics.jsonl")
    # 48 pairs / (2 workers x 4) = 6 steps per epoch, 3 epochs.
    assert info["steps"] == 18 and len(m) == 18 and [x["step"] for x in m] == list(range(1, 19))
    # Policy = reference before the first update: every margin is 0, the DPO loss is ln 2.
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    first, last = sum(x["loss"] for x in m[:3]) / 3, sum(x["loss"] for x in m[-3:]) / 3
    assert last < first - 0.05, (first, last)
    assert m[-1]["rewards/accuracy"] > 0.5
    assert all(x["tokens_per_s"] > 0 for x in m)
    # The lr each step applied: warm-up, then linear decay to a last step that still trains.
    from wpo_ray.train_plan import lr_factor

    assert [x["lr"] for x in m] == pytest.approx([cfg.train.lr * lr_factor(s, cfg.train.warmup_steps, 18)
                                                  for s in range(1, 19)])
    assert m[-1]["lr"] > 0
    # The optimizer restarts every round (train.optimizer_state=restart): the final checkpoint holds none.
    assert not (out / "checkpoint" / "deepspeed").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard events written"


def _ledger(ckpt):
    from wpo_ray.rundir import ledger_file

    return [json.loads((ckpt / ledger_file(r)).read_text()) for r in range(2)]


def _weights(policy_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(policy_dir) / "model.safetensors"))


def _max_diff(a_dir, b_dir, start_dir) -> tuple[float, float]:
    """(largest weight difference of a and b, largest move of b from start)."""
    a, b, start = (_weights(d) for d in (a_dir, b_dir, start_dir))
    assert a.keys() == b.keys()
    return (max((a[k] - b[k]).abs().max().item() for k in a), max((b[k] - start[k]).abs().max().item() for k in a))


def test_a_trainer_group_trains_round_two_like_a_fresh_trainer_and_resumes_a_killed_worker_exactly_once(
        zero2_run, tiny_cfg_factory, tiny_policy, arithmetic_pairs, failpoints, tmp_path):
    """One trainer group, two rounds. Round 1 gives the one-off trainer's weights (zero2_run, same
    config); a worker is SIGKILLed right after its final checkpoint is reported, so the restarted
    group finds round 1 trained in a checkpoint that holds its policy but no engine state, and
    builds its engines again on that policy for round 2. In round 2 a worker is SIGKILLed at
    micro-batch 9 of 18; Ray Train restarts the group, which restores round 2's step-8 checkpoint.
    Round 2 then ends with the weights, steps, loss curve and pairs, in order, of a fresh one-off
    trainer started on round 1's policy: the optimizer state and LR schedule restart each round,
    and the killed round is trained once.
    """
    from pipeline.training import TrainerGroup, run_training
    from wpo_ray.failpoints import arm, fired

    _, out0, _ = zero2_run
    cfg = tiny_cfg_factory("train.epochs=3", "train.deepspeed.zero_stage=2", "train.lr=0.002", "train.loss.base=dpo",
                           "train.checkpoint_every=4", "train.max_failures=2")
    r1, r2 = tmp_path / "round-001", tmp_path / "round-002"
    group = TrainerGroup(cfg, tmp_path / "trainers")
    try:
        # Round 1's final checkpoint is reported, the round not yet marked done; the pause lets Ray
        # Train take the report in before the worker dies, so that the restart finds it.
        arm(failpoints, "train.round_reported", action="kill:5")
        info1 = run_training(cfg, arithmetic_pairs, r1 / "checkpoint", tiny_policy, tiny_policy, r1, group=group,
                             round_idx=1)
        assert fired(failpoints, "train.round_reported"), "the failpoint never fired: nothing was tested"
        assert info1.get("found_trained"), info1
        arm(failpoints, "train.micro_step", hit=9)  # the first rank to reach round 2's micro-batch 9 dies
        info = run_training(cfg, arithmetic_pairs, r2 / "checkpoint", str(r1 / "checkpoint" / "policy"), tiny_policy,
                            r2, group=group, round_idx=2)
    finally:
        group.close()
    assert fired(failpoints, "train.micro_step"), "the failpoint never fired: nothing was tested"
    diff, moved = _max_diff(r1 / "checkpoint" / "policy", out0 / "checkpoint" / "policy", tiny_policy)
    assert moved > 1e-3 and diff <= 1e-6 * moved, (diff, moved)

    fresh = tmp_path / "fresh"
    run_training(cfg, arithmetic_pairs, fresh / "checkpoint", str(r1 / "checkpoint" / "policy"), tiny_policy, fresh)
    m, m0 = _metrics(r2 / "metrics.jsonl"), _metrics(fresh / "metrics.jsonl")
    assert info["steps"] == 18 and [x["step"] for x in m] == list(range(1, 19))
    ledger = _ledger(r2 / "checkpoint")
    assert [len(x) for x in ledger] == [72, 72]  # 18 steps x 4 pairs per rank
    ids = sorted(i for x in ledger for i in x)
    assert ids == sorted(i for i in {*ids} for _ in range(3))  # every pair exactly once per epoch
    assert ledger == _ledger(fresh / "checkpoint")
    assert [x["lr"] for x in m] == pytest.approx([x["lr"] for x in m0], rel=1e-12)  # the schedule restarted
    diff, moved = _max_diff(r2 / "checkpoint" / "policy", fresh / "checkpoint" / "policy", r1 / "checkpoint" / "policy")
    assert moved > 1e-3 and diff <= 1e-6 * moved, (diff, moved)
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in m0], rel=1e-6)


def test_carried_optimizer_state_survives_a_worker_killed_at_the_start_of_round_two(
        ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs, failpoints, tmp_path):
    """train.optimizer_state=carry: round 2 goes on with round 1's Adam state. Round 1's final
    checkpoint keeps the DeepSpeed state for it; a worker SIGKILLed at round 2's first micro-batch
    brings the group back from that checkpoint, optimizer state included, and round 2 ends with
    the weights of an undisturbed group. Restarting the optimizer instead gives other weights, so
    the state that was carried over made a difference."""
    from pipeline.training import TrainerGroup, run_training
    from wpo_ray.failpoints import arm, fired

    cfg = tiny_cfg_factory("train.epochs=2", "train.deepspeed.zero_stage=2", "train.lr=0.002", "train.loss.base=dpo",
                           "train.optimizer_state=carry")

    def two_rounds(d, kill: bool):
        group = TrainerGroup(cfg, d / "trainers")
        try:
            run_training(cfg, arithmetic_pairs, d / "r1" / "checkpoint", tiny_policy, tiny_policy, d / "r1",
                         group=group, round_idx=1)
            if kill:
                arm(failpoints, "train.micro_step", hit=1)
            run_training(cfg, arithmetic_pairs, d / "r2" / "checkpoint", str(d / "r1" / "checkpoint" / "policy"),
                         tiny_policy, d / "r2", group=group, round_idx=2)
        finally:
            group.close()

    two_rounds(tmp_path / "undisturbed", kill=False)
    two_rounds(tmp_path / "killed", kill=True)
    assert fired(failpoints, "train.micro_step"), "the failpoint never fired: nothing was tested"
    assert (tmp_path / "killed" / "r1" / "checkpoint" / "deepspeed").is_dir()
    r1 = tmp_path / "undisturbed" / "r1" / "checkpoint" / "policy"
    diff, moved = _max_diff(tmp_path / "killed" / "r2" / "checkpoint" / "policy",
                            tmp_path / "undisturbed" / "r2" / "checkpoint" / "policy", r1)
    assert moved > 1e-3 and diff <= 1e-6 * moved, (diff, moved)

    restart = tmp_path / "restart"
    run_training(tiny_cfg_factory("train.epochs=2", "train.deepspeed.zero_stage=2", "train.lr=0.002",
                                  "train.loss.base=dpo"),
                 arithmetic_pairs, restart / "checkpoint", str(r1), tiny_policy, restart)
    diff, moved = _max_diff(restart / "checkpoint" / "policy", tmp_path / "undisturbed" / "r2" / "checkpoint" / "policy",
                            r1)
    assert diff > 0.1 * moved, (diff, moved)


def test_one_worker_runs_without_partitioning_or_all_reduce_and_matches_two_zero2_workers(
        zero2_run, tiny_cfg_factory, tiny_policy, arithmetic_pairs, tmp_path, caplog):
    """One worker skips ZeRO partitioning and the gradient all-reduce (nothing to split or average)
    and still takes the steps two ZeRO-2 workers take on the same 8 pairs per step.

    The pairs are laid out so that the single worker's micro-batch k of 8 holds the pairs the two
    ranks of `zero2_run` trained on at step k (4 each, read from their ledgers, all three shuffled
    epochs in one unshuffled pass); the mean loss over 8 pairs has the gradient the two ranks
    average. Only padding widths differ.
    """
    import pyarrow.parquet as pq

    from pipeline.training import run_training

    _, out0, _ = zero2_run
    r0, r1 = _ledger(out0 / "checkpoint")  # each rank's 3 epochs, in the order it applied them
    assert len(r0) == len(r1) == 72 and r0[:24] != r0[24:48]  # a new order each epoch
    order = [i for k in range(0, 72, 4) for i in r0[k : k + 4] + r1[k : k + 4]]
    table = pq.read_table(arithmetic_pairs)
    pos = {pid: n for n, pid in enumerate(table.column("prompt_id").to_pylist())}
    (tmp_path / "pairs").mkdir()
    pq.write_table(table.take([pos[i] for i in order]), tmp_path / "pairs" / "pairs.parquet")

    cfg = tiny_cfg_factory("train.epochs=1", "train.shuffle=false", "train.deepspeed.zero_stage=2", "train.lr=0.002",
                           "train.loss.base=dpo", "train.num_workers=1", "train.micro_batch_size=8")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        info = run_training(cfg, tmp_path / "pairs", tmp_path / "checkpoint", tiny_policy, tiny_policy, tmp_path)
    assert info["steps"] == 18
    assert "ZeRO-0 instead of the configured 2" in caplog.text, caplog.text
    # Stage 0: DeepSpeed writes no per-rank ZeRO optimizer partitions.
    assert not list((tmp_path / "checkpoint" / "deepspeed").rglob("*zero_pp_rank*optim_states*"))
    w, w0, start = (_weights(d) for d in (tmp_path / "checkpoint" / "policy", out0 / "checkpoint" / "policy", tiny_policy))
    diff = max((w[k] - w0[k]).abs().max().item() for k in w)
    moved = max((w0[k] - start[k]).abs().max().item() for k in w)
    assert moved > 1e-3 and diff <= 1e-3 * moved, (diff, moved)
    losses, losses0 = (x["loss"] for x in _metrics(tmp_path / "metrics.jsonl")), (x["loss"] for x in _metrics(out0 / "metrics.jsonl"))
    assert list(losses) == pytest.approx(list(losses0), abs=1e-4)


def test_checkpoint_loads_in_transformers_and_vllm(zero2_run, vllm_pool, tiny_policy, tiny_cfg_factory, caplog):
    """The trained policy gives the same greedy answers in transformers, in a fresh vLLM engine,
    in the running engine updated in place from the checkpoint, and in the running engine given
    the weights through the object store (the trainer group's hand-over); handed-over weights
    that do not match the checkpoint are refused, the checkpoint is loaded instead, and the
    driver says so."""
    import logging

    import ray
    from safetensors.torch import load_file

    from actors.sampler import SamplerPool
    from wpo_ray.generation import HFSampler
    from wpo_ray.weights import pack_state

    _, out, _ = zero2_run
    policy = str(out / "checkpoint" / "policy")
    prompts = ["12+7=", "3*4=", "45-9=", "8+8*2=", "71+25="]
    seeds = list(range(len(prompts)))
    hf = [c[0].text for c in HFSampler.from_path(policy).generate(prompts, seeds, 1, 0.0, 1.0, 8)]
    before = [c[0].text for c in vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)]
    modes = vllm_pool.load_weights(policy)
    assert modes == ["in_place"]
    in_place = [c[0].text for c in vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)]
    # A fresh engine on the checkpoint must agree with the engine updated in place.
    fresh = SamplerPool(tiny_cfg_factory(), policy)
    try:
        fresh_out = [c[0].text for c in fresh.generate(prompts, seeds, 1, 0.0, 1.0, 8)]
    finally:
        fresh.shutdown()
        vllm_pool.load_weights(tiny_policy)
    assert in_place == fresh_out == hf
    restored = [c[0].text for c in vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)]
    assert restored == before

    @ray.remote(num_cpus=0)
    class Owner:  # stands in for trainer rank 0, which owns the weights it puts
        def put(self, path: str, cut: str | None = None) -> list:
            state = load_file(f"{path}/model.safetensors")
            if cut:  # a tensor of the wrong shape, which the engine refuses
                state[cut] = state[cut][:-1]
            return [ray.put(pack_state(state))]

    owner = Owner.remote()
    try:
        [weights] = ray.get(owner.put.remote(policy))
        assert vllm_pool.load_weights(policy, weights=weights) == ["in_memory"]
        in_memory = [c[0].text for c in vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)]
        assert in_memory == fresh_out
        vllm_pool.load_weights(tiny_policy)
        # One tensor of the wrong shape: refused before any reaches the engine, which reads the checkpoint.
        [bad] = ray.get(owner.put.remote(policy, "model.norm.weight"))
        with caplog.at_level(logging.WARNING, logger="actors.sampler"):
            assert vllm_pool.load_weights(policy, weights=bad) == ["in_place"]
        assert any("hand-over failed on engine(s) [0]" in r.getMessage() for r in caplog.records), caplog.text
        assert [c[0].text for c in vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)] == fresh_out
    finally:
        ray.kill(owner)
        vllm_pool.load_weights(tiny_policy)
    assert [c[0].text for c in vllm_pool.generate(prompts, seeds, 1, 0.0, 1.0, 8)] == before


def test_trl_format_pairs_are_read_with_uniform_weights(ray_session, arithmetic_pairs, tiny_cfg_factory, tmp_path):
    from pipeline.training import read_pairs
    from wpo_ray.contracts import ContractError

    trl = _as_trl_jsonl(arithmetic_pairs, tmp_path / "trl")
    ds, n, has_ref = read_pairs(trl, tiny_cfg_factory())
    rows = ds.take_all()
    assert n == 48 and len(rows) == 48 and not has_ref
    assert {r["weight"] for r in rows} == {1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2"}\n')
    with pytest.raises(ContractError, match="missing column 'rejected'"):
        read_pairs(bad, tiny_cfg_factory())


def _as_trl_jsonl(pairs_dir, out_dir):
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(pairs_dir, columns=["prompt", "chosen", "rejected"]).to_pylist()
    (out_dir / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def test_zero3_on_trl_format_pairs_with_reference_on_worker_and_gamma_po_margins_agreed_by_both_ranks(
        ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs, tmp_path):
    from wpo_ray.rundir import checkpoint_has_policy, gamma_po_file
    from pipeline.training import run_training

    # γ-PO with a small τ, so that its margins vary from pair to pair.
    cfg = tiny_cfg_factory("train.deepspeed.zero_stage=3", "train.reference_logps=worker",
                           "train.loss.gamma_po.enabled=true", "train.loss.gamma_po.tau=0.1")
    trl = _as_trl_jsonl(arithmetic_pairs, tmp_path / "trl")
    info = run_training(cfg, trl, tmp_path / "checkpoint", tiny_policy, tiny_policy, tmp_path)
    m = _metrics(tmp_path / "metrics.jsonl")
    assert info["steps"] == 6 and len(m) == 6
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference: every gap 0
    assert checkpoint_has_policy(tmp_path / "checkpoint")
    assert {x["weight/mean"] for x in m} == {1.0}  # TRL data without a weight column trains uniformly
    # Each rank pooled every rank's gaps (the all_gather), so both hold the same queue: the gaps of
    # all 48 pairs, and so computed the same margins; and the margins did vary.
    queues = [json.loads((tmp_path / "checkpoint" / gamma_po_file(r)).read_text()) for r in (0, 1)]
    assert queues[0] == queues[1] and len(queues[0]) == 48 and len(set(queues[0])) > 1
    assert max(x["gamma_po/margin_std"] for x in m) > 0


def test_nan_weight_is_refused_before_any_worker_starts(ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs,
                                                        tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.training import run_training
    from wpo_ray.contracts import ContractError

    table = pq.read_table(arithmetic_pairs)
    bad_id = table.column("prompt_id")[30].as_py()
    weights = table.column("weight").to_pylist()
    weights[30] = float("nan")
    (tmp_path / "pairs").mkdir()
    pq.write_table(table.set_column(table.schema.get_field_index("weight"), "weight", pa.array(weights, pa.float64())),
                   tmp_path / "pairs" / "pairs.parquet")
    with pytest.raises(ContractError, match=f"pair '{bad_id}' has weight = nan"):
        run_training(tiny_cfg_factory(), tmp_path / "pairs", tmp_path / "out" / "checkpoint", tiny_policy, tiny_policy,
                     tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint").exists() and not (tmp_path / "out" / "ray_train").exists()


def test_nan_reference_logps_computed_while_the_workers_start_fail_the_run_naming_the_pair(
        ray_session, tiny_cfg_factory, tiny_policy, arithmetic_pairs, tmp_path):
    """The RefLogp stage runs while Ray Train starts the workers (pipeline.training.run_training); a
    reference model that gives NaN log-probs must end the run with the pairs' own error, not hang
    the workers waiting for their shards, and leave no checkpoint."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.training import run_training
    from wpo_ray.contracts import ContractError

    ref = tmp_path / "reference"
    shutil.copytree(tiny_policy, ref)
    w = load_file(str(ref / "model.safetensors"))
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("nan"))
    save_file(w, str(ref / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ContractError, match=r"has ref_(chosen|rejected)_logp = nan, expected a finite number \(96 such"):
        run_training(tiny_cfg_factory("train.loss.base=dpo"), arithmetic_pairs, tmp_path / "out" / "checkpoint",
                     tiny_policy, str(ref), tmp_path / "out")
    assert not (tmp_path / "out" / "checkpoint").exists()



def test_resume_on_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file(
        zero2_run, tiny_cfg_factory, tiny_policy, arithmetic_pairs, tmp_path):
    """The real final checkpoint of the ZeRO-2 run, one byte of its policy weights flipped: the
    resumed workers refuse it, naming the file, before anything of it is read. (A round's final
    checkpoint holds no optimizer shards under train.optimizer_state=restart; tests/unit/
    test_integrity.py flips bytes in DeepSpeed's files.)"""
    import shutil

    from pipeline.training import run_training

    cfg, out0, _ = zero2_run  # its config: the work dir refuses another job's (claim_work_dir)
    work = tmp_path / "work"
    shutil.copytree(out0, work, ignore=shutil.ignore_patterns("checkpoint"))
    final = next((work / "ray_train").glob("round-*-final"))
    shard = final / "policy" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception) as e:
        run_training(cfg, arithmetic_pairs, tmp_path / "checkpoint", tiny_policy, tiny_policy, work)
    assert shard.name in str(e.value) and "SHA-256 differs" in str(e.value), str(e.value)[-2000:]
    assert not (tmp_path / "checkpoint").exists()
