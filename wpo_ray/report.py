"""The run report: `<run>/report.html` plus PNGs in `<run>/report/` (paths from `RunLayout`).

`collect(run_dir)` reads what a run directory holds into plain Python / NumPy values (pure: it
writes nothing); `render_html(data, images)` turns that into HTML; `write_report(run_dir)` draws
the figures and writes both. An unfinished run renders what exists and lists what is missing.

The HTML opens from disk with no server: images are referenced as `report/<name>.png`, CSS is
inline, nothing is fetched. Every string read from the run directory is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from .rundir import RunLayout

BUCKET_ORDER = ("easy", "medium", "hard")
CURVES = (("loss", "loss"), ("rewards/margin", "reward margin"), ("rewards/accuracy", "ranking accuracy"),
          ("gamma_po/margin_mean", "GammaPO target margin"))
_MAJ_KEY = re.compile(r"^(maj@\d+)_accuracy$")


# ------------------------------------------------------------------------------------ gathering


def _read_column(d: Path, column: str):
    """One column over every Parquet file of a stage directory, or None when the directory is absent.

    Files are read one by one (only `column`), so files whose other columns differ in type, like
    the loader's bad_rows.parquet next to the pairing skips, still combine.
    """
    if not d.is_dir():
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunks = [pq.read_table(f, columns=[column]).column(column) for f in sorted(d.glob("*.parquet"))]
    chunks = [c.combine_chunks() for c in chunks if len(c)]
    if not chunks:
        return pa.array([], pa.null())
    return pa.concat_arrays([c.cast(chunks[0].type) for c in chunks])


def p_correct(verdicts) -> np.ndarray:
    """P_c = n_correct / n_samples per prompt from a list<string> verdicts array (prompts with no sample left out)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(verdicts) == 0 or pa.types.is_null(verdicts.type):
        return np.zeros(0)
    flat = pc.list_flatten(verdicts).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(verdicts).to_numpy()
    totals = pc.fill_null(pc.list_value_length(verdicts), 0).to_numpy()
    correct = np.bincount(parents, weights=(flat == "correct").astype(float), minlength=len(verdicts))
    keep = totals > 0
    return correct[keep] / totals[keep]


