"""Iterative rounds through the whole pipeline: round 2 samples round 1's policy (the engine took
its weights), its weights are recomputed from its own samples, the reference is the previous
policy, round 1's evaluation runs while round 2 grades and trains, and a driver interrupted inside
round 2 resumes without redoing a finished stage."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

STAGES_ROUND_1 = ("prompts", "samples", "graded", "pairs", "skips", "train", "checkpoint", "eval.json")


def _state(run_dir, r: int, name: str) -> dict:
    d = run_dir / f"round-{r:03d}" / name
    files = [d] if d.is_file() else sorted(p for p in d.rglob("*") if p.is_file())
    return {str(f.relative_to(run_dir)): f.stat().st_mtime_ns for f in files}


def test_two_rounds_with_the_previous_policy_as_reference_resample_reweight_and_resume_in_round_two(
        tiny_cfg_factory, tiny_policy, vllm_pool, grader_pool, failpoints, tmp_path, caplog):
    from pipeline.round import run_rounds
    from wpo_ray.failpoints import arm, fired
    from wpo_ray.generation import prompt_seed
    from wpo_ray.rundir import RunDir

    # The same 16 questions in both rounds, so that their samples and weights can be compared.
    # Colocated as asked, and the CPU engine cannot sleep: the run says so once and runs separate.
    cfg = tiny_cfg_factory("run.rounds=2", "run.reference=previous", "data.prompts_per_round=16",
                           "data.reuse_prompts=true", "eval.max_prompts=16", "run.placement=colocated",
                           run_dir=tmp_path / "run")
    run_dir = tmp_path / "run"
    manifest = lambda: json.loads((run_dir / "manifest.json").read_text())["stages"]  # noqa: E731
    try:
        # Interrupted once round 2's graded answers are in place, before they are recorded.
        arm(failpoints, "driver.graded.committed", hit=2, action="interrupt")
        with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.INFO):
            run_rounds(cfg, RunDir(cfg), pool=vllm_pool, graders=grader_pool)
        assert fired(failpoints, "driver.graded.committed")
        # The trainer group started with the run, before round 1 had drawn its samples.
        said = [r.getMessage() for r in caplog.records]
        started = next(i for i, m in enumerate(said) if "trainer group started" in m)
        assert started < next(i for i, m in enumerate(said) if "[round 1] samples: done" in m)
        # Round 1's policy reached the engine from the trainer group's memory, not from its checkpoint.
        loaded = [r.getMessage() for r in caplog.records if "new policy" in r.getMessage()]
        assert len(loaded) == 1 and "from the trainers' memory" in loaded[0], loaded
        # ... and so did round 2's reference (round 1's policy) to the RefLogp pool.
        ref = [m for m in said if "[round 2] the reference" in m]
        assert len(ref) == 1 and "reached 1 RefLogp actor(s), 1 of them from the trainers' memory" in ref[0], ref
        before = manifest()
        assert {"round-001/train", "round-001/eval", "round-002/samples"} <= set(before)
        assert "round-002/graded" not in before
        finished = {k: v for k, v in before.items()}
        files = {(r, n): _state(run_dir, r, n) for r, n in [(1, s) for s in STAGES_ROUND_1] +
                 [(2, "prompts"), (2, "samples")]}

        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.round"):
            assert run_rounds(cfg, RunDir(cfg), pool=vllm_pool, graders=grader_pool) == 0
        fallback = [r.getMessage() for r in caplog.records if "falling back to separate placement" in r.getMessage()]
        assert len(fallback) == 1 and "vLLM has no sleep mode on cpu" in fallback[0], fallback
        after = manifest()
        for key, entry in finished.items():  # nothing recorded was redone
            assert after[key] == entry, key
        for (r, n), state in files.items():
            assert _state(run_dir, r, n) == state, (r, n)
        assert {"round-002/graded", "round-002/train", "round-002/eval"} <= set(after)

        policy1 = str(RunDir(cfg).policy_dir(1))
        assert after["round-002/samples"]["policy"] == policy1
        assert after["round-002/train"]["reference"] == policy1  # run.reference=previous

        # Round 2's samples (drawn after the in-memory hand-over) are what the engine draws with
        # round 1's checkpoint (the same per-prompt seeds), and not what it draws with the initial weights.
        samples2 = pq.read_table(run_dir / "round-002" / "samples").to_pylist()
        prompts = [row["prompt"] for row in samples2]
        seeds = [prompt_seed(cfg.run.seed, 2, row["prompt_id"]) for row in samples2]
        s = cfg.sampling

        def redraw(policy: str) -> list[list[str]]:
            vllm_pool.load_weights(policy)
            return [[c.text for c in comps] for comps in
                    vllm_pool.generate(prompts, seeds, s.n, s.temperature, s.top_p, s.max_tokens)]

        recorded = [row["responses"] for row in samples2]
        assert redraw(policy1) == recorded
        assert redraw(tiny_policy) != recorded

        # The weights are recomputed from round 2's own outcomes.
        w1 = {p["prompt_id"]: p["weight"] for p in pq.read_table(run_dir / "round-001" / "pairs").to_pylist()}
        w2 = {p["prompt_id"]: p["weight"] for p in pq.read_table(run_dir / "round-002" / "pairs").to_pylist()}
        shared = w1.keys() & w2.keys()
        assert shared and any(w1[k] != w2[k] for k in shared), (w1, w2)

        # Round 1's evaluation ran once round 2 had drawn its samples (eval.overlap), on the idle
        # engine still holding round 1's policy, and it recorded what evaluating that policy gives.
        assert before["round-001/eval"]["started_unix"] >= before["round-002/samples"]["ended_unix"]
        from pipeline.evaluation import run_eval

        vllm_pool.load_weights(policy1)
        direct = json.loads(json.dumps(run_eval(cfg, policy1, sampler=vllm_pool)))
        assert json.loads((run_dir / "round-001" / "eval.json").read_text()) == direct
    finally:
        vllm_pool.load_weights(tiny_policy)  # the shared engine as the other tests expect it


def test_a_run_the_cluster_cannot_hold_is_refused_before_anything_starts(ray_session, tiny_cfg_factory, tmp_path,
                                                                         capsys):
    """`wpo-ray run` checks the resource plan against the nodes Ray has (here the embedded Ray of
    the test session: CPUs only) before the bootstrap or an engine starts, naming the role."""
    from jobs.cli import main
    from tests.conftest import ROOT, TINY_OVERRIDES

    code = main(["run", str(ROOT / "configs" / "tiny-cpu.yaml"), *TINY_OVERRIDES, "train.use_gpu=true",
                 f"run.dir={tmp_path / 'run'}", "bootstrap.cache_dir=" + str(tmp_path / "no-cache")])
    err = capsys.readouterr().err
    assert code == 1 and "trainers: the run holds 2 GPUs at once" in err and "the cluster has 0" in err, err
    assert not (tmp_path / "no-cache").exists()  # no bootstrap ran
    assert not list((tmp_path / "run").glob("round-*"))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-lm-head"])
def test_a_kept_reference_actor_takes_the_next_reference_from_the_trainers_memory(ray_session, tmp_path, tied):
    """`run.reference: previous` with a hand-over: the RefLogp actor copies round r's weights from
    the object store into the model it holds, and its log-probs equal those of an actor that read
    the checkpoint. Weights that do not fit (a tensor missing) fall back to the checkpoint."""
    import numpy as np
    import pyarrow as pa
    import ray
    import torch
    from transformers import LlamaForCausalLM

    from actors.ref_logp import RefLogpActor
    from wpo_ray.config import TinyModelConfig
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model, save_policy
    from wpo_ray.weights import pack_state

    tok = build_char_tokenizer("0123456789+-*=")
    models = []
    for seed in (0, 1):  # the policy before and after a round
        config = build_tiny_model(TinyModelConfig(), tok).config
        config.tie_word_embeddings = tied
        torch.manual_seed(seed)
        models.append(LlamaForCausalLM(config))
    a, b = (str(save_policy(m, tok, tmp_path / name)) for m, name in zip(models, "ab"))
    assert (models[1].lm_head.weight.data_ptr() == models[1].model.embed_tokens.weight.data_ptr()) == tied
    table = pa.table({"prompt_id": ["p0", "p1", "p2"], "prompt": ["1+1=", "12*3=", "7*8="],
                      "chosen": ["2", "36", "56"], "rejected": ["3", "306", "54"]})

    def logps(t: pa.Table) -> np.ndarray:
        return np.array([t.column("ref_chosen_logp").to_pylist(), t.column("ref_rejected_logp").to_pylist()])

    from_checkpoint = logps(RefLogpActor(b)(table))
    actor = RefLogpActor(a)
    before = logps(actor(table))
    got = logps(actor.logps(table, b, [ray.put(pack_state(models[1].state_dict()))]))
    assert (actor.model_path, actor.loaded_from) == (b, "memory")
    np.testing.assert_allclose(got, from_checkpoint, rtol=0, atol=1e-6)
    assert np.abs(got - before).max() > 1e-3  # it changed model, not only its name

    state = dict(models[1].state_dict())
    del state["model.layers.0.mlp.down_proj.weight"]
    actor = RefLogpActor(a)
    got = logps(actor.logps(table, b, [ray.put(pack_state(state))]))
    assert (actor.model_path, actor.loaded_from) == (b, "checkpoint")
    np.testing.assert_allclose(got, from_checkpoint, rtol=0, atol=1e-6)
