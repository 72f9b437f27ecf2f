"""SFT bootstrap of the tiny arithmetic policy (docs/DESIGN.md).

Trains the locally built Llama on `<s>question=solution</s>` (the bare answer, or the worked solution
with `data.arithmetic.format=worked`) until its greedy accuracy on a held-out slice of the train
distribution says stop: every bucket named in `bootstrap.stop_at` at its minimum, or (when that is
empty) the overall accuracy at the middle of `bootstrap.target_accuracy`. So the preference rounds
start from a policy that gets easy questions right and hard ones mostly wrong. Cached by a hash of
everything that determines the result: a rerun with the same config returns instantly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path

from .config import Config
from .failpoints import failpoint

log = logging.getLogger(__name__)

DEV_SIZE = 256


def bootstrap_key(cfg: Config) -> str:
    """Hash of exactly what determines the bootstrapped policy (not run.dir, not the cache dir)."""
    b = cfg.bootstrap.model_dump(mode="json")
    b.pop("cache_dir")
    # n_train (prompts per round) does not enter the SFT; n_test does (test prompts are excluded).
    task = cfg.data.arithmetic.model_dump(mode="json", exclude={"n_train"})
    from .arithmetic import ALPHABET, format_fingerprint  # the tokenizer's vocabulary; the SFT targets' form

    what = {"bootstrap": b, "task": task, "seed": cfg.run.seed, "max_tokens": cfg.sampling.max_tokens,
            "alphabet": ALPHABET}
    if cfg.data.arithmetic.format == "worked":
        what["worked"] = format_fingerprint(cfg.data.arithmetic.fact_steps)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def sft_and_dev_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The bootstrap's SFT rows (the train split's first bootstrap.n_train) and its held-out dev
    slice (the DEV_SIZE rows after them), which early stopping reads."""
    from .arithmetic import make_split

    rows = make_split(cfg.data.arithmetic, "train", n=cfg.bootstrap.n_train + DEV_SIZE)
    return rows[:-DEV_SIZE], rows[-DEV_SIZE:]


def dev_rows(cfg: Config) -> list[dict]:
    """The arithmetic task's dev split (`eval.dev`): the bootstrap's held-out slice, less any
    question a round samples (the train split's first data.arithmetic.n_train rows). Disjoint from
    the test split by construction (the train split excludes it). Generated once per process (every
    round's evaluation asks for it); the caller gets its own copies of the rows."""
    key = json.dumps(cfg.data.arithmetic.model_dump(mode="json"), sort_keys=True)
    return [dict(r) for r in _dev_rows(key, cfg.bootstrap.n_train)]


@functools.lru_cache(maxsize=4)
def _dev_rows(task_json: str, n_sft: int) -> tuple[dict, ...]:
    from .arithmetic import make_split
    from .config import ArithmeticTaskConfig

    task = ArithmeticTaskConfig.model_validate_json(task_json)
    # A split of n rows is a prefix of a longer one: one generation gives the rounds' pool too.
    rows = make_split(task, "train", n=max(n_sft + DEV_SIZE, task.n_train))
    pool = {r["prompt"] for r in rows[: task.n_train]}
    return tuple(r for r in rows[n_sft : n_sft + DEV_SIZE] if r["prompt"] not in pool)


def bootstrap_dir(cfg: Config) -> Path:
    # Absolute: actors and train workers do not share the driver's working directory.
    return Path(cfg.bootstrap.cache_dir).absolute() / bootstrap_key(cfg)


