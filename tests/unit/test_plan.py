"""The resource plan: roles from the config, placement on a cluster, the errors that name a role."""

from __future__ import annotations

from pathlib import Path

import pytest

from wpo_ray.config import load_config
from wpo_ray.plan import (Node, PlanError, Role, check_fit, check_roles, describe, load_cluster, memory_per_gpu,
                          nodes_from_counts, parameter_count, roles)

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO / "configs" / "qwen2-7b-gsm8k.yaml"
MATH = REPO / "configs" / "qwen2-7b-math.yaml"
CLUSTER = REPO / "k8s" / "raycluster.yaml"


def test_roles_of_the_gsm8k_recipe():
    by = {r.name: r for r in roles(load_config(GSM8K))}  # colocated: one engine + one trainer per GPU
    assert (by["samplers"].actors, by["samplers"].gpus) == (8, 0.6)
    assert (by["trainers"].actors, by["trainers"].gpus) == (8, 0.4)
    assert (by["reference"].actors, by["reference"].gpus) == (1, 1)
    apart = {r.name: r for r in roles(load_config(GSM8K, ["run.placement=separate"]))}
    assert (apart["samplers"].gpus, apart["trainers"].gpus) == (1, 1)
    # SimPO needs no reference: no RefLogp pool to plan for.
    assert "reference" not in {r.name for r in roles(load_config(GSM8K, ["train.loss.base=simpo"]))}


def test_shipped_recipes_fit_the_shipped_cluster_and_an_oversized_one_is_refused_naming_the_samplers():
    nodes = load_cluster(CLUSTER)
    for recipe in (GSM8K, MATH):
        check_fit(roles(load_config(recipe)), nodes)
    with pytest.raises(PlanError, match=r"^samplers: the run holds 521 GPUs at once .* the cluster has 14"):
        check_fit(roles(load_config(GSM8K, ["run.placement=separate", "sampling.num_actors=512"])), nodes)


def test_colocated_engines_and_trainers_share_gpus_one_of_each_per_gpu():
    cfg = load_config(GSM8K)  # 8 engines + 8 trainers colocated, + 1 RefLogp GPU
    placed = check_fit(roles(cfg), nodes_from_counts(9, 1))
    assert len(placed) == 8 + 4 + 8 + 1  # graders too
    per_node = {}
    for actor, node in placed:
        per_node.setdefault(node, []).append(actor.split("[")[0])
    shared = [sorted(a for a in v if a != "graders") for v in per_node.values()]
    assert shared.count(["samplers", "trainers"]) == 8 and shared.count(["reference"]) == 1
    with pytest.raises(PlanError, match=r"^samplers: the run holds 9 GPUs at once .* the cluster has 8"):
        check_fit(roles(cfg), nodes_from_counts(8, 1))
    # Separate, the same run needs 8 + 8 + 1 = 17.
    with pytest.raises(PlanError, match=r"the run holds 17 GPUs at once"):
        check_fit(roles(load_config(GSM8K, ["run.placement=separate"])), nodes_from_counts(9, 1))


def test_fractional_gpus_are_placed_on_single_gpus_not_on_a_node_total():
    # 3 x 0.6 = 1.8 <= 2 GPUs in total, but each GPU holds only one 0.6 share, as Ray assigns them.
    with pytest.raises(PlanError, match=r"^samplers: actor 3 of 3 needs 0.6 GPU"):
        check_fit([Role("samplers", 3, 0.6, 1.0)], [Node("n", 16, 2)])
    check_fit([Role("samplers", 2, 0.6, 1.0), Role("trainers", 2, 0.4, 1.0)], [Node("n", 16, 2)])


def test_a_cluster_whose_cpus_the_actors_hold_all_is_refused_for_the_data_stages():
    """The run's actors hold their CPUs for the whole run; Ray Data's tasks between them need one
    more, or a round waits forever (seen: the reference stage's check task never started)."""
    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")  # 5 CPUs held: engine, grader, reference, 2 trainers
    check_fit(roles(cfg), [Node("n", 6, 0)])
    with pytest.raises(PlanError, match=r"data stages: the run's actors hold 5 of the cluster's 5 CPUs.*graders 1 x 1"):
        check_fit(roles(cfg), [Node("n", 5, 0)])