def _read_metrics(path: Path) -> tuple[list[dict], int]:
    """Rows of a metrics.jsonl and the number of unreadable lines (a crash can cut the last one)."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _collect_round(run: RunLayout, r: int, stages: dict) -> dict:
    out_of = lambda name: run.output(r, name)  # noqa: E731
    missing: list[str] = []
    warnings: list[str] = []
    out: dict[str, Any] = {"round": r, "missing": missing, "warnings": warnings}

    ev = out_of("eval.json")
    try:
        out["eval"] = json.loads(ev.read_text()) if ev.exists() else None
    except json.JSONDecodeError as e:
        out["eval"] = None
        warnings.append(f"eval.json is not valid JSON ({e})")
    if not ev.exists():
        missing.append("eval.json")
    out["done"] = (run.key(r, "eval") in stages) if stages else out["eval"] is not None

    if r == 0:  # the initial policy: evaluation only
        out.update(pair_weights=None, p_correct=None, metrics=None, accounting=None)
        return out

    weights = _read_column(out_of("pairs"), "weight")
    out["pair_weights"] = None if weights is None else weights.to_numpy(zero_copy_only=False).astype(float)
    verdicts = _read_column(out_of("graded"), "verdicts")
    out["p_correct"] = None if verdicts is None else p_correct(verdicts)
    reasons = _read_column(out_of("skips"), "reason")
    for name, value in (("graded/", verdicts), ("pairs/", weights), ("skips/", reasons)):
        if value is None:
            missing.append(name)

    metrics_path = run.metrics_file(r)
    if metrics_path.exists():
        out["metrics"], bad = _read_metrics(metrics_path)
        if bad:
            warnings.append(f"train/metrics.jsonl: {bad} unreadable line(s) ignored")
        if not out["metrics"]:
            warnings.append("train/metrics.jsonl holds no steps")
    else:
        out["metrics"] = None
        missing.append("train/metrics.jsonl")

    # Accounting: pairs and skips counted on disk; prompts in from the manifest (it includes the
    # loader's bad rows), else graded prompts + bad_row skips.
    info = stages.get(run.key(r, "pairs")) or {}
    n_pairs = len(weights) if weights is not None else info.get("pairs")
    if reasons is not None:
        n_skips = len(reasons)
        by_reason: dict[str, int] = {}
        for v in reasons.to_pylist():
            by_reason[str(v)] = by_reason.get(str(v), 0) + 1
    else:
        n_skips, by_reason = info.get("skips"), dict(info.get("skip_reasons") or {})
    n_in = info.get("prompts")
    if n_in is None and verdicts is not None and reasons is not None:
        n_in = len(verdicts) + by_reason.get("bad_row", 0)
    for what, disk in (("pairs", n_pairs), ("skips", n_skips)):
        if what in info and disk is not None and info[what] != disk:
            warnings.append(f"manifest records {info[what]} {what}, the files hold {disk}")
    if n_pairs is None and n_skips is None and n_in is None:
        out["accounting"] = None
    else:
        ok = None if None in (n_in, n_pairs, n_skips) else n_in == n_pairs + n_skips
        out["accounting"] = {"prompts": n_in, "pairs": n_pairs, "skips": n_skips,
                             "skip_reasons": dict(sorted(by_reason.items())), "ok": ok}
    return out


def collect(run_dir: str | Path) -> dict:
    """Everything the report shows, read from `run_dir` (writes nothing)."""
    import yaml

    run = RunLayout(run_dir)
    cfg_file = run.config_file
    config_text = cfg_file.read_text(encoding="utf-8", errors="replace") if cfg_file.exists() else None
    try:
        config = yaml.safe_load(config_text or "") or {}
    except yaml.YAMLError:
        config = {}
    if not isinstance(config, dict):
        config = {}
    manifest_file = run.manifest_file
    try:
        manifest = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
    except json.JSONDecodeError:
        manifest = {}
    stages = (manifest.get("stages") or {}) if isinstance(manifest, dict) else {}

    found = run.rounds_on_disk() | {rs[0] for k in stages if (rs := run.parse_key(k))}
    planned = _get(config, "run.rounds")
    planned = planned if isinstance(planned, int) else None
    rounds = [_collect_round(run, r, stages) for r in sorted(found | {0})]

    notes = ["manifest.json is missing, unreadable or empty"] if not stages else []
    if config_text is None:
        notes.append("config.yaml is missing")
    for r in range(1, (planned or 0) + 1):
        if r not in found:
            notes.append(f"round {r}: not started")
    maj_keys = sorted({m.group(1) for rd in rounds if rd["eval"] for k in rd["eval"] if (m := _MAJ_KEY.match(k))})
    return {
        "run_dir": str(run.path),
        "config_text": config_text,
        "header": {
            "loss base": _get(config, "train.loss.base"),
            "weight placement": _get(config, "train.loss.weight_placement"),
            "weighting": _get(config, "weighting.scheme"),
            "alpha": _get(config, "weighting.alpha"),
        },
        "planned_rounds": planned,
        "placement": [(key, role, a.get("node_id"), a.get("ip"), a.get("rank"))
                      for key, info in sorted(stages.items()) if isinstance(info, dict)
                      for role, actors in (info.get("placement") or {}).items() for a in actors],
        "rounds_done": sum(1 for rd in rounds if rd["round"] > 0 and rd["done"]),
        "maj": maj_keys[0] if maj_keys else f"maj@{_get(config, 'eval.maj_n') or 'N'}",
        "rounds": rounds,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------ figures


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def draw_figures(data: dict, out_dir: Path) -> dict[str, str]:
    """Write the PNGs for `data` into out_dir; returns {figure id: file name} for those drawn."""
    # The object-oriented API renders with Agg and touches no global pyplot / backend state.
    from matplotlib.figure import Figure

    images: dict[str, str] = {}
    rounds = data["rounds"]
    maj = data["maj"]

    evals = [(rd["round"], rd["eval"]) for rd in rounds if rd["eval"]]
    if evals:
        fig = Figure(figsize=(6.4, 3.6), layout="constrained")
        ax = fig.add_subplot()
        xs = [r for r, _ in evals]
        ax.plot(xs, [e.get("greedy_accuracy", np.nan) for _, e in evals], "o-", label="greedy")
        if any(f"{maj}_accuracy" in e for _, e in evals):
            ax.plot(xs, [e.get(f"{maj}_accuracy", np.nan) for _, e in evals], "s--", label=maj)
        ax.set(xlabel="round (0 = initial policy)", ylabel="accuracy", ylim=(0, 1), xticks=xs,
               title="Evaluation accuracy per round")
        ax.grid(alpha=0.3)
        ax.legend()
        _save(fig, out_dir / "accuracy.png")
        images["accuracy"] = "accuracy.png"

    for rd in rounds:
        r = rd["round"]
        for key, values, xlabel, color, rng in (
            ("weights", rd.get("pair_weights"), "pair weight", "tab:blue", None),
            ("pc", rd.get("p_correct"), "P_c = n_correct / n_samples", "tab:green", (0, 1)),
        ):
            if values is None or len(values) == 0:
                continue
            fig = Figure(figsize=(4.8, 3.2), layout="constrained")
            ax = fig.add_subplot()
            ax.hist(values, bins=20, range=rng, color=color, edgecolor="white")
            ax.set(xlabel=xlabel, ylabel="count", title=f"round {r}: {xlabel.split(' =')[0]} (n={len(values)})")
            name = f"{key}_{RunLayout.round_name(r)}.png"
            _save(fig, out_dir / name)
            images[f"{key}-{r}"] = name

    trained = [rd for rd in rounds if rd.get("metrics")]
    panels = [(k, t) for k, t in CURVES if any(k in m for rd in trained for m in rd["metrics"])]
    if trained and panels:
        fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
        for i, (k, title) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            for rd in trained:
                pts = [(m.get("step", j), m[k]) for j, m in enumerate(rd["metrics"], 1)
                       if isinstance(m.get(k), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=f"round {rd['round']}")
            ax.set(xlabel="optimizer step", title=title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        _save(fig, out_dir / "training.png")
        images["training"] = "training.png"
    return images


# ------------------------------------------------------------------------------------ HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; padding: 0 1em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #fff; background: #cf222e; font-weight: 700; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: .5em 1em; border-radius: 4px; }
.missing { color: #9a6700; font-style: italic; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 13px; border-radius: 4px; }
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def _bucket_key(b: str):
    return (BUCKET_ORDER.index(b) if b in BUCKET_ORDER else len(BUCKET_ORDER), b)


def _table(head: list[str], rows: list[list[str]]) -> str:
    """`head` is escaped here; cells must already be HTML."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(images: dict, key: str, alt: str) -> str:
    return f'<img src="{RunLayout.REPORT_ASSETS}/{_e(images[key])}" alt="{_e(alt)}">' if key in images else ""