def _batches(rows, tokenizer, batch_size, gen):
    """Right-padded SFT batches with the loss on solution tokens and EOS only."""
    import torch

    order = torch.randperm(len(rows), generator=gen).tolist()
    for i in range(0, len(order) - batch_size + 1, batch_size):
        chunk = [rows[j] for j in order[i : i + batch_size]]
        prompt_ids = [tokenizer(r["prompt"])["input_ids"] for r in chunk]  # BOS + prompt
        answer_ids = [tokenizer(r["gold_solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                      for r in chunk]
        width = max(len(p) + len(a) for p, a in zip(prompt_ids, answer_ids))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
            seq = p + a
            ids[k, : len(seq)] = torch.tensor(seq)
            labels[k, len(p) : len(seq)] = torch.tensor(a)
            mask[k, : len(seq)] = 1
        yield ids, mask, labels


def should_stop(b, dev_accuracy: float, dev_by_bucket: dict[str, float]) -> bool:
    """The early-stopping rule: every bucket in ``b.stop_at`` at its minimum dev accuracy, or, when
    ``stop_at`` is empty, the overall dev accuracy at the middle of ``b.target_accuracy``."""
    if b.stop_at:
        return all(dev_by_bucket.get(k, 0.0) >= v for k, v in b.stop_at.items())
    return dev_accuracy >= sum(b.target_accuracy) / 2


def run_bootstrap(cfg: Config, force: bool = False) -> Path:
    """Return the directory of the bootstrapped policy, training it first unless cached."""
    import torch

    from .arithmetic import ALPHABET, make_split
    from .evaluation import evaluate
    from .generation import HFSampler
    from .graders import get_grader
    from .tiny_model import build_char_tokenizer, build_tiny_model, save_policy

    if cfg.data.source != "arithmetic":
        raise ValueError("bootstrap trains the built-in tiny policy on the arithmetic task; "
                         f"data.source is {cfg.data.source!r} (set model.path to your own model instead)")
    out = bootstrap_dir(cfg)
    if (out / "bootstrap.json").is_file() and not force:
        log.info(f"[bootstrap] cached policy {out}")
        return out

    b = cfg.bootstrap
    t0 = time.time()
    torch.manual_seed(cfg.run.seed)
    tokenizer = build_char_tokenizer(ALPHABET)
    model = build_tiny_model(b.model, tokenizer, seed=cfg.run.seed)
    train_rows, held_out = sft_and_dev_rows(cfg)
    test_rows = make_split(cfg.data.arithmetic, "test")
    grader = get_grader("arithmetic")
    max_tokens = cfg.sampling.max_tokens

    opt = torch.optim.AdamW(model.parameters(), lr=b.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, b.steps) / b.steps))
    )
    gen = torch.Generator().manual_seed(cfg.run.seed)
    target = sum(b.target_accuracy) / 2
    rule = (", ".join(f"{k} >= {v:.2f}" for k, v in b.stop_at.items()) if b.stop_at else f">= {target:.2f}")
    sampler = HFSampler(model, tokenizer)
    step, dev_acc, dev_by, loss_val, done = 0, 0.0, {}, float("nan"), False
    log.info(f"[bootstrap] SFT of a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter policy "
        f"on {len(train_rows)} questions, up to {b.steps} steps; stops at dev accuracy {rule}")
    while step < b.steps:
        for ids, mask, labels in _batches(train_rows, tokenizer, b.batch_size, gen):
            model.train()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            failpoint("bootstrap.step")
            loss_val = loss.item()
            if step % 100 == 0 or step == b.steps:
                model.eval()
                dev = evaluate(sampler, held_out, grader, max_tokens=max_tokens)
                dev_acc, dev_by = dev["greedy_accuracy"], dev["greedy_by_bucket"]
                by = " ".join(f"{k} {v:.2f}" for k, v in dev_by.items())
                log.info(f"[bootstrap] step {step}/{b.steps} loss {loss_val:.3f} dev greedy acc {dev_acc:.3f} "
                    f"({by}) ({time.time() - t0:.0f}s)")
                done = should_stop(b, dev_acc, dev_by)
                if done:
                    break
            if step >= b.steps:
                break
        if done:
            break

    model.eval()
    test = evaluate(sampler, test_rows, grader, max_tokens=max_tokens)
    info = {"steps": step, "seconds": round(time.time() - t0, 1), "final_loss": loss_val, "dev_accuracy": dev_acc,
            "dev_by_bucket": dev_by,
            "test_greedy_accuracy": test["greedy_accuracy"], "test_by_bucket": test["greedy_by_bucket"],
            "target_accuracy": list(b.target_accuracy), "key": bootstrap_key(cfg)}
    # Write to a temp dir and rename: a crash never leaves a half-written cache entry.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(model, tokenizer, tmp)
    (tmp / "bootstrap.json").write_text(json.dumps(info, indent=2))
    failpoint("bootstrap.written")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    lo, hi = b.target_accuracy
    band = "inside" if lo <= test["greedy_accuracy"] <= hi else "OUTSIDE"
    log.info(f"[bootstrap] done in {info['seconds']}s: test greedy accuracy {test['greedy_accuracy']:.3f} "
        f"({band} the target band {lo}-{hi}); by bucket {test['greedy_by_bucket']} -> {out}")
    return out


