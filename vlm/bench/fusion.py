"""`vlm bench fusion`: which fusion strategy to pick, measured on a task where both modalities carry evidence.

One data build (the evidence-bearing synthetic set, vlm/embedded/evidence.py), one set of test
conditions (image present / dropped / corrupted at three severities of three kinds, note present /
absent), one frozen-feature cache shared by every strategy that reads the tower. Then one job per
strategy x regime x training image-dropout x seed, each in its own process (its peak memory is its
own; a crash is written into its row), plus two baselines: a text-only model (the same LM fine-tuned
on the same data with every image removed) and the frozen base LM. Results are rewritten after every
job: DIR/results.csv, DIR/results.md and three plots (vlm/bench/fusion_report.py).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..data.dropout import check_dropped_image
from ..embedded.synthetic import canvas_size
from ..progress import progress_bar
from .fusion_report import bench_variant, write_results

STRATEGY_OVERRIDES: dict[str, list[str]] = {
    "early": ["model.fusion=early"],
    "projector": ["model.fusion=projector"],
    "projector_mlp": ["model.fusion=projector", "model.projector.type=mlp2x_gelu"],
    "resampler": ["model.fusion=resampler", "model.resampler.latents=16"],
    "resampler_64": ["model.fusion=resampler", "model.resampler.latents=64"],
    "cross_attention": ["model.fusion=cross_attention", "model.cross_attention.every_n_layers=1"],
    # A question-blind vision head can only answer VQA combined as a product with the question-aware LM.
    "late": ["model.fusion=late", "model.late.combine=product"],
    "late_mixture": ["model.fusion=late", "model.late.combine=mixture"],
}
"""Named variants applied before the user's overrides; any other name means `model.fusion=<name>`."""

REGIME_OVERRIDES: dict[str, list[str]] = {
    "align": ["train.stage=align"],
    "finetune": ["train.stage=finetune"],
    "lora": ["train.stage=finetune", "train.lora.enabled=true"],
}
"""What trains: the fusion only (frozen LM), the fusion and the LM, or the fusion and LoRA adapters."""

CORRUPTIONS = ("noise", "blur", "occlusion")
SEVERITIES = (1, 2, 3)

SECONDS_PER_JOB = {"early": 170, "cross_attention": 190, "late": 150, "text_only": 120, "base_lm": 25}
"""Rough wall time of one job of the default run on a quiet 2-core CPU, for the estimate printed first."""
DEFAULT_SECONDS = 150


@dataclass
class Job:
    """One row: `kind` is `vlm`, `text_only` (trained and scored without images) or `base_lm` (no training)."""

    name: str
    kind: str
    strategy: str
    regime: str
    dropout: float
    seed: int
    dropped_image: str = "remove"
    """Where a dropped image goes, in training and in the no-image test conditions (vlm/data/dropout.py)."""
    corruption: float = 0.0
    """`train.image_corruption`: the share of training images corrupted at random (ModDrop-style)."""

    @property
    def folder(self) -> str:
        return f"{self.name}__{self.regime}__drop{self.dropout:g}__seed{self.seed}"


def strategy_overrides(strategy: str) -> list[str]:
    return list(STRATEGY_OVERRIDES.get(strategy, [f"model.fusion={strategy}"]))


