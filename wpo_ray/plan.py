"""The resource plan of a run: what each role asks Ray for, and whether a cluster can hold it.

Pure: a config (and optionally a cluster description) in, a plan out; nothing starts. The roles
are the run's long-lived actors, all held at once at the peak of a staged round (the sampler
engines keep their GPUs through training; the RefLogp pool runs while the trainers start):

- ``samplers``: ``sampling.num_actors`` engines, each ``sampling.num_gpus_per_actor`` GPUs and
  ``num_cpus_per_actor`` CPUs, on **one** node (a tensor-parallel engine's GPUs share a node);
- ``graders``: ``grading.num_actors`` actors of 1 CPU;
- ``reference``: the RefLogp pool (``train.reference``), only when the loss needs a reference and
  ``train.reference_logps`` is ``precomputed``;
- ``trainers``: ``train.num_workers`` Ray Train workers of ``train.cpus_per_worker`` CPUs and one
  GPU each when ``train.use_gpu``.

Under ``run.placement=colocated`` on GPUs an engine asks for 0.6 of a GPU and a trainer for 0.4
(wpo_ray/colocation.py), so each GPU holds one of each and the two roles together hold as many
GPUs as there are trainers. GPUs are fitted one by one, as Ray assigns them.

:func:`check_fit` places every actor (a bundle) on the cluster's nodes, largest first, and raises
:class:`PlanError` naming the first role that does not fit and why. :func:`memory_per_gpu` estimates
what one GPU of each role holds, from the parameter count and dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .colocation import engine_gpus, shares_gpus, trainer_gpus
from .config import Config

GiB = 2**30


class PlanError(ValueError):
    """The run cannot be scheduled on the cluster: names the role and why."""


@dataclass(frozen=True)
class Role:
    name: str
    actors: int
    gpus: float  # per actor
    cpus: float  # per actor
    resources: dict = field(default_factory=dict)  # custom Ray resources per actor
    tp: int = 1  # tensor-parallel size (samplers)


@dataclass
class Node:
    name: str
    cpus: float
    gpus: float
    resources: dict = field(default_factory=dict)


def roles(cfg: Config) -> list[Role]:
    s, t = cfg.sampling, cfg.train
    out = [
        Role("samplers", s.num_actors, engine_gpus(cfg), s.num_cpus_per_actor, dict(s.resources_per_actor),
             s.engine.tensor_parallel_size),
        Role("graders", cfg.grading.num_actors, 0.0, 1.0),
    ]
    if t.loss.needs_reference and t.reference_logps == "precomputed":
        out.append(Role("reference", t.reference.num_actors, t.reference.num_gpus_per_actor,
                        t.reference.num_cpus_per_actor))
    out.append(Role("trainers", t.num_workers, trainer_gpus(cfg), t.cpus_per_worker))
    return out


def check_roles(cfg: Config) -> None:
    """What no cluster can fix: a tensor-parallel engine given fewer GPUs than its TP size."""
    s = cfg.sampling
    tp = s.engine.tensor_parallel_size
    if tp > 1 and s.num_gpus_per_actor < tp:
        raise PlanError(f"samplers: sampling.engine.tensor_parallel_size={tp} needs {tp} GPUs per engine; "
                        f"sampling.num_gpus_per_actor is {s.num_gpus_per_actor}")


# ------------------------------------------------------------------------------------ clusters


def nodes_from_counts(nodes: int, gpus_per_node: float, cpus_per_node: Optional[float] = None) -> list[Node]:
    """``--nodes N --gpus-per-node G [--cpus-per-node C]`` (CPUs default to 8 per GPU, at least 8)."""
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {nodes} and {gpus_per_node}")
    cpus = cpus_per_node if cpus_per_node is not None else max(8.0, 8.0 * gpus_per_node)
    return [Node(f"node-{i}", cpus, gpus_per_node) for i in range(nodes)]


def _quantity(x: Any) -> float:
    """A Kubernetes quantity as a number of units: "8", 2, "500m" → 0.5."""
    s = str(x).strip()
    if s.endswith("m") and s[:-1].isdigit():
        return int(s[:-1]) / 1000
    return float(s)


def nodes_from_raycluster(manifest: dict, source: str = "cluster") -> list[Node]:
    """The Ray nodes a KubeRay ``RayCluster`` (or a ``RayJob``'s ``rayClusterSpec``) starts.

    Each pod is one node; its CPUs and GPUs come from ``rayStartParams`` (``num-cpus``,
    ``num-gpus``, ``resources``) where set, else from the container's limits, as KubeRay derives
    them. A worker group counts ``replicas`` pods (``minReplicas`` when autoscaling may remove some).
    """
    spec = manifest.get("spec", {})
    spec = spec.get("rayClusterSpec", spec)
    if "headGroupSpec" not in spec:
        raise ValueError(f"{source}: not a RayCluster or RayJob manifest (no spec.headGroupSpec)")

    def pod_node(name: str, group: dict) -> Node:
        params = group.get("rayStartParams", {}) or {}
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
        gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        res = params.get("resources")
        extra = json.loads(res.strip("'\"")) if isinstance(res, str) else dict(res or {})
        return Node(name, cpus, gpus, extra)

    nodes = [pod_node("head", spec["headGroupSpec"])]
    for g in spec.get("workerGroupSpecs", []):
        count = min(int(g.get("replicas", 0)), int(g.get("minReplicas", g.get("replicas", 0))))
        nodes += [pod_node(f"{g['groupName']}-{i}", g) for i in range(count)]
    return nodes


def load_cluster(path: str | Path) -> list[Node]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--cluster {p}: no such file")
    docs = [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if isinstance(d, dict)]
    for d in docs:
        if d.get("kind") in ("RayCluster", "RayJob"):
            return nodes_from_raycluster(d, str(p))
    raise ValueError(f"--cluster {p}: no RayCluster or RayJob in it")


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """The alive nodes of `ray.nodes()`."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive", True):
            continue
        r = dict(n.get("Resources", {}))
        extra = {k: v for k, v in r.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                 and not k.startswith("node:") and not k.startswith("accelerator_type")}
        out.append(Node(n.get("NodeManagerAddress", n.get("NodeID", "?")), r.get("CPU", 0.0), r.get("GPU", 0.0), extra))
    return out