def test_a_cluster_given_as_nodes_and_gpus_per_node():
    cfg = load_config(MATH)  # TP=2 engines: 2 GPUs on one node each
    check_fit(roles(cfg), nodes_from_counts(4, 4))
    with pytest.raises(PlanError, match=r"^samplers: actor 1 of 2 needs 2 GPU .* no node has 2 GPUs "
                                        r"\(tensor_parallel_size 2\); the largest has 1"):
        check_fit(roles(cfg), nodes_from_counts(16, 1))  # enough GPUs in all, none with two
    # 14 GPUs for 13, but only one node can hold a 2-GPU engine: the second one has nowhere to go.
    mixed = nodes_from_counts(12, 1) + [Node("big", 16, 2)]
    with pytest.raises(PlanError, match=r"^samplers: actor 2 of 2 needs 2 GPU .* what is left after the larger "
                                        r"actors: 12 GPUs"):
        check_fit(roles(cfg), mixed)


def test_tp_larger_than_the_gpus_an_engine_asks_for_is_refused_naming_the_keys():
    cfg = load_config(MATH, ["sampling.num_gpus_per_actor=1"])
    with pytest.raises(PlanError, match="tensor_parallel_size=2 needs 2 GPUs per engine; sampling.num_gpus_per_actor is 1"):
        check_roles(cfg)


def test_memory_estimate_partitions_optimizer_state_over_zero_ranks():
    cfg = load_config(GSM8K)
    n = 7_600_000_000
    mem = memory_per_gpu(cfg, n, gpu_gib=80)
    gib = 2**30
    assert mem["samplers"]["weights"] == pytest.approx(n * 2 / gib)
    stage3 = memory_per_gpu(load_config(GSM8K, ["train.deepspeed.zero_stage=3"]), n)["trainers"]
    stage2 = memory_per_gpu(load_config(GSM8K, ["train.deepspeed.zero_stage=2"]), n)["trainers"]
    assert stage2["optimizer"] == pytest.approx(12 * n / 8 / gib) and stage2["weights"] == pytest.approx(2 * n / gib)
    assert stage3["weights"] == pytest.approx(2 * n / 8 / gib)
    off = memory_per_gpu(load_config(GSM8K, ["train.deepspeed.zero_stage=3", "train.deepspeed.offload_optimizer=true",
                                             "train.deepspeed.offload_params=true"]), n)["trainers"]
    assert off["optimizer"] == 0 and off["weights"] == 0


def test_parameter_count_of_the_tiny_model_matches_the_built_one():
    from wpo_ray.arithmetic import ALPHABET
    from wpo_ray.tiny_model import build_char_tokenizer, build_tiny_model

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml")
    model = build_tiny_model(cfg.bootstrap.model, build_char_tokenizer(ALPHABET))
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_describe_prints_every_role_and_the_fit():
    text = describe(load_config(GSM8K), load_cluster(CLUSTER), n_params=7_600_000_000)
    for role in ("samplers", "graders", "reference", "trainers"):
        assert role in text
    assert "held at once: 9 GPUs" in text and "fits: 21 actors" in text and "memory per GPU for 7.60B" in text
    assert "placement: colocated" in text
    apart = describe(load_config(GSM8K, ["run.placement=separate"]), n_params=7_600_000_000)
    assert "held at once: 17 GPUs" in apart and "placement: colocated" not in apart


def test_cli_plan_exits_non_zero_naming_the_role(capsys):
    from jobs.cli import main

    assert main(["plan", str(GSM8K), "--cluster", str(CLUSTER)]) == 0
    assert "fits:" in capsys.readouterr().out
    assert main(["plan", str(GSM8K), "run.placement=separate", "sampling.num_actors=512", "--cluster", str(CLUSTER)]) == 1
    assert "does not fit: samplers:" in capsys.readouterr().err
    assert main(["plan", str(MATH), "--nodes", "16", "--gpus-per-node", "1"]) == 1
    assert "tensor_parallel_size 2" in capsys.readouterr().err
    assert main(["plan", str(GSM8K), "--nodes", "2"]) == 1  # --nodes without --gpus-per-node
    assert "--nodes needs --gpus-per-node" in capsys.readouterr().err