def _accuracy_section(data: dict, images: dict) -> str:
    maj = data["maj"]
    evals = [rd for rd in data["rounds"] if rd["eval"]]
    if not evals:
        return '<p class="missing">No eval.json in any round yet.</p>'
    buckets = sorted({b for rd in evals for k in ("greedy_by_bucket", "maj_by_bucket")
                      for b in (rd["eval"].get(k) or {})}, key=_bucket_key)
    head = ["round", "prompts", "greedy"] + [f"greedy {b}" for b in buckets] + [maj] + [f"{maj} {b}" for b in buckets]
    rows = []
    for rd in data["rounds"]:
        e = rd["eval"]
        if e is None:
            rows.append([str(rd["round"]), '<span class="missing">eval.json missing</span>'] + [""] * (len(head) - 2))
            continue
        gb, mb = e.get("greedy_by_bucket") or {}, e.get("maj_by_bucket") or {}
        rows.append([str(rd["round"]) + (" (initial)" if rd["round"] == 0 else ""), _e(e.get("n_prompts", "—")),
                     _num(e.get("greedy_accuracy"))] + [_num(gb.get(b)) for b in buckets]
                    + [_num(e.get(f"{maj}_accuracy"))] + [_num(mb.get(b)) for b in buckets])
    return _table(head, rows) + _img(images, "accuracy", "accuracy per round")


def _accounting_section(data: dict) -> str:
    acc = [(rd["round"], rd["accounting"]) for rd in data["rounds"] if rd["round"] > 0]
    if not acc:
        return '<p class="missing">No training round started yet.</p>'
    reasons = sorted({k for _, a in acc if a for k in a["skip_reasons"]})
    head = ["round", "prompts in", "pairs", "skips"] + [f"skip: {k}" for k in reasons] + ["prompts = pairs + skips"]
    rows = []
    for r, a in acc:
        if a is None:
            rows.append([str(r), '<span class="missing">no pairs / skips yet</span>'] + [""] * (len(head) - 2))
            continue
        if a["ok"] is True:
            check = '<span class="ok">✓ holds</span>'
        elif a["ok"] is False:
            check = (f'<span class="bad">✗ MISMATCH: {_e(a["prompts"])} ≠ {_e(a["pairs"])} + {_e(a["skips"])}'
                     "</span>")
        else:
            check = '<span class="missing">unknown (counts missing)</span>'
        rows.append([str(r)] + [_e("—" if a[k] is None else a[k]) for k in ("prompts", "pairs", "skips")]
                    + [_e(a["skip_reasons"].get(k, 0)) for k in reasons] + [check])
    return _table(head, rows)