def plan_jobs(strategies: list[str], regimes: list[str], dropouts: list[float], seeds: list[int],
              text_only: bool = True, dropped_images: list[str] = ("remove",),
              corruptions: list[float] = (0.0,)) -> list[Job]:
    """Baselines first (the text-only floor is every later row's reference), then the grid. A `blank`
    job is named `<strategy>+blank` (its own row) and only planned with dropout > 0, where it differs;
    one trained with corrupted images `<strategy>+corrupt<p>`."""
    if any(not 0 <= c <= 1 for c in corruptions):
        raise ValueError(f"--image-corruption rates must be in [0, 1], got {list(corruptions)}.")
    for regime in regimes:
        if regime not in REGIME_OVERRIDES:
            raise ValueError(f"--regimes: unknown regime '{regime}'; choose from {sorted(REGIME_OVERRIDES)}.")
    for mode in dropped_images:
        check_dropped_image(mode, "--dropped-image")
    # The base LM does not train, so its row is the same for every seed: scored once, with seed 0.
    jobs = [Job("base_lm", "base_lm", "projector", "frozen", 0.0, 0)] if text_only and 0 in seeds else []
    for seed in seeds:
        if text_only:
            jobs.append(Job("text_only", "text_only", "projector", "finetune", 1.0, seed))
        jobs += [Job(f"{s}{'' if mode == 'remove' else '+' + mode}{f'+corrupt{c:g}' if c else ''}", "vlm", s, r, d,
                     seed, mode, c)
                 for r in regimes for s in strategies for d in dropouts for mode in dropped_images
                 for c in corruptions if mode == "remove" or d > 0]
    return jobs


def estimate_seconds(jobs: list[Job], measured: list[dict[str, Any]] = ()) -> float:
    """Each job's wall time: the mean of measured jobs (earlier parts' rows.json, or this part's done jobs)
    with its strategy, regime and kind, else of its kind, else the tiny default's `SECONDS_PER_JOB` times
    how much slower the measured jobs ran than theirs."""
    done = [r for r in measured if r.get("status") == "ok" and r.get("wall_s")]

    def tiny(kind: str, strategy: str) -> float:
        return SECONDS_PER_JOB.get(kind if kind != "vlm" else strategy, DEFAULT_SECONDS)

    scale = statistics.mean(r["wall_s"] / tiny(r["kind"], r["strategy"]) for r in done) if done else 1.0

    def seconds(job: Job) -> float:
        for keys in (("kind", "strategy", "regime"), ("kind",)):
            times = [r["wall_s"] for r in done if all(r[k] == getattr(job, k) for k in keys)]
            if times:
                return sum(times) / len(times)
        return tiny(job.kind, job.strategy) * scale

    return sum(seconds(job) for job in jobs)


def build_data(out: Path, train_images: int, eval_images: int, test_images: int, image_size: int,
               aspect: float = 1.0) -> dict[str, Any]:
    """The evidence-bearing data and every test condition's file, built once; reused when the spec matches."""
    from ..embedded.evidence import make_evidence_dataset, without_note
    from ..eval.corruptions import corrupt_data_file

    data = out / "data"
    spec = {"train": train_images, "eval": eval_images, "test": test_images, "image_size": image_size, "version": 1,
            **({"aspect": aspect} if aspect != 1 else {})}  # square data keeps the spec earlier folders wrote
    spec_file = data / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        return json.loads((data / "conditions.json").read_text())
    paths = make_evidence_dataset(data, train_images, eval_images, test_images, image_size, seed=0, aspect=aspect)
    # Short answers only: captions take 24 new tokens each and are not what this benchmark asks.
    vqa = [r for r in json.loads(paths["test"].read_text()) if r["type"] != "caption"]
    cond = data / "conditions"
    clean, no_note = data / "test_clean.json", data / "test_no_note.json"  # beside images/, which they name
    clean.write_text(json.dumps(vqa, indent=1))
    no_note.write_text(json.dumps([without_note(r) for r in vqa], indent=1))
    conditions: dict[str, dict[str, Any]] = {
        "clean": {"file": str(clean), "image_drop": 0.0},
        "no_image": {"file": str(clean), "image_drop": 1.0},
        "no_note": {"file": str(no_note), "image_drop": 0.0},
        "no_image_no_note": {"file": str(no_note), "image_drop": 1.0},
    }
    for kind in CORRUPTIONS:
        for severity in SEVERITIES:
            path = corrupt_data_file(clean, cond / f"{kind}{severity}", kind, severity, seed=0)
            conditions[f"{kind}{severity}"] = {"file": str(path), "image_drop": 0.0}
    result = {"train": str(paths["train"]), "eval": str(paths["eval"]), "conditions": conditions,
              "questions": len(vqa)}
    (data / "conditions.json").write_text(json.dumps(result, indent=1))
    spec_file.write_text(json.dumps(spec))
    return result


