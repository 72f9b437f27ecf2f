"""Config loading: dotted overrides, and every rejected config names its key and what was expected."""

from pathlib import Path

import pytest

import re

from wpo_ray.config import DEFAULT_LR, ConfigError, apply_override, load_config

ROOT = Path(__file__).resolve().parents[2]


RUN_CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "runtime_env.yaml")


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.train.loss.beta > 0


def test_runtime_env_example_keeps_local_folders_out_of_the_upload():
    import yaml

    env = yaml.safe_load((ROOT / "configs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".venv/", "runs/", ".cache/"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_defaults_and_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.loss.beta=0.2", "sampling.n=4", "train.loss.focal.detach=true",
                             "data.arithmetic.max_digits=2"])
    assert cfg.train.loss.beta == 0.2 and cfg.sampling.n == 4
    assert cfg.train.loss.focal.detach is True and cfg.data.arithmetic.max_digits == 2


def test_override_wins_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  loss:\n    beta: 0.5\n")
    assert load_config(f).train.loss.beta == 0.5
    assert load_config(f, ["train.loss.beta=0.3"]).train.loss.beta == 0.3


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("train.loss.beta=0", "train.loss.beta", "greater than 0"),
        ("train.loss.beta=-1", "train.loss.beta", "greater than 0"),
        ("sampling.n=0", "sampling.n", "greater than or equal to 1"),
        ("weighting.alpha=-0.5", "weighting.alpha", "greater than or equal to 0"),
        ("weighting.eps=0", "weighting.eps", "greater than 0"),
        ("train.loss.label_smoothing=0.5", "train.loss.label_smoothing", "less than 0.5"),
        ("train.loss.label_smoothing=-0.1", "train.loss.label_smoothing", "greater than or equal to 0"),
        ("train.deepspeed.zero_stage=4", "train.deepspeed.zero_stage", "less than or equal to 3"),
        ("train.loss.base=kto", "train.loss.base", "'dpo'"),
        ("sampling.backend=sglang", "sampling.backend", "'vllm'"),
        ("train.loss.weight_placement=both", "train.loss.weight_placement", "'margin'"),
        ("sampling.n=many", "sampling.n", "integer"),
        ("train.lr=fast", "train.lr", "number"),
        ("sampling.engine.gpu_memory_utilization=1.5", "sampling.engine.gpu_memory_utilization", "less than or equal to 1"),
        ("run.rounds=0", "run.rounds", "greater than or equal to 1"),
        ("train.loss.focal.gamma=-1", "train.loss.focal.gamma", "greater than or equal to 0"),
        ("train.loss.gamma_po.tau=0", "train.loss.gamma_po.tau", "greater than 0"),
        ("bootstrap.model.num_heads=8", "bootstrap.model", "head size"),
    ],
)
def test_out_of_range_values_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"  {key}:" in msg, msg
    assert expected in msg, msg