# ------------------------------------------------------------------------------------ fitting


# CPUs no actor may hold: the Ray Data tasks between the actors (reading and writing Parquet,
# checking pairs) reserve one each, and with every CPU held by the run's actors they never start.
DATA_CPUS = 1.0


def check_fit(plan: list[Role], nodes: list[Node]) -> list[tuple[str, str]]:
    """Place every actor of `plan` on `nodes` (largest bundles first, first fit); returns
    (actor, node) placements or raises PlanError naming the role that does not fit.

    GPUs are placed one by one, as Ray assigns them: an actor asking for g >= 1 GPUs takes g
    whole free GPUs of one node; one asking for a fraction takes part of a single GPU."""
    free = [Node(n.name, n.cpus, n.gpus, dict(n.resources)) for n in nodes]
    if not free:
        raise PlanError("the cluster has no nodes")
    gpu_free = {id(n): [1.0] * int(n.gpus) + ([n.gpus % 1] if n.gpus % 1 else []) for n in free}
    total_gpus = sum(n.gpus for n in nodes)
    need_gpus = sum(r.actors * r.gpus for r in plan)
    if need_gpus > total_gpus + 1e-9:
        worst = max(plan, key=lambda r: r.actors * r.gpus)
        raise PlanError(f"{worst.name}: the run holds {need_gpus:g} GPUs at once ({_breakdown(plan)}); the cluster "
                        f"has {total_gpus:g} ({worst.name} alone: {worst.actors} x {worst.gpus:g})")
    bundles = sorted(((r, i) for r in plan for i in range(r.actors)), key=lambda b: (-b[0].gpus, -b[0].cpus))
    placed = []
    for role, i in bundles:
        node = next((n for n in free if _take_gpus(gpu_free[id(n)], role.gpus, dry_run=True)
                     and n.cpus >= role.cpus - 1e-9
                     and all(n.resources.get(k, 0) >= v for k, v in role.resources.items())), None)
        if node is None:
            raise PlanError(f"{role.name}: actor {i + 1} of {role.actors} needs {_bundle(role)} on one node; "
                            f"{_why(role, nodes, free)}")
        _take_gpus(gpu_free[id(node)], role.gpus)
        node.gpus -= role.gpus
        node.cpus -= role.cpus
        for k, v in role.resources.items():
            node.resources[k] -= v
        placed.append((f"{role.name}[{i}]", node.name))
    spare = sum(n.cpus for n in free)
    if spare < DATA_CPUS - 1e-9:
        raise PlanError(f"data stages: the run's actors hold {sum(n.cpus for n in nodes) - spare:g} of the cluster's "
                        f"{sum(n.cpus for n in nodes):g} CPUs for the whole run ({', '.join(f'{r.name} {r.actors} x {r.cpus:g}' for r in plan)}); Ray Data's read, "
                        f"check and write tasks need {DATA_CPUS:g} CPU no actor holds, or a round waits for one forever")
    return placed