def job_overrides(job: Job, data: dict[str, Any], settings: dict[str, Any], user: list[str], out: Path) -> list[str]:
    # Corrupted pixels differ at every step, so such a job runs the frozen tower instead of the cache.
    reads_tower = job.strategy != "early" and job.kind == "vlm" and not job.corruption
    overrides = [
        *strategy_overrides(job.strategy), *REGIME_OVERRIDES.get(job.regime, []),
        f"data.train_files=[{data['train']}]", f"data.eval_files=[{data['eval']}]",
        f"data.cache_features={str(reads_tower).lower()}", f"data.cache_dir={out / 'feature_cache'}",
        f"train.image_dropout={job.dropout}", f"train.dropped_image={job.dropped_image}", f"train.seed={job.seed}",
        f"train.image_corruption={job.corruption}",
        f"train.max_steps={settings['max_steps']}",
        f"train.eval_every={settings['eval_every']}", f"train.early_stopping_patience={settings['patience']}",
        f"train.early_stopping_min_delta={settings['min_delta']}", f"train.batch_size={settings['batch_size']}",
        "train.report_to=none", "train.save_every=0",
    ]
    return [*overrides, *user]


def bench_fusion(
    config: str, out: str | Path, strategies: list[str], regimes: list[str] = ("finetune",),
    dropouts: list[float] = (0.0, 0.3), seeds: int | list[int] = 1, max_steps: int = 400, budget: int = 200,
    eval_every: int = 50, patience: int = 2, min_delta: float = 0.005, batch_size: int = 8,
    train_images: int = 2000, eval_images: int = 100, test_images: int = 50, text_only: bool = True, overrides: list[str] = (), max_new_tokens: int = 4,
    eval_batch_size: int = 64, image_size: int = 64, dropped_images: list[str] = ("remove",),
    calibrate: list[str | Path] = (), conditions: list[str] | None = None, corruptions: list[float] = (0.0,),
    image_aspect: float = 1.0,
) -> list[dict[str, Any]]:
    """Run every job, one after another, each in its own process; returns the result rows. `calibrate`:
    earlier bench folders whose measured wall times make the estimate (a real LM is ~10-50x the tiny one).
    `conditions`: test only these (each costs a pass over the test questions); default all. `image_aspect`:
    width / height of the rendered images (2 with `data.tiling.max_tiles=2` tests aspect-preserving tiles)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dropouts = [float(d) for d in dropouts]
    if any(not 0 <= d < 1 for d in dropouts):
        raise ValueError(f"--dropout rates must be in [0, 1), got {dropouts}.")
    if isinstance(seeds, int) and seeds < 1:
        raise ValueError(f"--seeds {seeds} runs no job; give a count N >= 1 (seeds 0..N-1) or a list (one seed: '3,').")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    jobs = plan_jobs(list(strategies), list(regimes), dropouts, seeds, text_only, list(dropped_images),
                     [float(c) for c in corruptions])
    measured = [row for folder in calibrate for row in json.loads((Path(folder) / "rows.json").read_text())["rows"]]
    source = f"from the jobs measured in {', '.join(map(str, calibrate))}" if measured else (
        "from the tiny default's job times; pass --calibrate with an earlier part's folder for other backbones")
    print(f"vlm bench fusion: {len(jobs)} jobs; estimated {estimate_seconds(jobs, measured) / 60:.0f} min on a quiet "
          f"2-core CPU ({source}).", flush=True)
    started = time.perf_counter()
    data = build_data(out, train_images, eval_images, test_images, image_size, image_aspect)
    unknown = sorted(set(conditions or ()) - set(data["conditions"]))
    if unknown or (conditions is not None and not {"clean", "no_image"} <= set(conditions)):
        raise ValueError(f"--conditions must include clean and no_image, from {', '.join(data['conditions'])}; "
                         f"got {', '.join(conditions)}.")
    tested = {k: v for k, v in data["conditions"].items() if conditions is None or k in conditions}
    settings = {"max_steps": max_steps, "eval_every": eval_every, "patience": patience, "budget": budget,
                "min_delta": min_delta, "batch_size": batch_size}
    shape = "" if image_aspect == 1 else " {}x{} px".format(*canvas_size(image_size, image_aspect))
    header = (f"Fusion benchmark: config `{config}`; evidence-bearing synthetic data ({train_images} training{shape} "
              f"images, {data['questions']} test questions); batch {batch_size}; early stopping on eval loss (every "
              f"{eval_every} steps, patience {patience}, min delta {min_delta:g}, cap {max_steps} steps); equal "
              f"budget {budget} steps; seeds {', '.join(map(str, seeds))}; conditions: "
              f"{'all' if conditions is None else ', '.join(tested)}; overrides: {' '.join(overrides) or 'none'}.")
    rows: list[dict[str, Any]] = []
    for job in (progress := progress_bar(jobs, desc="bench fusion", unit="job", every=1)):
        progress.set_postfix(job=job.folder)
        run_dir = out / "runs" / job.folder
        run_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            **asdict(job), "config": config, "out": str(run_dir), "budget": budget,
            "overrides": job_overrides(job, data, settings, list(overrides), out),
            "conditions": tested, "budget_conditions": ["clean", "no_image"],
            "max_new_tokens": max_new_tokens, "eval_batch_size": eval_batch_size,
        }
        job_started = time.perf_counter()
        with (run_dir / "bench.log").open("w") as log:
            proc = subprocess.run([sys.executable, "-m", "vlm.bench.fusion_worker", "--job", json.dumps(spec)],
                                  stdout=log, stderr=subprocess.STDOUT)
        row: dict[str, Any] = {**asdict(job)}
        result = run_dir / "bench.json"
        if proc.returncode == 0 and result.is_file():
            row.update(json.loads(result.read_text()), status="ok")
        else:
            row.update(status="failed", error=error_of((run_dir / "bench.log").read_text(), proc.returncode))
            progress.write(f"{job.folder}: failed ({row['error']}); log in {run_dir / 'bench.log'}")
        row["wall_s"] = time.perf_counter() - job_started
        rows.append(row)
        write_results(out, rows, header, total_s=time.perf_counter() - started)
        left = jobs[len(rows):]
        if left:
            progress.write(f"{job.folder}: {row['wall_s'] / 60:.1f} min; {len(left)} jobs left, estimated "
                           f"{estimate_seconds(left, [*measured, *rows]) / 60:.0f} min")
        (out / "rows.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return rows


def error_of(log: str, returncode: int) -> str:
    """The exception line of a failed run's log (its last line when there is none)."""
    import re

    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or [f"exit status {returncode}"])[-1][:300]


def merge_results(sources: list[str | Path], out: str | Path) -> list[dict[str, Any]]:
    """Rewrite the results of several bench folders (e.g. the same grid run for different seeds) as one. Rows
    of benches run with other overrides or image shapes stay apart (`bench_variant`). A source that is itself
    a merge keeps its rows' variants and lists its own sources."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, headers = [], []
    for source in sources:
        saved = json.loads((Path(source) / "rows.json").read_text())
        rows += [{"variant": bench_variant(saved["header"]), **row} for row in saved["rows"]]
        merged = saved["header"].startswith(MERGED)
        headers += saved["header"][len(MERGED):].split("\n") if merged else [f"- `{source}`: {saved['header']}"]
    header = MERGED + "\n".join(headers)
    write_results(out, rows, header)
    (out / "rows.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    return rows


MERGED = "Merged from:\n\n"