@pytest.mark.parametrize(
    "overrides, key, expected",
    [
        (["train.loss.base=ipo", "train.loss.focal.gamma=2"], "train.loss", "focal.gamma > 0 is defined only"),
        (["train.loss.base=hinge", "train.loss.focal.gamma=1"], "train.loss", "has no ranking probability"),
        (["train.loss.base=ipo", "train.loss.gamma_po.enabled=true"], "train.loss", "gamma_po needs a base"),
        (["train.loss.base=dpo", "train.loss.label_smoothing=0.1"], "train.loss", "label_smoothing applies only"),
        (["data.source=jsonl"], "data", "data.train_path is required"),
        (["data.arithmetic.n_train=500", "data.prompts_per_round=200", "run.rounds=3"], "<root>",
         "data.prompts_per_round=200 for 3 round(s) without reuse needs 600 train prompts; the train split "
         "(data.arithmetic.n_train) has 500"),
        (["bootstrap.stop_at={hard: 1.5}"], "bootstrap", "bootstrap.stop_at: accuracies must be in (0, 1]"),
        (["bootstrap.stop_at={tricky: 0.5}"], "bootstrap.stop_at.tricky.[key]", "'easy'"),
        (["data.arithmetic.format=essay"], "data.arithmetic.format", "'answer'"),
        (["train.optimizer_state=carry", "run.trainers=per_round"], "<root>",
         "train.optimizer_state=carry keeps the optimizer state in the run's one trainer group, but run.trainers "
         "is per_round"),
        (["train.optimizer_state=carry", "run.placement=colocated"], "<root>", "run.placement colocated"),
        (["train.optimizer_state=keep"], "train.optimizer_state", "'restart' or 'carry'"),
    ],
)
def test_undefined_combinations_are_rejected(overrides, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert f"  {key}:" in str(e.value) and expected in str(e.value), str(e.value)


def test_round_windows_take_fresh_prompts_each_round_or_reuse_the_first():
    fresh = load_config(None, ["data.arithmetic.n_train=600", "data.prompts_per_round=200", "run.rounds=3"]).data
    assert [fresh.round_window(600, 3, r) for r in (1, 2, 3)] == [(0, 200), (200, 400), (400, 600)]
    reuse = fresh.model_copy(update={"reuse_prompts": True})
    assert [reuse.round_window(600, 3, r) for r in (1, 2, 3)] == [(0, 200)] * 3
    assert load_config(None, ["data.arithmetic.n_train=300", "data.prompts_per_round=200", "run.rounds=3",
                              "data.reuse_prompts=true"]).data.reuse_prompts
    whole = load_config(None).data  # unset: every round samples the whole split, as before
    assert whole.round_window(256, 2, 2) == (0, 256)
    with pytest.raises(ValueError, match="needs 800 train prompts"):  # `sample --round 4` of a 3-round run
        fresh.round_window(600, 3, 4)


def test_defined_combinations_load():
    assert load_config(None, ["train.loss.base=simpo", "train.loss.gamma_po.enabled=true",
                              "train.loss.focal.gamma=1"]).train.loss.gamma_po.enabled
    assert load_config(None, ["train.loss.base=cdpo", "train.loss.label_smoothing=0.2"]).train.loss.label_smoothing == 0.2


def test_unknown_keys_are_rejected_with_full_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.loss.betta=0.1"])
    assert "train.loss.betta: unknown key" in str(e.value)
    f = tmp_path / "c.yaml"
    f.write_text("sampling:\n  engine:\n    gpu_mem: 0.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "sampling.engine.gpu_mem: unknown key" in str(e.value) and str(f) in str(e.value)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(lst)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["train.loss.beta"])
    with pytest.raises(ConfigError, match="train.lr: Input should be a valid number"):
        load_config(None, ["train.lr.x=1"])
    f = tmp_path / "lr.yaml"
    f.write_text("train:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="train.lr is a value, not a section"):
        load_config(f, ["train.lr.x=1"])


def test_apply_override_builds_nested_sections():
    d = {}
    apply_override(d, "a.b.c=[1, 2]")
    assert d == {"a": {"b": {"c": [1, 2]}}}


def test_digest_depends_on_content_only():
    a = load_config(None, ["train.loss.beta=0.2"])
    b = load_config(None, ["train.loss.beta=0.2"])
    c = load_config(None, ["train.loss.beta=0.3"])
    assert a.digest() == b.digest() != c.digest()
    assert a.digest("bootstrap") == c.digest("bootstrap")


def test_streaming_overlap_needs_one_epoch_and_no_mid_round_checkpoints():
    ok = ["run.overlap=streaming", "train.epochs=1"]
    for refs in ("precomputed", "worker"):
        assert load_config(None, [*ok, f"train.reference_logps={refs}"]).train.reference_logps == refs
    assert load_config(None, [*ok, "train.loss.base=simpo"]).run.overlap == "streaming"
    for bad, expected in [
        (["train.epochs=2"], "train.epochs is 2, expected 1"),
        (["train.checkpoint_every=5"], "train.checkpoint_every must be 0"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            load_config(None, [*ok, *bad])
    with pytest.raises(ConfigError, match="run.overlap"):
        load_config(None, ["run.overlap=sometimes"])


def test_lr_schedule_has_no_step_at_lr_zero_and_follows_warmup_then_linear_decay():
    import torch

    from wpo_ray.train_plan import lr_factor, lr_scheduler

    cfg = load_config(None, ["train.warmup_steps=2", "train.lr=0.01"])
    assert [lr_factor(s, 2, 6) for s in range(1, 7)] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [lr_factor(s, 0, 4) for s in range(1, 5)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # As DeepSpeed drives it: built on the optimizer, stepped after each optimizer step.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    sched = lr_scheduler(cfg, 6)(opt)
    used = []
    for _ in range(6):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([0.005, 0.01, 0.01, 0.0075, 0.005, 0.0025]) and min(used) > 0


def test_memory_keys_reach_the_deepspeed_config_and_bad_combinations_name_the_key():
    from wpo_ray.train_plan import deepspeed_config

    cfg = load_config(None, ["train.deepspeed.zero_stage=3", "train.deepspeed.offload_optimizer=true",
                             "train.deepspeed.offload_params=true", "train.num_workers=2"])
    zero = deepspeed_config(cfg, 10)["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "offload_param" not in deepspeed_config(load_config(None, ["train.deepspeed.zero_stage=3"]), 10)["zero_optimization"]
    with pytest.raises(ConfigError, match="train.deepspeed.*offload_params needs zero_stage 3"):
        load_config(None, ["train.deepspeed.zero_stage=2", "train.deepspeed.offload_params=true"])
    with pytest.raises(ConfigError, match="offload_optimizer needs zero_stage >= 1"):
        load_config(None, ["train.deepspeed.zero_stage=0", "train.deepspeed.offload_optimizer=true"])


def test_bootstrap_stops_when_every_named_bucket_reaches_its_minimum():
    from wpo_ray.bootstrap import should_stop

    b = load_config(None, ["bootstrap.stop_at={easy: 0.7, hard: 0.05}"]).bootstrap
    assert not should_stop(b, 0.9, {"easy": 0.95, "medium": 0.9, "hard": 0.04})
    assert not should_stop(b, 0.9, {"easy": 0.95, "medium": 0.9})  # a bucket not seen is not met
    assert should_stop(b, 0.2, {"easy": 0.7, "medium": 0.0, "hard": 0.05})
    plain = load_config(None).bootstrap  # no stop_at: the middle of target_accuracy, overall
    assert should_stop(plain, 0.5, {}) and not should_stop(plain, 0.49, {"easy": 1.0, "medium": 1.0, "hard": 1.0})


def test_cpu_training_uses_torch_adam_and_gpu_training_the_fused_kernel():
    from wpo_ray.train_plan import deepspeed_config

    # FusedAdam is JIT-built into a shared cache on CPU; a killed build leaves a lock that hangs
    # every later worker, so CPU runs use torch's Adam(W).
    assert deepspeed_config(load_config(None), 10)["optimizer"]["params"]["torch_adam"] is True
    assert deepspeed_config(load_config(None, ["train.use_gpu=true"]), 10)["optimizer"]["params"]["torch_adam"] is False


def test_beta_and_simpo_gamma_default_to_the_loss_authors_values_and_an_explicit_value_wins():
    from wpo_ray.config import LossConfig

    assert (LossConfig(base="simpo").beta, LossConfig(base="simpo").simpo_gamma) == (2.0, 1.0)  # γ/β = 0.5
    assert all(LossConfig(base=b).beta == 0.1 for b in ("dpo", "cdpo", "robust", "hinge", "ipo", "dpop"))
    assert LossConfig(base="simpo", beta=2.5).simpo_gamma == 1.25
    assert LossConfig(base="simpo", beta=1.0).beta == 1.0 and LossConfig(base="simpo", simpo_gamma=0.3).simpo_gamma == 0.3
    # The shipped default config leaves β to the base: switching the loss switches the β.
    assert load_config(ROOT / "configs" / "tiny-cpu.yaml", ["train.loss.base=simpo"]).train.loss.beta == 2.0
    assert load_config(ROOT / "configs" / "tiny-cpu.yaml").train.loss.beta == 0.1


def test_lr_null_takes_the_recipe_s_rate_for_the_loss_and_an_explicit_lr_wins():
    by_base = "train.lr_by_base={dpo: 3.0e-5, dpop: 1.0e-4}"
    assert load_config(None, ["train.lr=null", by_base, "train.loss.base=dpo"]).train.lr == 3e-5
    assert load_config(None, ["train.lr=null", by_base, "train.loss.base=dpop"]).train.lr == 1e-4
    # A base the recipe does not name: the default; an explicit train.lr: that one.
    assert load_config(None, ["train.lr=null", by_base, "train.loss.base=ipo"]).train.lr == DEFAULT_LR
    assert load_config(None, ["train.lr=2e-4", by_base, "train.loss.base=dpo"]).train.lr == 2e-4


@pytest.mark.parametrize("bad, says", [("train.lr_by_base={dpo: 0}", "must be > 0"),
                                       ("train.lr_by_base={dpx: 1.0e-4}", "train.lr_by_base.dpx")])
def test_lr_by_base_refuses_bad_entries_naming_the_key(bad, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        load_config(None, [bad])


def test_tiny_default_learning_rates_per_loss():
    """The embedded default's per-loss rates (chosen on the dev split: docs/RESULTS.md) reach the
    trainer when only the base is overridden."""
    for base in ("dpop", "dpo", "ipo", "simpo"):
        cfg = load_config(ROOT / "configs" / "tiny-cpu.yaml", [f"train.loss.base={base}"])
        assert cfg.train.lr == cfg.train.lr_by_base[base]
