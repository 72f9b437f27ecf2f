"""The k8s/ manifests against the KubeRay CRD schemas (docs/DESIGN.md, Deployment), so that a
misspelt field or a wrong type fails here instead of at deploy time.

The CRDs (`ray.io_rayclusters.yaml`, `ray.io_rayjobs.yaml`) are kept in `tests/data/kuberay-crds/`
(source and KubeRay version in its README.md); WPO_KUBERAY_CRDS may point at another directory
holding the same two files. Their `openAPIV3Schema` is a Kubernetes
*structural* schema, which plain jsonschema reads too leniently; `k8s_to_jsonschema` turns it into
what the API server enforces under strict field validation (`kubectl apply --validate=strict`):

- an object schema is closed (`additionalProperties: false`) unless it says
  `x-kubernetes-preserve-unknown-fields: true` or already has `additionalProperties` (a map);
- `x-kubernetes-int-or-string` becomes `anyOf: [integer, string]`, `nullable` adds `null`;
- `x-kubernetes-list-type: set|map` become uniqueness checks (map: by `x-kubernetes-list-map-keys`,
  with their defaults), `format: int32|int64` a range check;
- `x-kubernetes-validations` (CEL): transition rules (`oldSelf`) do not apply to a create; any
  other rule is not evaluated here, so a manifest that sets a field guarded by one is reported;
- the root `metadata` (ObjectMeta, checked by the API server itself, `type: object` in the CRD)
  is replaced by a closed subset: name, generateName, namespace, labels, annotations;
- an extension this module does not know fails the test instead of being ignored.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
MANIFESTS = {"RayCluster": K8S / "raycluster.yaml", "RayJob": K8S / "rayjob.yaml"}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# The KubeRay CRDs the manifests are checked against; tests/data/kuberay-crds/README.md says which.
CRD_DIR = REPO / "tests" / "data" / "kuberay-crds"
KINDS = sorted(MANIFESTS)

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB: libyaml keeps this fast


# ------------------------------------------------------------------------------ schema conversion

KNOWN_EXTENSIONS = {
    "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",  # merge semantics only (granular / atomic): nothing to validate
    "x-kubernetes-validations",
}

# The ObjectMeta fields a manifest of ours may set; closed, so `metadata.nmae` fails.
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "generateName": {"type": "string"},
        "namespace": {"type": "string", "maxLength": 63, "pattern": DNS1123_SUBDOMAIN},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
}

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")  # name -> schema
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf")  # [schema]
_SCHEMA_ONE = ("items", "additionalProperties", "not", "additionalItems")  # schema (or bool)


def k8s_to_jsonschema(node: Any, path: str = "#") -> Any:
    """A copy of a Kubernetes structural schema that jsonschema validates as the API server does."""
    if not isinstance(node, dict):
        return node
    unknown = [k for k in node if k.startswith("x-") and k not in KNOWN_EXTENSIONS]
    if unknown:
        raise ValueError(f"{path}: Kubernetes schema extension(s) {unknown} not handled by this test")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS:
            out[key] = {name: k8s_to_jsonschema(sub, f"{path}/{key}/{name}") for name, sub in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [k8s_to_jsonschema(sub, f"{path}/{key}/{i}") for i, sub in enumerate(value)]
        elif key in _SCHEMA_ONE:
            out[key] = k8s_to_jsonschema(value, f"{path}/{key}")
        else:
            out[key] = copy.deepcopy(value)

    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") is True and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", copy.deepcopy(OBJECT_META) | {"additionalProperties": False})
    is_object = out.get("type") == "object" or "properties" in out
    if (
        is_object
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        # Structural schemas prune (strict validation: reject) every field they do not list.
        out["additionalProperties"] = False
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _list_type(validator, list_type, instance, schema):
    if not isinstance(instance, list):
        return
    if list_type == "set":
        seen: set[str] = set()
        for item in instance:
            key = _canonical(item)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry {item!r} in a list of type set")
            seen.add(key)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = (schema.get("items") or {}).get("properties", {})
        seen_keys: set[str] = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            ident = {k: item.get(k, props.get(k, {}).get("default")) for k in keys}
            key = _canonical(ident)
            if key in seen_keys:
                yield jsonschema.ValidationError(f"duplicate entry with keys {ident} in a list of type map")
            seen_keys.add(key)


def _cel_rules(validator, rules, instance, schema):
    for rule in rules:
        if "oldSelf" in rule.get("rule", ""):
            continue  # a transition rule: only applies to updates
        yield jsonschema.ValidationError(
            f"this field is guarded by a CEL rule that this test does not evaluate "
            f"({rule.get('rule')!r}: {rule.get('message')!r}); check it by hand, then extend the test"
        )


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


# OpenAPI v3.0 schemas follow JSON Schema draft 4 (e.g. boolean exclusiveMinimum).
K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


def make_validator(openapi_schema: dict) -> jsonschema.protocols.Validator:
    schema = copy.copy(openapi_schema)
    if "metadata" in schema.get("properties", {}):
        schema["properties"] = dict(schema["properties"], metadata=OBJECT_META)
    return K8sValidator(k8s_to_jsonschema(schema), format_checker=_FORMATS)


# ------------------------------------------------------------------------------ loading


def crd_dir() -> Path:
    env = os.environ.get("WPO_KUBERAY_CRDS")
    where = Path(env) if env else CRD_DIR
    if not where.is_dir():
        pytest.fail(
            f"KubeRay CRD schemas not found at {where.resolve()} "
            f"({'from WPO_KUBERAY_CRDS' if env else 'the copy kept in the repository'}). "
            f"Restore {CRD_DIR.relative_to(REPO)}/ from git, or set WPO_KUBERAY_CRDS to a directory "
            f"holding {' and '.join(CRD_FILES.values())}.",
            pytrace=False,
        )
    return where


@lru_cache(maxsize=None)
def _crd(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def crd(kind: str) -> dict:
    path = crd_dir() / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"{path} is missing from the KubeRay CRD directory", pytrace=False)
    return _crd(str(path))


def crd_v1_schema(kind: str) -> dict:
    doc = crd(kind)
    assert doc["kind"] == "CustomResourceDefinition" and doc["spec"]["group"] == "ray.io"
    assert doc["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in doc["spec"]["versions"]}
    assert "v1" in versions, f"{CRD_FILES[kind]} has no v1 version (has {sorted(versions)})"
    assert versions["v1"]["served"], f"{CRD_FILES[kind]}: v1 is not served"
    return versions["v1"]["schema"]["openAPIV3Schema"]


@lru_cache(maxsize=None)
def _validator(kind: str, where: str):
    return make_validator(crd_v1_schema(kind))


def validator(kind: str):
    return _validator(kind, str(crd_dir()))


def manifest(kind: str) -> dict:
    path = MANIFESTS[kind]
    assert path.is_file(), f"{path} is missing"
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, found {len(docs)}"
    return docs[0]


def schema_errors(kind: str, doc: dict) -> list[str]:
    errors = sorted(validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


# ------------------------------------------------------------------------------ helpers


def at(doc: Any, path: tuple) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def mutated(doc: dict, path: tuple, value: Any) -> dict:
    """A deep copy of doc with doc[path] = value (the parent must exist)."""
    doc = copy.deepcopy(doc)
    at(doc, path[:-1])[path[-1]] = value
    return doc


def cluster_spec(kind: str, doc: dict) -> dict:
    return doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]


def pod_specs(node: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every pod spec (a mapping with a `containers` list) anywhere in the document."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield path, node
        for key, value in node.items():
            yield from pod_specs(value, f"{path}.{key}" if path else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{path}[{i}]")


def ray_pod_specs(kind: str, doc: dict) -> dict[str, dict]:
    spec = cluster_spec(kind, doc)
    out = {"head": spec["headGroupSpec"]["template"]["spec"]}
    for group in spec.get("workerGroupSpecs", []):
        out[group["groupName"]] = group["template"]["spec"]
    return out


_QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$")
_SUFFIX = {None: 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3,
           "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(q: int | str) -> Decimal:
    """A Kubernetes resource quantity ("500m", "64Gi", 1) as a number."""
    if isinstance(q, int) and not isinstance(q, bool):
        return Decimal(q)
    m = _QUANTITY.match(str(q))
    assert m, f"not a Kubernetes quantity: {q!r}"
    number, exponent, suffix = m.groups()
    value = Decimal(number) * Decimal(_SUFFIX[suffix])
    return value * (Decimal(10) ** int(exponent[1:])) if exponent else value


def pyproject_ray_version() -> str:
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    m = re.search(r'"ray\[[^\]]*\]==([0-9][0-9A-Za-z.]*)"', text)
    assert m, "pyproject.toml pins no ray[...]==X"
    return m.group(1)


# ------------------------------------------------------------------------------ the converter itself


def test_converter_closes_objects_and_handles_k8s_extensions():
    schema = {
        "type": "object",
        "properties": {
            "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
            "open": {"type": "object", "properties": {"a": {"type": "string"}},
                     "x-kubernetes-preserve-unknown-fields": True},
            "map": {"type": "object", "additionalProperties": {"type": "string"}},
            "qty": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "port": {"x-kubernetes-int-or-string": True},
            "n": {"type": "integer", "format": "int32"},
            "when": {"type": "string", "nullable": True},
            "env": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "ports": {"type": "array", "x-kubernetes-list-type": "map",
                      "x-kubernetes-list-map-keys": ["port", "protocol"],
                      "items": {"type": "object", "properties": {
                          "port": {"type": "integer"}, "protocol": {"type": "string", "default": "TCP"}}}},
            "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
            "managedBy": {"type": "string", "x-kubernetes-validations": [
                {"rule": "self == oldSelf", "message": "immutable"}]},
            "policy": {"type": "string", "x-kubernetes-validations": [
                {"rule": "self in ['a']", "message": "must be a"}]},
        },
    }
    v = K8sValidator(k8s_to_jsonschema(schema), format_checker=_FORMATS)

    def ok(doc):
        return not list(v.iter_errors(doc))

    assert ok({"closed": {"a": "x"}, "open": {"a": "x", "extra": 1}, "map": {"any": "thing"}})
    assert not ok({"closed": {"a": "x", "extra": 1}})
    assert not ok({"typo": 1})  # the root object is closed too
    assert ok({"qty": 1}) and ok({"qty": "1Gi"}) and ok({"port": 8080}) and ok({"port": "http"})
    assert not ok({"qty": 1.5}) and not ok({"qty": True}) and not ok({"port": [1]})
    assert ok({"n": 2**31 - 1}) and not ok({"n": 2**31}) and not ok({"n": "1"})
    assert ok({"when": None}) and ok({"when": "2026-01-01T00:00:00Z"})
    assert ok({"env": [{"name": "A"}, {"name": "B"}]}) and not ok({"env": [{"name": "A"}, {"name": "A"}]})
    assert ok({"ports": [{"port": 1}, {"port": 1, "protocol": "UDP"}]})
    assert not ok({"ports": [{"port": 1}, {"port": 1, "protocol": "TCP"}]})  # protocol defaults to TCP
    assert ok({"tags": ["a", "b"]}) and not ok({"tags": ["a", "a"]})
    assert ok({"managedBy": "x"})  # transition rules do not apply to a create
    assert not ok({"policy": "a"})  # a CEL rule we cannot evaluate is reported, not ignored
    with pytest.raises(ValueError, match="x-kubernetes-new-thing"):
        k8s_to_jsonschema({"type": "object", "x-kubernetes-new-thing": True})


def test_crd_schemas_are_kept_in_the_repository():
    """The default CRD directory is inside the repository, so a fresh clone runs these tests."""
    assert CRD_DIR.resolve().is_relative_to(REPO), CRD_DIR
    for name in CRD_FILES.values():
        assert (CRD_DIR / name).is_file(), f"{CRD_DIR / name} is missing"
    readme = (CRD_DIR / "README.md").read_text(encoding="utf-8")
    assert "ray-project/kuberay" in readme, "the CRD README must say where the schemas come from"


# ------------------------------------------------------------------------------ schema validation


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_validates_against_the_crd(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    errors = schema_errors(kind, doc)
    assert not errors, (f"{MANIFESTS[kind].name} does not validate against the KubeRay {kind} v1 CRD:\n"
                        + "\n".join(errors))
    # KubeRay's own metadata checks: a DNS-1035 label, and room for the suffixes it appends.
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{name!r} is not a DNS-1035 label"
    assert len(name) <= (63 if kind == "RayCluster" else 57), f"{kind} name {name!r} is too long for KubeRay"


UNKNOWN_FIELDS = [
    ("RayCluster", ("metadata", "bogusField")),
    ("RayCluster", ("spec", "headGroupSpec", "bogusField")),
    ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "securityContext", "bogusField")),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "bogusField")),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "volumes", 0, "emptyDir", "bogusField")),
    ("RayJob", ("spec", "bogusField")),
    ("RayJob", ("spec", "rayClusterSpec", "headGroupSpec", "bogusField")),
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0,
                "volumeMounts", 0, "bogusField")),
    ("RayJob", ("spec", "submitterPodTemplate", "spec", "containers", 0, "bogusField")),
]


@pytest.mark.parametrize("kind,path", UNKNOWN_FIELDS, ids=[".".join(map(str, p)) for _, p in UNKNOWN_FIELDS])
def test_unknown_field_is_rejected(kind, path):
    errors = schema_errors(kind, mutated(manifest(kind), path, "x"))
    assert any("bogusField" in e for e in errors), f"an unknown field at {path} was accepted: {errors}"


WRONG_VALUES = [
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "replicas"), "two"),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "maxReplicas"), 2**31),  # int32 overflow
    ("RayCluster", ("spec", "rayVersion"), 2.6),
    ("RayCluster", ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # values are strings
    ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "securityContext",
                    "runAsNonRoot"), "true"),
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources",
                    "limits", "memory"), "lots"),  # not a quantity
    ("RayCluster", ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources",
                    "limits", "cpu"), 0.5),  # int-or-string: a float is neither
    ("RayJob", ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "replicas"), "two"),
    ("RayJob", ("spec", "shutdownAfterJobFinishes"), "yes"),
    ("RayJob", ("spec", "ttlSecondsAfterFinished"), "3600"),
    ("RayJob", ("spec", "entrypoint"), ["python", "-m", "jobs.run"]),
]


@pytest.mark.parametrize("kind,path,value", WRONG_VALUES,
                         ids=[f"{'.'.join(map(str, p))}={v!r}" for _, p, v in WRONG_VALUES])
def test_wrong_type_or_value_is_rejected(kind, path, value):
    doc = manifest(kind)
    at(doc, path)  # the field exists in the manifest: we change it, not add it
    assert schema_errors(kind, mutated(doc, path, value)), f"{path} = {value!r} was accepted"


def test_duplicate_list_map_keys_are_rejected():
    doc = manifest("RayCluster")
    mounts = ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "volumeMounts")
    dup = mutated(doc, mounts, at(doc, mounts) + [dict(at(doc, mounts)[0], name="other")])
    assert any("duplicate" in e for e in schema_errors("RayCluster", dup))


def test_integer_quantities_are_accepted():
    """int-or-string fields take an integer too (memory in bytes, GPUs as a count)."""
    doc = manifest("RayCluster")
    limits = ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits")
    doc = mutated(doc, (*limits, "memory"), 64 * 2**30)
    assert not schema_errors("RayCluster", doc)


# ------------------------------------------------------------------------------ policy checks


@pytest.mark.parametrize("kind", KINDS)
def test_every_pod_and_container_runs_non_root_with_resources(kind):
    doc = manifest(kind)
    pods = list(pod_specs(doc))
    # head + the GPU group (+ the RayJob's submitter pod): nothing is left out of the walk.
    assert len(pods) == (2 if kind == "RayCluster" else 3), [p for p, _ in pods]
    for where, pod in pods:
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot is not true"
        assert psc.get("runAsUser") == 1000, f"{where}: pod securityContext.runAsUser is not 1000"
        assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
        containers = pod["containers"] + pod.get("initContainers", []) + pod.get("ephemeralContainers", [])
        for c in containers:
            here = f"{where} container {c.get('name')!r}"
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot") is True, f"{here}: runAsNonRoot is not true"
            assert sc.get("runAsUser") == 1000, f"{here}: runAsUser is not 1000"
            assert sc.get("allowPrivilegeEscalation") is False, f"{here}: allowPrivilegeEscalation is not false"
            assert not sc.get("privileged"), f"{here}: privileged"
            caps = sc.get("capabilities") or {}
            assert "ALL" in caps.get("drop", []), f"{here}: capabilities do not drop ALL"
            assert not caps.get("add"), f"{here}: adds capabilities {caps.get('add')}"

            res = c.get("resources") or {}
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for r in ("cpu", "memory"):
                assert r in requests and r in limits, f"{here}: resources.requests/limits lack {r}"
            for r, want in requests.items():
                if r in limits:
                    assert quantity(want) <= quantity(limits[r]), f"{here}: {r} request {want} > limit {limits[r]}"
            for r in set(requests) | set(limits):
                if "/" in r:  # extended resources (GPUs) cannot be overcommitted: request == limit
                    assert r in limits and quantity(requests.get(r, limits[r])) == quantity(limits[r]), (
                        f"{here}: extended resource {r} needs a limit equal to its request")


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_workers_cpu_head_shared_memory_and_run_volume(kind):
    doc = manifest(kind)
    spec = cluster_spec(kind, doc)
    assert spec["workerGroupSpecs"], "no worker group"
    for name, pod in ray_pod_specs(kind, doc).items():
        ray = pod["containers"][0]  # KubeRay's Ray container is the first
        res = ray["resources"]
        gpus = quantity(res["limits"].get("nvidia.com/gpu", 0))
        if name == "head":
            assert gpus == 0 and "nvidia.com/gpu" not in res.get("requests", {}), "the head must not take a GPU"
        else:
            assert gpus >= 1, f"worker group {name!r} requests no nvidia.com/gpu"

        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: m["name"] for m in ray.get("volumeMounts", [])}
        shm = volumes.get(mounts.get("/dev/shm"), {}).get("emptyDir")
        assert shm is not None and shm.get("medium") == "Memory", f"{name}: no memory-backed /dev/shm emptyDir"
        if "sizeLimit" in shm:  # a memory emptyDir is charged to the container's memory limit
            assert quantity(shm["sizeLimit"]) < quantity(res["limits"]["memory"]), f"{name}: /dev/shm >= memory limit"
        runs = volumes.get(mounts.get("/runs"), {}).get("persistentVolumeClaim")
        assert runs and runs.get("claimName"), f"{name}: /runs is not a mounted PVC"

    for group in spec["workerGroupSpecs"]:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        assert 0 <= lo <= group.get("replicas", lo) <= hi, f"{group['groupName']}: replicas not within min/max"


@pytest.mark.parametrize("kind", KINDS)
def test_head_service_is_cluster_internal(kind):
    doc = manifest(kind)
    head = cluster_spec(kind, doc)["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not head.get("enableIngress")
    assert (head.get("headService") or {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    # KubeRay's default binds the dashboard to 0.0.0.0 inside the pod, reached through that service.
    assert head.get("rayStartParams", {}).get("dashboard-host", "0.0.0.0") == "0.0.0.0"
    text = MANIFESTS[kind].read_text(encoding="utf-8")
    assert not re.search(r"^\s*[^#\s][^#]*\b(LoadBalancer|NodePort)\b", text, re.M), "exposes a LoadBalancer/NodePort"


def test_rayjob_lifecycle_entrypoint_and_runtime_env():
    spec = manifest("RayJob")["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    ttl = spec.get("ttlSecondsAfterFinished")
    assert isinstance(ttl, int) and ttl > 0, "ttlSecondsAfterFinished must be set (> 0)"

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env.get("working_dir"), "runtimeEnvYAML needs a working_dir"

    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("python -m jobs.run --config configs/"), entrypoint
    argv = shlex.split(entrypoint)
    config = argv[argv.index("--config") + 1]
    overrides = dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))
    assert overrides.get("run.dir", "").startswith("/runs/"), "run.dir must point into the /runs volume"
    assert (REPO / config).is_file(), f"{config}, named by the RayJob entrypoint, does not exist in the repository"


def test_rayjob_recipe_fits_its_cluster():
    """The recipe the RayJob runs gets the GPUs it holds at once, and finds its paths mounted."""
    from wpo_ray.config import load_config

    doc = manifest("RayJob")
    argv = shlex.split(doc["spec"]["entrypoint"])
    config = REPO / argv[argv.index("--config") + 1]
    if not config.is_file():
        pytest.fail(f"{config.relative_to(REPO)}, named by the RayJob entrypoint, does not exist", pytrace=False)
    cfg = load_config(config, [a for a in argv[argv.index("--config") + 2:] if "=" in a and not a.startswith("-")])

    # The resource plan (wpo_ray/plan.py) places every actor of the run on the cluster's pods.
    from wpo_ray.plan import check_fit, check_roles, nodes_from_raycluster, roles

    assert cfg.train.reference.num_gpus_per_actor > 0, "a GPU recipe's reference forward would run on a CPU"
    check_roles(cfg)
    check_fit(roles(cfg), nodes_from_raycluster(doc, "k8s/rayjob.yaml"))

    paths = [cfg.run.dir, cfg.model.path, cfg.data.train_path, cfg.data.test_path]
    for name, pod in ray_pod_specs("RayJob", doc).items():
        mounts = [m["mountPath"].rstrip("/") for m in pod["containers"][0].get("volumeMounts", [])]
        for p in (p for p in paths if p and p.startswith("/")):
            assert any(p == m or p.startswith(m + "/") for m in mounts), f"{name}: {p} is on no mounted volume"


@pytest.mark.parametrize("recipe", ["qwen2-7b-gsm8k.yaml", "qwen2-7b-math.yaml"])
def test_every_gpu_recipe_fits_the_shipped_cluster(recipe):
    from wpo_ray.config import load_config
    from wpo_ray.plan import check_fit, check_roles, nodes_from_raycluster, roles

    cfg = load_config(REPO / "configs" / recipe)
    check_roles(cfg)
    placed = check_fit(roles(cfg), nodes_from_raycluster(manifest("RayCluster"), "k8s/raycluster.yaml"))
    assert not any(node == "head" for _, node in placed), "nothing may land on the CPU head (num-cpus 0)"


def test_rayjob_cluster_is_the_raycluster():
    assert manifest("RayJob")["spec"]["rayClusterSpec"] == manifest("RayCluster")["spec"], (
        "k8s/rayjob.yaml spec.rayClusterSpec and k8s/raycluster.yaml spec have drifted apart; keep them identical")


@pytest.mark.parametrize("kind", KINDS)
def test_ray_version_matches_pyproject_and_one_image_everywhere(kind):
    want = pyproject_ray_version()
    doc = manifest(kind)
    got = cluster_spec(kind, doc)["rayVersion"]
    assert got == want, f"{MANIFESTS[kind].name}: rayVersion {got!r} != ray=={want} pinned in pyproject.toml"
    # Head, workers and submitter must run the same Ray and project code.
    images = {c["image"] for _, pod in pod_specs(doc) for c in pod["containers"]}
    assert len(images) == 1, f"{MANIFESTS[kind].name} uses several images: {sorted(images)}"