def check_policy_dir(path: str | Path, key: str = "model.path") -> Path:
    """Refuse a policy directory that is missing, incomplete or not loadable without pickle.

    Checked before any engine or Ray starts, so a wrong path fails in a second with the path and
    what is missing instead of deep inside vLLM or a train worker. Returns the absolute path.
    """
    p = Path(path).expanduser().absolute()
    where = f"{key}: {p}"
    if not p.is_dir():
        raise ValueError(f"{where} is not a directory (expected a local Hugging Face model directory; "
                         "nothing is downloaded at run time)")
    config = p / "config.json"
    if not config.is_file():
        raise ValueError(f"{where} is not a local Hugging Face model directory (no config.json); "
                         "nothing is downloaded at run time")
    try:
        hf_config = json.loads(config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: config.json is not valid JSON ({e})") from None
    if not isinstance(hf_config, dict) or "model_type" not in hf_config:
        raise ValueError(f"{where}: config.json has no 'model_type'; not a transformers model config")
    if not any(p.glob("*.safetensors")):
        # Only safetensors: loading a *.bin / *.pt checkpoint unpickles it, which the project never does.
        pickled = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        msg = f"{where} has no *.safetensors weights"
        if pickled:
            msg += f"; only pickle-based weights {pickled}, which are refused (convert them to safetensors)"
        raise ValueError(msg)
    index = p / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint: every shard it names must be there (partial download)
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{where}: model.safetensors.index.json is unreadable ({e!r})") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ValueError(f"{where}: incomplete checkpoint, shards listed in model.safetensors.index.json "
                             f"are missing: {missing}")
    if not any((p / t).is_file() for t in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"{where} has no tokenizer (tokenizer.json or tokenizer_config.json)")
    from .integrity import IntegrityError, verify_policy_dir

    try:
        verify_policy_dir(p)  # a policy from one of our checkpoints: every file as it was written
    except IntegrityError as e:
        raise ValueError(f"{key}: {e}") from None
    return p


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(cfg: Config) -> str | None:
    """`model.path` when it names a hub repository rather than a local directory, else None."""
    p = cfg.model.path
    if p == "builtin:tiny" or Path(p).expanduser().exists() or not _HUB_ID.fullmatch(p):
        return None
    return p


def check_model_source(cfg: Config) -> None:
    """Before anything starts: a hub id is refused unless downloading is on; a local path is checked."""
    repo = hub_id(cfg)
    if repo is None:
        if cfg.model.path != "builtin:tiny":
            check_policy_dir(cfg.model.path)
        return
    if not cfg.model.allow_download:
        raise ValueError(f"model.path {repo!r} is not a local directory; as a Hugging Face hub id it would be "
                         "downloaded, and downloading is off: set model.allow_download=true, or download it "
                         "yourself and set model.path to the directory")


# Only what a policy needs: safetensors weights (never pickles), its config and tokenizer files.
DOWNLOAD_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.model", "*.txt", "*.tiktoken"]


def download_policy(cfg: Config) -> Path:
    """Fetch the hub id `model.path` (model.allow_download) and return its local snapshot."""
    repo = hub_id(cfg)
    check_model_source(cfg)
    from huggingface_hub import snapshot_download

    log.info("[model] downloading %s from the Hugging Face hub (model.allow_download=true)", repo)
    try:
        path = snapshot_download(repo, cache_dir=cfg.model.download_dir, allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as e:  # noqa: BLE001 - offline mode, no network, no such repo, no access: all one answer
        raise ValueError(f"model.path {repo!r}: could not download it from the Hugging Face hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the network and "
                         "the id, or download it yourself and set model.path to the directory") from None
    return check_policy_dir(path, f"model.path {repo!r} (downloaded)")


def resolve_policy(cfg: Config) -> str:
    """The initial policy: the bootstrapped tiny model for `builtin:tiny`, a hub id's download
    (model.allow_download), else a local HF directory."""
    if cfg.model.path == "builtin:tiny":
        return str(run_bootstrap(cfg))
    if hub_id(cfg) is not None:
        return str(download_policy(cfg))
    return str(check_policy_dir(cfg.model.path))
