"""The report stage: fine-tune results as the BERT paper's GLUE table, pretraining curves as PNGs.

Inputs are stage output dirs, told apart by what they hold: a fine-tune node has `metrics.json`
(one task, one seed), a pretraining stage has `pretrain_manifest.json` (whose MLflow run holds
the metric history the curves are drawn from). Writes:

    report.md           one row per task: mean ± sample std over seeds of every dev metric,
                        the primary metric first; with a `baseline` finetune stage, the lift of
                        every other finetune stage over it per task (same seeds, paired); then
                        the pretraining summary
    results.json        the same numbers, machine-readable
    pretrain_curves.png loss, MLM and NSP accuracy per step of every pretraining stage
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CURVES = ("loss", "mlm_accuracy", "nsp_accuracy", "val_mlm_accuracy", "val_nsp_accuracy", "learning_rate")


def collect_finetunes(inputs: Mapping[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Group fine-tune nodes by stage and task entry ("finetune.sst2"), one metrics dict per seed."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for role, directory in sorted(inputs.items()):
        metrics_file = directory / "metrics.json"
        if not metrics_file.is_file():
            continue
        group = role.rsplit(".seed", 1)[0] if ".seed" in role else role
        groups.setdefault(group, []).append(json.loads(metrics_file.read_text()))
    return groups


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    primary = runs[0]["primary_metric"]
    names = sorted({k for r in runs for k, v in r["metrics"].items() if isinstance(v, (int, float))})
    names = [primary] + [n for n in names if n != primary] if primary in names else names
    table = {}
    for name in names:
        values = [float(r["metrics"][name]) for r in runs if isinstance(r["metrics"].get(name), (int, float))]
        values = [v for v in values if math.isfinite(v)]
        if values:
            table[name] = {"mean": statistics.fmean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                           "n": len(values)}
    baselines = [r["majority_baseline"].get(primary) for r in runs if r.get("majority_baseline")]
    return {"task": runs[0]["task"], "primary_metric": primary, "seeds": sorted(r["seed"] for r in runs),
            "metrics": table, "majority_baseline": baselines[0] if baselines else None}


def _fmt(stat: Mapping[str, float]) -> str:
    scale = 100.0 if abs(stat["mean"]) <= 1.0 else 1.0  # the paper reports GLUE scores x100
    return f"{stat['mean'] * scale:.1f} ± {stat['std'] * scale:.1f}"


def pretrain_history(directory: Path) -> tuple[dict[str, Any], dict[str, list[tuple[int, float]]]]:
    """(manifest, {metric: [(step, value)]}) of a pretraining stage, history read from MLflow."""
    manifest = json.loads((directory / "pretrain_manifest.json").read_text())
    history: dict[str, list[tuple[int, float]]] = {}
    run = manifest.get("mlflow")
    if run:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(run["tracking_uri"])
        for key in CURVES:
            points = client.get_metric_history(run["run_id"], key)
            if points:
                history[key] = sorted((p.step, p.value) for p in points)
    return manifest, history


def lifts(groups: Mapping[str, list[dict[str, Any]]], baseline: str) -> dict[str, dict[str, Any]]:
    """Per finetune group with a baseline twin (`<baseline>.<task entry>`): its primary metric's lift over it.

    Seeds are paired (the same seed: the same head initialisation and batch order), so the lift's
    std is that of the per-seed differences; "beyond seed noise" is lift > the larger of the two stds.
    """
    out = {}
    for group, runs in groups.items():
        stage, _, entry = group.partition(".")
        twin = groups.get(f"{baseline}.{entry}")
        if stage == baseline or twin is None:
            continue
        primary = runs[0]["primary_metric"]
        ours = {r["seed"]: float(r["metrics"][primary]) for r in runs}
        theirs = {r["seed"]: float(r["metrics"][primary]) for r in twin}
        seeds = sorted(set(ours) & set(theirs))
        a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
        spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (a, b, [x - y for x, y in zip(a, b)])]
        lift = statistics.fmean(a) - statistics.fmean(b) if seeds else math.nan
        out[group] = {"baseline": f"{baseline}.{entry}", "primary_metric": primary, "seeds": seeds,
                      "mean": statistics.fmean(a) if seeds else math.nan, "std": spread[0],
                      "baseline_mean": statistics.fmean(b) if seeds else math.nan, "baseline_std": spread[1],
                      "lift": lift, "lift_std": spread[2], "beyond_seed_noise": lift > max(spread[0], spread[1])}
    return out


def _lift_lines(table: Mapping[str, dict[str, Any]]) -> list[str]:
    lines = ["## Lift over the baseline (primary dev metric, same seeds; ×100 for scores in [0, 1])", "",
             "Lift ± the std of the per-seed differences; beyond seed noise: lift > the larger of the two stds.", "",
             "| stage.task | baseline | seeds | score | baseline score | lift | beyond seed noise |",
             "|---|---|---|---|---|---|---|"]
    for group, t in table.items():
        scale = 100.0 if abs(t["mean"]) <= 1.0 else 1.0
        lines.append(f"| {group} | {t['baseline']} | {len(t['seeds'])} | {t['mean'] * scale:.1f} ± {t['std'] * scale:.1f} "
                     f"| {t['baseline_mean'] * scale:.1f} ± {t['baseline_std'] * scale:.1f} "
                     f"| {t['lift'] * scale:+.1f} ± {t['lift_std'] * scale:.1f} | {'yes' if t['beyond_seed_noise'] else 'no'} |")
    return lines + [""]


def write_report(out: Path, inputs: Mapping[str, Path], title: str, baseline: str | None = None) -> dict[str, Any]:
    groups = collect_finetunes(inputs)
    finetune = {group: summarize(runs) for group, runs in groups.items()}
    lift = lifts(groups, baseline) if baseline else {}
    pretrain = {role: pretrain_history(d) for role, d in sorted(inputs.items()) if (d / "pretrain_manifest.json").is_file()}

    lines = [f"# {title}", ""]
    if finetune:
        lines += ["## Fine-tuning (dev, mean ± std over seeds; scores in [0, 1] shown ×100)", "",
                  "Majority class: the score of always predicting the most frequent training label, the floor "
                  "a model that learned nothing reaches.", "",
                  "| task | seeds | primary metric | score | majority class | other metrics |",
                  "|---|---|---|---|---|---|"]
        for group, s in finetune.items():
            primary = s["metrics"].get(s["primary_metric"])
            others = ", ".join(f"{name} {_fmt(stat)}" for name, stat in s["metrics"].items()
                               if name != s["primary_metric"])
            floor = s["majority_baseline"]
            lines.append(f"| {group} ({s['task']}) | {len(s['seeds'])} | {s['primary_metric']} | "
                         f"{_fmt(primary) if primary else 'n/a'} | "
                         f"{'n/a' if floor is None else f'{100 * floor:.1f}'} | {others} |")
        lines.append("")
    if lift:
        lines += _lift_lines(lift)
    if pretrain:
        lines += ["## Pretraining", "",
                  "Held-out MLM accuracy against the most-frequent-token baseline (always predicting the most "
                  "frequent masked token of the held-out examples); NSP against 50% (chance).", "",
                  "| stage | steps | tokens | final loss | final MLM acc (train) | held-out MLM acc | "
                  "most-frequent-token baseline | held-out NSP acc |", "|---|---|---|---|---|---|---|---|"]
        for role, (manifest, history) in pretrain.items():
            def last(key: str) -> str:
                return f"{history[key][-1][1]:.4f}" if history.get(key) else "n/a"
            baseline = manifest.get("val_mlm_majority_baseline")
            lines.append(f"| {role} | {manifest['step']} | {manifest['tokens_seen']:,} | {last('loss')} | "
                         f"{last('mlm_accuracy')} | {last('val_mlm_accuracy')} | "
                         f"{'n/a' if baseline is None else f'{baseline:.4f}'} | {last('val_nsp_accuracy')} |")
        lines += ["", "![pretraining curves](pretrain_curves.png)", ""]
        _plot(out / "pretrain_curves.png", {role: h for role, (_, h) in pretrain.items()})
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    results = {"finetune": finetune, **({"lift": lift} if lift else {}),
               "pretrain": {role: {"step": m["step"], "tokens_seen": m["tokens_seen"],
                                   "most_frequent_token_baseline": m.get("val_mlm_majority_baseline"),
                                   "final": {k: v[-1][1] for k, v in h.items()}}
                            for role, (m, h) in pretrain.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print("\n".join(lines), flush=True)
    return {"finetune_tasks": len(finetune), "pretrain_stages": len(pretrain)}


def _plot(path: Path, histories: Mapping[str, Mapping[str, list[tuple[int, float]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in CURVES if any(k in h for h in histories.values())] or ["loss"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for role, history in histories.items():
            if key in history:
                steps, values = zip(*history[key])
                ax.plot(steps, values, label=role)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