def _take_gpus(gpus: list[float], want: float, dry_run: bool = False) -> bool:
    """Take `want` GPUs from one node's per-GPU free shares: whole free GPUs for want >= 1, else
    the first GPU with that much left. False (nothing taken) when they are not there."""
    eps = 1e-9
    if want <= 0:
        return True
    if want >= 1:
        whole = [k for k, g in enumerate(gpus) if g >= 1 - eps]
        if len(whole) < want - eps:
            return False
        if not dry_run:
            for k in whole[:int(round(want))]:
                gpus[k] = 0.0
        return True
    k = next((k for k, g in enumerate(gpus) if g >= want - eps), None)
    if k is None:
        return False
    if not dry_run:
        gpus[k] -= want
    return True


def _bundle(role: Role) -> str:
    parts = [f"{role.gpus:g} GPU"] if role.gpus else []
    parts.append(f"{role.cpus:g} CPU")
    parts += [f"{v:g} {k}" for k, v in role.resources.items()]
    return " + ".join(parts)


def _breakdown(plan: list[Role]) -> str:
    return ", ".join(f"{r.name} {r.actors} x {r.gpus:g}" for r in plan if r.gpus)


def _why(role: Role, nodes: list[Node], free: list[Node]) -> str:
    if role.gpus > max(n.gpus for n in nodes):
        tp = f" (tensor_parallel_size {role.tp})" if role.tp > 1 else ""
        return f"no node has {role.gpus:g} GPUs{tp}; the largest has {max(n.gpus for n in nodes):g}"
    for k, v in role.resources.items():
        if not any(n.resources.get(k, 0) >= v for n in nodes):
            return f"no node offers the resource {k!r}"
    if role.cpus > max(n.cpus for n in nodes):
        return f"no node has {role.cpus:g} CPUs; the largest has {max(n.cpus for n in nodes):g}"
    return (f"what is left after the larger actors: {sum(n.gpus for n in free):g} GPUs and "
            f"{sum(n.cpus for n in free):g} CPUs, on no single node enough")


# ------------------------------------------------------------------------------------ memory

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


