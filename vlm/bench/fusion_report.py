"""`vlm bench fusion` output: results.csv (one row per job), results.md (seeds averaged) and three plots.

Accuracies are VQA accuracy on the test questions (conflict items excluded; they are scored as the
share of answers that follow the image, `trust_image`, or the note, `trust_note`). Column names are
`<condition>:<group>`: condition `clean`, `no_image`, `no_note`, `no_image_no_note`, or a corruption
and its severity (`noise3`); group `all`, an evidence source, or `type_<question type>`.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .fusion_worker import EVIDENCE_GROUPS

KEYS = ("name", "kind", "strategy", "regime", "dropout", "seed", "status")
SCALARS = ("graceful", "multimodal_gain", "leakage", "text_loss", "steps", "best_eval_step", "stopped_early",
           "trainable_params", "total_params",
           "tokens_per_image", "step_ms", "tokens_s", "peak_mem_mb", "train_s", "eval_s", "wall_s", "eval_loss",
           "final_loss", "error")
CORRUPTED = [f"{kind}{severity}" for kind in ("noise", "blur", "occlusion") for severity in (1, 2, 3)]


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """Scores as `<condition>:<group>` (and `budget:<condition>:<group>`) columns."""
    flat = {k: v for k, v in row.items() if k not in ("scores", "budget_scores")}
    for prefix, scores in (("", row.get("scores") or {}), ("budget:", row.get("budget_scores") or {})):
        for condition, groups in scores.items():
            for group, value in groups.items():
                flat[f"{prefix}{condition}:{group}"] = value
    return flat


def add_graceful(rows: list[dict[str, Any]]) -> None:
    """Graceful-degradation ratio: accuracy with the image missing / the text-only model's on the same
    questions (the text-only row of the same seed, else the mean of all text-only rows)."""
    floor = {r["seed"]: r.get("no_image:all") for r in rows if r["kind"] == "text_only" and r.get("no_image:all")}
    mean_floor = statistics.mean(floor.values()) if floor else None
    for row in rows:
        reference = floor.get(row["seed"], mean_floor)
        if reference and row.get("no_image:all") is not None:
            row["graceful"] = row["no_image:all"] / reference


def add_mmstar(rows: list[dict[str, Any]]) -> None:
    """MMStar's terms (Chen et al. 2024): multimodal gain = accuracy with the image - without it;
    leakage = max(0, accuracy without the image - the base LM's, which never trained on this data)."""
    base = next((r.get("no_image:all") for r in rows if r["kind"] == "base_lm" and r.get("no_image:all") is not None),
                None)
    for row in rows:
        if row.get("clean:all") is None or row.get("no_image:all") is None:
            continue
        row["multimodal_gain"] = row["clean:all"] - row["no_image:all"]
        if base is not None:
            row["leakage"] = max(0.0, row["no_image:all"] - base)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    scored = sorted({k for r in rows for k in r if ":" in k}, key=lambda k: (k.startswith("budget:"), k))
    return [*KEYS, *SCALARS, *scored]


def write_results(out: Path, rows: list[dict[str, Any]], header: str, total_s: float = math.nan) -> None:
    flat = [flatten(r) for r in rows]
    add_graceful(flat)
    add_mmstar(flat)
    cols = columns(flat)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(flat)
    groups = average_seeds(flat)
    lines = [header, ""] + ([f"Wall time so far: {total_s / 60:.1f} min for {len(rows)} jobs.", ""]
                            if not math.isnan(total_s) else [])
    lines += markdown_tables(groups)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    ok = [g for g in groups if g["status"] == "ok"]
    if ok:
        plot_corruption(out / "fusion_corruption.png", ok)
        plot_evidence(out / "fusion_evidence.png", ok)
        plot_params(out / "fusion_params.png", ok)


def bench_variant(header: str) -> str:
    """What sets a bench's rows apart from another's beyond seeds and tested conditions, read from its header
    (vlm/bench/fusion.py): the image shape when not square and the overrides, as space-separated tokens."""
    shape = re.search(r"training (\d+x\d+) px images", header)
    overrides = re.search(r"; overrides: (.*)\.$", header)
    tokens = [f"images={shape.group(1)}"] if shape else []
    if overrides and overrides.group(1) != "none":
        tokens += overrides.group(1).split()
    return " ".join(tokens)


def average_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (name, regime, dropout, variant): numbers as (mean, std over seeds or None, seeds). A
    row's `variant` is its bench's setting (overrides, image shape; set by `merge_results`): rows of merged
    benches that differ in it are kept apart, never averaged as seeds, and labelled by what differs."""
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[(row["name"], row["regime"], row["dropout"], row.get("variant", ""))].append(row)
    shared = set.intersection(*(set(key[3].split()) for key in grouped)) if grouped else set()
    result = []
    for (name, regime, dropout, variant), members in grouped.items():
        ok = [m for m in members if m["status"] == "ok"]
        entry: dict[str, Any] = {"name": name, "regime": regime, "dropout": dropout, "kind": members[0]["kind"],
                                 "variant": " ".join(t for t in variant.split() if t not in shared),
                                 "status": "ok" if ok else "failed", "seeds": len(ok),
                                 "error": next((m.get("error") for m in members if m.get("error")), "")}
        for key in {k for m in ok for k in m} - set(KEYS) - {"error"}:
            values = [float(m[key]) for m in ok if isinstance(m.get(key), (int, float)) and m[key] is not None]
            if values:
                entry[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None)
        result.append(entry)
    return result


def _value(entry: dict[str, Any], key: str) -> float:
    return entry.get(key, (math.nan, None))[0]


def _spread(entry: dict[str, Any], key: str) -> float:
    """The std over seeds (0 with one seed), which the plots draw so a reader sees what is noise."""
    return entry.get(key, (math.nan, None))[1] or 0.0


def _pct(entry: dict[str, Any], key: str) -> str:
    mean, std = entry.get(key, (math.nan, None))
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def _num(entry: dict[str, Any], key: str, fmt: str = "{:,.0f}") -> str:
    mean, std = entry.get(key, (math.nan, None))
    if mean is None or math.isnan(mean):
        return "-"
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if std else "")


def _label(entry: dict[str, Any]) -> list[str]:
    dropout = "all" if entry["kind"] == "text_only" else f"{entry['dropout']:g}"
    name = f"{entry['name']} ({entry['variant']})" if entry.get("variant") else entry["name"]
    return [name, entry["regime"], dropout]


def markdown_tables(groups: list[dict[str, Any]]) -> list[str]:
    def table(title: str, head: list[str], body: list[list[str]], note: str) -> list[str]:
        return [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                *("| " + " | ".join(cells) + " |" for cells in body), "", note, ""]

    key = ["strategy", "regime", "image dropout"]
    failed = [[*_label(g), "failed: " + str(g["error"]).replace("|", "/")] for g in groups if g["status"] != "ok"]
    ok = [g for g in groups if g["status"] == "ok"]
    main = table(
        "Accuracy and cost",
        [*key, "acc @ budget", "acc converged", "steps (best)", "no image", "graceful", "MG", "ML", "noise 3",
         "blur 3", "occlusion 3", "trusts image", "trusts note", "text loss", "trainable", "total", "tokens/image",
         "step ms", "tokens/s", "peak MB", "train s"],
        [[*_label(g), _pct(g, "budget:clean:all"), _pct(g, "clean:all"),
          f"{_num(g, 'steps')} ({_num(g, 'best_eval_step')})", _pct(g, "no_image:all"),
          _num(g, "graceful", "{:.2f}"), _pct(g, "multimodal_gain"), _pct(g, "leakage"), _pct(g, "noise3:all"),
          _pct(g, "blur3:all"), _pct(g, "occlusion3:all"),
          _pct(g, "clean:trust_image"), _pct(g, "clean:trust_note"), _num(g, "text_loss", "{:.3f}"),
          _num(g, "trainable_params"), _num(g, "total_params"), _num(g, "tokens_per_image"), _num(g, "step_ms"),
          _num(g, "tokens_s"), _num(g, "peak_mem_mb"), _num(g, "train_s")] for g in ok] + failed,
        "Accuracy in %, mean ± std over seeds where there are several. `acc @ budget`: at the equal step budget; "
        "`acc converged`: after early stopping (steps run, and the step of the best eval loss); `no image`: the "
        "image dropped; `graceful`: no-image accuracy / the text-only model's; `MG` / `ML`: MMStar's "
        "multimodal gain (clean - no image) and leakage (no image - the base LM's no image, if above 0); "
        "`noise 3` etc.: the strongest corruption; `trusts image / note`: on conflict items, answers that "
        "follow each; `text loss`: the LM's "
        "own loss on held-out plain text (lower is better; the base LM's row is the before). Params exclude a "
        "tower the strategy never runs. step ms is the median step; peak MB the job's process peak (RSS on CPU).",
    )
    conditions = ("clean", "no_image", "no_note", "no_image_no_note")
    evidence = table(
        "Accuracy per evidence source and condition",
        [*key, *(f"{c.replace('_', ' ')}: {e}" for c in conditions for e in EVIDENCE_GROUPS)],
        [[*_label(g), *(_pct(g, f"{c}:{e}") for c in conditions for e in EVIDENCE_GROUPS)] for g in ok],
        "Evidence source of the answer: `image` (no note), `note` (only the note has it), `redundant` (both do), "
        "`complementary` (only both together). With the note removed, `note` items are unanswerable (chance), "
        "as are `image` items with the image removed.",
    )
    robustness = table(
        "Accuracy under corruption (all questions)",
        [*key, "clean", *CORRUPTED, "no image"],
        [[*_label(g), _pct(g, "clean:all"), *(_pct(g, f"{c}:all") for c in CORRUPTED), _pct(g, "no_image:all")]
         for g in ok],
        "Severities 1-3 of Gaussian noise, blur and a grey occluding square (vlm/eval/corruptions.py).",
    )
    tested = [c for c in ("clean", "no_image", *CORRUPTED) if any(g.get(f"{c}:trust_note") for g in ok)]
    conflict = table(
        "Conflict items: which modality the answer follows",
        [*key, "items", *(f"{c.replace('_', ' ')}: {m}" for c in tested for m in ("image", "note"))],
        [[*_label(g), _num(g, "clean:n_conflict"),
          *(_pct(g, f"{c}:trust_{m}") for c in tested for m in ("image", "note"))] for g in ok],
        "The note states a wrong value; `image` / `note`: answers that follow each (they need not sum to 100). "
        "A model that weighs the modalities by their reliability follows the note more as the image degrades.",
    ) if tested else []
    return main + evidence + robustness + conflict


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, axes: Any, path: Path, legend_size: int) -> None:
    """Shared y axis (accuracy in %), the legend in the last panel, written and closed."""
    axes[0].set_ylabel("VQA accuracy (%)")
    axes[0].set_ylim(0, 100)
    axes[-1].legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def plot_corruption(path: Path, groups: list[dict[str, Any]]) -> None:
    """Accuracy vs severity per corruption kind, one line per strategy (a band: ± std over seeds), the
    text-only floor drawn."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    floor = [_value(g, "no_image:all") for g in groups if g["kind"] == "text_only"]
    colours = plt.get_cmap("tab20").colors
    for ax, kind in zip(axes, ("noise", "blur", "occlusion")):
        for i, g in enumerate(g for g in groups if g["kind"] == "vlm"):
            keys = ["clean:all", *(f"{kind}{s}:all" for s in (1, 2, 3)), "no_image:all"]
            ys, err = [100 * _value(g, k) for k in keys], [100 * _spread(g, k) for k in keys]
            ax.plot(range(5), ys, marker="o", linestyle="-" if g["dropout"] == 0 else "--", color=colours[i % 20],
                    label=f"{g['name']} ({g['regime']}, dropout {g['dropout']:g})")
            ax.fill_between(range(5), [y - e for y, e in zip(ys, err)], [y + e for y, e in zip(ys, err)],
                            color=colours[i % 20], alpha=0.15, linewidth=0)
        if floor:
            ax.axhline(100 * floor[0], color="black", linewidth=1, linestyle=":", label="text-only floor")
        ax.set_xticks(range(5), ["clean", "1", "2", "3", "no image"])
        ax.set_title(kind)
        ax.set_xlabel("severity")
        ax.grid(alpha=0.3)
    _save(fig, axes, path, legend_size=7)


def plot_evidence(path: Path, groups: list[dict[str, Any]]) -> None:
    """Per evidence source (and question type), bars per strategy (error bars: std over seeds), with and
    without the image."""
    plt = _pyplot()
    types = sorted({k.split(":type_")[1] for g in groups for k in g if k.startswith("clean:type_")})
    panels = [("clean", EVIDENCE_GROUPS, "image and note present"), ("no_image", EVIDENCE_GROUPS, "image dropped"),
              ("clean", [f"type_{t}" for t in types], "question type, image and note present")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    width = 0.8 / max(len(groups), 1)
    colours = plt.get_cmap("tab20").colors
    for ax, (condition, keys, title) in zip(axes, panels):
        for i, g in enumerate(groups):
            ax.bar([x + i * width for x in range(len(keys))], [100 * _value(g, f"{condition}:{k}") for k in keys],
                   width, yerr=[100 * _spread(g, f"{condition}:{k}") for k in keys], capsize=1.5,
                   label=" ".join(_label(g)), color=colours[i % 20])
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))], [k.replace("type_", "") for k in keys],
                      rotation=20)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    _save(fig, axes, path, legend_size=6)


def plot_params(path: Path, groups: list[dict[str, Any]]) -> None:
    """Clean accuracy vs trainable parameters (log scale), error bars: std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in groups:
        x, y = _value(g, "trainable_params"), 100 * _value(g, "clean:all")
        if x > 0 and not math.isnan(y):
            ax.errorbar([x], [y], yerr=[100 * _spread(g, "clean:all")], fmt="o", capsize=2)
            ax.annotate(" ".join(_label(g)), (x, y), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("VQA accuracy, clean (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