def _training_section(data: dict, images: dict) -> str:
    rows = []
    for rd in data["rounds"]:
        if rd["round"] == 0:
            continue
        m = rd["metrics"]
        if not m:
            why = "train/metrics.jsonl missing" if m is None else "no steps logged"
            rows.append([str(rd["round"]), f'<span class="missing">{why}</span>'] + [""] * 5)
            continue
        last = m[-1]
        tps = [x["tokens_per_s"] for x in m if isinstance(x.get("tokens_per_s"), (int, float))]
        rows.append([str(rd["round"]), _e(last.get("step", len(m))), _num(last.get("loss"), ".4f"),
                     _num(last.get("rewards/margin"), ".4f"), _num(last.get("rewards/accuracy")),
                     _num(last.get("weight/mean")), _num(float(np.mean(tps)) if tps else None, ".0f")])
    if not rows:
        return '<p class="missing">No training round started yet.</p>'
    head = ["round", "steps", "final loss", "final margin", "final ranking acc.", "final weight/mean", "mean tokens/s"]
    return _table(head, rows) + _img(images, "training", "training curves")


def _placement_section(data: dict) -> str:
    rows = [[_e(stage), _e(role if rank is None else f"{role} (rank {rank})"), _e(node or "—"), _e(ip or "—")]
            for stage, role, node, ip, rank in data["placement"]]
    if not rows:
        return '<p class="missing">No stage recorded where its actors ran.</p>'
    return _table(["stage", "actor", "node id", "node IP"], rows)


def render_html(data: dict, images: dict[str, str]) -> str:
    h = data["header"]
    planned = f" of {data['planned_rounds']} planned" if data["planned_rounds"] else ""
    weighting = "—" if h["weighting"] is None else f"{h['weighting']} (alpha = {h['alpha']})"
    kv = [("run directory", data["run_dir"]), ("loss base", h["loss base"] or "—"),
          ("weight placement", h["weight placement"] or "—"), ("weighting", weighting),
          ("rounds done", f"{data['rounds_done']}{planned}"), ("generated", time.strftime("%Y-%m-%d %H:%M:%S"))]
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>wpo-ray report: {_e(data['run_dir'])}</title><style>{_CSS}</style></head><body>",
             "<h1>wpo-ray run report</h1>",
             '<table class="kv">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in kv) + "</table>"]

    notes = list(data["notes"])
    for rd in data["rounds"]:
        notes += [f"round {rd['round']}: missing {m}" for m in rd["missing"]]
        notes += [f"round {rd['round']}: {w}" for w in rd["warnings"]]
        a = rd.get("accounting")
        if a and a["ok"] is False:
            notes.append(f"round {rd['round']}: {a['prompts']} prompts in != {a['pairs']} pairs + {a['skips']} skips")
    if notes:
        parts.append('<div class="note"><b>Incomplete or inconsistent run</b><ul>'
                     + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></div>")

    parts += ["<h2>Accuracy per round</h2>", _accuracy_section(data, images),
              "<h2>Pair / skip accounting</h2>", _accounting_section(data),
              "<h2>Training</h2>", _training_section(data, images),
              "<h2>Weights and P<sub>c</sub> per round</h2>"]
    shown = False
    for rd in data["rounds"]:
        if rd["round"] == 0:
            continue
        shown = True
        figs = _img(images, f"weights-{rd['round']}", "pair weights") + _img(images, f"pc-{rd['round']}", "P_c")
        lacking = [what for what, key in (("pairs", "pair_weights"), ("graded prompts", "p_correct"))
                   if rd[key] is None or len(rd[key]) == 0]
        parts.append(f"<h3>Round {rd['round']}</h3>")
        if lacking:
            parts.append(f'<p class="missing">No {" and no ".join(lacking)} yet.</p>')
        if figs:
            parts.append(f'<div class="figs">{figs}</div>')
    if not shown:
        parts.append('<p class="missing">No training round started yet.</p>')

    parts += ["<h2>Where the actors ran</h2>", _placement_section(data)]
    parts.append("<h2>Config</h2>")
    cfg = data["config_text"]
    parts.append(f"<pre>{_e(cfg)}</pre>" if cfg is not None else '<p class="missing">config.yaml missing</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(run_dir: str | Path) -> Path:
    """Write `<run>/report.html` and its PNGs under `<run>/report/`; returns the HTML path."""
    run = RunLayout(run_dir)
    if not run.config_file.is_file():  # not a run directory: write nothing there
        raise FileNotFoundError(f"{run.path} is not a run directory (no config.yaml); "
                                "pass the run's config, or run.dir=<run directory>")
    data = collect(run.path)
    out_dir = run.report_assets
    out_dir.mkdir(parents=True, exist_ok=True)
    images = draw_figures(data, out_dir)
    for old in out_dir.glob("*.png"):  # figures of an earlier report that no longer apply
        if old.name not in images.values():
            old.unlink()
    path = run.report_file
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(data, images), encoding="utf-8")
    os.replace(tmp, path)
    return path