def parameter_count(cfg: Config) -> Optional[int]:
    """The policy's parameter count from its config.json (a Llama-style estimate), or the tiny
    model's; None when the model directory is not readable here."""
    if cfg.model.path == "builtin:tiny":
        from .arithmetic import ALPHABET

        m = cfg.bootstrap.model
        v = 4 + len(set(ALPHABET))  # tiny_model's 4 special tokens + one per character
        h, L, i = m.hidden_size, m.num_layers, m.intermediate_size
        return 2 * v * h + L * (4 * h * h + 3 * h * i + 2 * h) + h
    p = Path(cfg.model.path) / "config.json"
    try:
        c = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    c = c.get("text_config", c)
    h, L, i, v = (c.get(k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"))
    if not all(isinstance(x, int) for x in (h, L, i, v)):
        return None
    heads, kv = c.get("num_attention_heads", 1), c.get("num_key_value_heads", c.get("num_attention_heads", 1))
    attn = h * h * 2 + 2 * h * (h // heads) * kv
    embed = v * h * (1 if c.get("tie_word_embeddings") else 2)
    return embed + L * (attn + 3 * h * i + 2 * h) + h


def memory_per_gpu(cfg: Config, n_params: int, gpu_gib: float = 80.0) -> dict[str, dict[str, float]]:
    """GiB one GPU of each role holds: weights, optimizer state (+ fp32 master weights and
    gradients under ZeRO, partitioned over the trainers), and the engines' KV-cache reservation."""
    from .train_plan import zero_stage

    w = _DTYPE_BYTES.get(cfg.model.dtype, 2)
    sw = _DTYPE_BYTES.get(cfg.sampling.engine.dtype, w)
    s, t = cfg.sampling, cfg.train
    tp = s.engine.tensor_parallel_size
    out = {"samplers": {"weights": n_params * sw / tp / GiB,
                        "kv_cache": max(0.0, s.engine.gpu_memory_utilization * gpu_gib - n_params * sw / tp / GiB)}}
    if t.loss.needs_reference and t.reference_logps == "precomputed":
        out["reference"] = {"weights": n_params * w / GiB}
    stage, n = zero_stage(cfg), t.num_workers
    opt = 12 * n_params  # fp32 master weights + Adam's two moments
    grads = 4 * n_params if w == 4 else 2 * n_params
    train = {"weights": n_params * w / (n if stage == 3 else 1) / GiB,
             "gradients": grads / (n if stage >= 2 else 1) / GiB,
             "optimizer": (0.0 if t.deepspeed.offload_optimizer else opt / (n if stage >= 1 else 1) / GiB)}
    if t.deepspeed.offload_params:
        train["weights"] = 0.0
    if t.reference_logps == "worker" and t.loss.needs_reference:
        train["reference_weights"] = n_params * w / GiB
    out["trainers"] = train
    return out


def describe(cfg: Config, nodes: Optional[list[Node]] = None, gpu_gib: float = 80.0,
             n_params: Optional[int] = None) -> str:
    """The plan as a user reads it (and, given nodes, whether it fits: PlanError if not)."""
    plan = roles(cfg)
    lines = ["role        actors  GPUs each  CPUs each  other"]
    for r in plan:
        other = ", ".join([f"TP {r.tp}"] * (r.tp > 1) + [f"{k}={v:g}" for k, v in r.resources.items()])
        lines.append(f"{r.name:11} {r.actors:6}  {r.gpus:9g}  {r.cpus:9g}  {other}")
    gpus, cpus = sum(r.actors * r.gpus for r in plan), sum(r.actors * r.cpus for r in plan)
    lines.append(f"held at once: {gpus:g} GPUs, {cpus:g} CPUs (one bundle per actor), plus {DATA_CPUS:g} CPU left "
                 "free for the Ray Data stages")
    if shares_gpus(cfg):
        lines.append("placement: colocated (each shared GPU: one sampler engine 0.6 + one trainer 0.4; the engines "
                     "sleep while the trainers train)")
    n_params = n_params or parameter_count(cfg)
    if n_params is None:
        lines.append(f"memory: unknown (no readable config.json at model.path {cfg.model.path}; give --params)")
    elif gpus:
        lines.append(f"memory per GPU for {n_params / 1e9:.2f}B parameters ({cfg.model.dtype}), GiB of a {gpu_gib:g} GiB GPU:")
        for role, parts in memory_per_gpu(cfg, n_params, gpu_gib).items():
            total = sum(parts.values())
            lines.append(f"  {role:10} {total:7.1f}  (" + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + ")")
    if nodes is not None:
        check_roles(cfg)
        placed = check_fit(plan, nodes)
        lines.append(f"fits: {len(placed)} actors on {len({n for _, n in placed})} of {len(nodes)} nodes "
                     f"({sum(n.gpus for n in nodes):g} GPUs, {sum(n.cpus for n in nodes):g} CPUs)")
    return "\n".join(lines)
