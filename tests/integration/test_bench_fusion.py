"""`vlm bench fusion` on a tiny setting: every column and plot, a failing strategy kept in its row, and a
text-only baseline that never sees an image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from shapes import projector_tokens
from vlm.cli import main
from vlm.eval.metrics import vqa_accuracy

CONDITIONS = ["clean", "no_image", "no_note", "no_image_no_note",
              *(f"{kind}{s}" for kind in ("noise", "blur", "occlusion") for s in (1, 2, 3))]


@pytest.fixture(scope="module")
def bench(backbones, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": str(backbones["vit"]), "lm": str(backbones["lm"]), "projector": {"type": "linear"}},
        "data": {"max_length": 512},
        "train": {"stage": "finetune", "lr": 1e-3, "seed": 0},
    }))
    out = tmp / "bench"
    code = main([
        "bench", "fusion", "--config", str(config), "--out", str(out), "--strategies", "projector,late,no_such_fusion",
        "--dropout", "0", "--max-steps", "4", "--budget", "2", "--eval-every", "2", "--patience", "1",
        "--train-images", "16", "--eval-images", "4", "--test-images", "4", "--train-batch-size", "4",
        "--batch-size", "16",
    ])
    return code, out


def _accuracy_on_disk(run: Path, condition: str, test_file: str, folder: str = "predictions") -> float:
    """A condition's accuracy over its non-conflict questions, scored here from the run's answers on disk
    (every question must have one)."""
    lines = (run / folder / f"{condition}.jsonl").read_text().splitlines()
    answers = {item["id"]: item["prediction"] for item in map(json.loads, lines)}
    records = [r for r in json.loads(Path(test_file).read_text()) if r["evidence"] != "conflict"]
    return sum(vqa_accuracy(answers[r["id"]], r["answers"]) for r in records) / len(records)


def test_bench_fusion_writes_every_column_and_plot_and_records_a_failure(bench, backbones):
    """Four steps teach these models next to nothing (measured: accuracies 0 to 0.067), so no accuracy
    floor here; each figure must be what the run's own answers on disk score."""
    code, out = bench
    assert code == 1  # one strategy failed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["name"] for r in rows] == ["base_lm", "text_only", "projector", "late", "no_such_fusion"]
    conflicts = any(r["evidence"] == "conflict" for r in json.loads((out / "data" / "test_clean.json").read_text()))
    expected = {f"{c}:{group}" for c in CONDITIONS for group in ("all", "image", "note", "redundant", "complementary")}
    expected |= {"budget:clean:all", "budget:no_image:all", "graceful", "multimodal_gain", "leakage", "text_loss",
                 "steps", "best_eval_step", "trainable_params", "total_params", "tokens_per_image", "step_ms",
                 "tokens_s", "peak_mem_mb", "train_s", "eval_s", "wall_s"}
    expected |= {"clean:trust_image", "clean:trust_note"} if conflicts else set()
    assert expected <= set(rows[0])
    conditions = json.loads((out / "data" / "conditions.json").read_text())["conditions"]
    files = {name: spec["file"] for name, spec in conditions.items()}
    runs = {r["name"]: out / "runs" / f"{r['name']}__{r['regime']}__drop{1 if r['name'] == 'text_only' else 0}__seed0"
            for r in rows[:4]}
    for row in rows[:4]:
        assert row["status"] == "ok", row["error"]
        for condition in CONDITIONS:
            scored = _accuracy_on_disk(runs[row["name"]], condition, files[condition])
            assert float(row[f"{condition}:all"]) == pytest.approx(scored), (row["name"], condition)
        assert float(row["text_loss"]) > 0 and float(row["peak_mem_mb"]) > 100
        clean, blind = float(row["clean:all"]), float(row["no_image:all"])
        assert float(row["multimodal_gain"]) == pytest.approx(clean - blind)  # MMStar's MG and ML
        assert float(row["leakage"]) == pytest.approx(max(0.0, blind - float(rows[0]["no_image:all"])))
    for row in rows[1:4]:  # trained jobs
        assert 0 < int(row["trainable_params"]) <= int(row["total_params"])
        assert int(row["steps"]) == 4 and float(row["step_ms"]) > 0 and float(row["tokens_s"]) > 0
        budget = _accuracy_on_disk(runs[row["name"]], "clean", files["clean"], "budget/predictions")
        assert float(row["budget:clean:all"]) == pytest.approx(budget)
        floor = float(rows[1]["no_image:all"])  # the text-only row; a ratio to a zero floor is left empty
        assert row["graceful"] == "" if floor == 0 else float(row["graceful"]) == float(row["no_image:all"]) / floor
        assert (runs[row["name"]] / "final" / "model.safetensors").is_file()
    # The linear projector: one position per patch of the ViT's 8x8 grid; late fusion adds none.
    assert int(rows[2]["tokens_per_image"]) == projector_tokens(backbones["vit"]) == 64
    assert rows[3]["tokens_per_image"] == "0"
    assert rows[4]["status"] == "failed" and "not a registered strategy" in rows[4]["error"]

    table = (out / "results.md").read_text()
    for title in ("Accuracy and cost", "Accuracy per evidence source and condition", "Accuracy under corruption"):
        assert f"### {title}" in table
    if conflicts:  # which modality conflict items follow, per condition, with their count
        records = json.loads((out / "data" / "test_clean.json").read_text())
        block = table.split("### Conflict items")[1]
        cells = next(line for line in block.splitlines() if line.startswith("| projector |")).split(" | ")
        assert int(cells[3]) == sum(r["evidence"] == "conflict" for r in records)
        assert cells[5] == f"{100 * float(rows[2]['clean:trust_note']):.1f}"
    assert "| no_such_fusion | finetune | 0 | failed: " in table
    for plot in ("fusion_corruption.png", "fusion_evidence.png", "fusion_params.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fusion_weights(run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights at initialisation, as the trainer builds them, and after training) of a run's fusion."""
    from transformers import set_seed

    from vlm.config import load_config
    from vlm.train.loop import build_model

    config = load_config(str(run / "config.yaml"))
    set_seed(config.train.seed)
    initial = {f"fusion.{k}": v for k, v in build_model(config)[0].fusion.state_dict().items()}
    final = load_file(run / "final" / "model.safetensors")
    return initial, {k: v for k, v in final.items() if k.startswith("fusion.")}


def test_the_text_only_baseline_never_sees_an_image(bench):
    _, out = bench
    runs = out / "runs"
    # No image reaches its training: the fusion gets no gradient and keeps its initial weights exactly,
    # while the same strategy trained with images moves.
    initial, final = _fusion_weights(runs / "text_only__finetune__drop1__seed0")
    assert final and all(torch.equal(initial[k], final[k]) for k in final)
    initial, final = _fusion_weights(runs / "projector__finetune__drop0__seed0")
    assert not all(torch.equal(initial[k], final[k]) for k in final)
    # Nor its evaluation: clean, corrupted and dropped images give the same answers.
    predictions = {c: (runs / "text_only__finetune__drop1__seed0" / "predictions" / f"{c}.jsonl").read_text()
                   for c in ("clean", "no_image", "occlusion3")}
    assert predictions["clean"] == predictions["no_image"] == predictions["occlusion3"]


def test_blank_rows_are_their_own_jobs_and_only_with_dropout(tmp_path):
    from vlm.bench.fusion import job_overrides, plan_jobs

    jobs = plan_jobs(["projector"], ["align"], [0.0, 0.3], [0], False, ["remove", "blank"])
    assert [(j.name, j.dropout) for j in jobs] == [("projector", 0.0), ("projector", 0.3), ("projector+blank", 0.3)]
    assert len({j.folder for j in jobs}) == 3
    settings = {"max_steps": 4, "eval_every": 2, "patience": 1, "min_delta": 0.0, "batch_size": 4}
    data = {"train": "t.json", "eval": "e.json"}
    assert "train.dropped_image=blank" in job_overrides(jobs[2], data, settings, [], tmp_path)
    assert "train.dropped_image=remove" in job_overrides(jobs[1], data, settings, [], tmp_path)
    with pytest.raises(ValueError, match="--dropped-image"):
        plan_jobs(["projector"], ["align"], [0.3], [0], False, ["zeros"])


def test_corruption_rows_train_on_corrupted_pixels_and_run_the_tower(tmp_path):
    from vlm.bench.fusion import bench_fusion, job_overrides, plan_jobs

    jobs = plan_jobs(["cross_attention"], ["align"], [0.3], [0], False, ["blank"], [0.0, 0.5])
    assert [j.name for j in jobs] == ["cross_attention+blank", "cross_attention+blank+corrupt0.5"]
    assert len({j.folder for j in jobs}) == 2
    settings = {"max_steps": 4, "eval_every": 2, "patience": 1, "min_delta": 0.0, "batch_size": 4}
    data = {"train": "t.json", "eval": "e.json"}
    plain, corrupted = (job_overrides(j, data, settings, [], tmp_path) for j in jobs)
    assert "data.cache_features=true" in plain and "train.image_corruption=0.0" in plain
    # Corrupted pixels change at every step, so the cache cannot serve them (the trainer refuses it).
    assert "data.cache_features=false" in corrupted and "train.image_corruption=0.5" in corrupted
    with pytest.raises(ValueError, match="--image-corruption"):
        plan_jobs(["projector"], ["align"], [0.3], [0], False, ["remove"], [1.5])
    with pytest.raises(ValueError, match="--seeds 0 runs no job"):
        bench_fusion("unused.yaml", tmp_path / "none", ["projector"], seeds=0)


def test_the_estimate_follows_measured_jobs():
    from vlm.bench.fusion import SECONDS_PER_JOB, estimate_seconds, plan_jobs

    base, text, cross, proj = plan_jobs(["cross_attention", "projector"], ["align"], [0.3], [0], True)
    assert estimate_seconds([base, cross]) == SECONDS_PER_JOB["base_lm"] + SECONDS_PER_JOB["cross_attention"]
    common = {"name": "x", "kind": "vlm", "dropout": 0.0, "seed": 0}
    measured = [{**common, "strategy": "cross_attention", "regime": "align", "status": "ok", "wall_s": 950.0},
                {**common, "strategy": "late", "regime": "lora", "status": "ok", "wall_s": 250.0},
                {**common, "strategy": "projector", "regime": "align", "status": "failed", "wall_s": 5.0}]
    assert estimate_seconds([cross], measured) == 950  # the same strategy and regime
    assert estimate_seconds([proj], measured) == 600  # no measured projector: the mean of measured vlm jobs
    # Nothing of its kind measured: the tiny time, scaled as the measured jobs were (950 / 190, 250 / 150).
    assert estimate_seconds([text], measured) == pytest.approx(SECONDS_PER_JOB["text_only"] * (5 + 5 / 3) / 2)


def test_a_subset_of_conditions_is_all_that_is_tested(bench, tmp_path):
    _, first = bench
    config = next((first / "runs").glob("projector__*")) / "config.yaml"
    out = tmp_path / "subset"
    args = ["bench", "fusion", "--config", str(config), "--out", str(out), "--strategies", "projector",
            "--dropout", "0", "--max-steps", "2", "--budget", "9", "--eval-every", "2", "--train-images", "16",
            "--eval-images", "4", "--test-images", "4", "--train-batch-size", "4", "--no-text-only"]
    with pytest.raises(ValueError, match="--conditions must include clean and no_image"):
        main([*args, "--conditions", "clean,noise3"])
    assert main([*args, "--conditions", "clean,no_image,noise3"]) == 0
    row = next(csv.DictReader((out / "results.csv").open()))
    assert {"clean:all", "no_image:all", "noise3:all"} <= set(row) and "blur3:all" not in row
    run = next((out / "runs").iterdir())
    assert sorted(p.stem for p in (run / "predictions").glob("*.jsonl")) == ["clean", "no_image", "noise3"]
    robustness = (out / "results.md").read_text().split("### Accuracy under corruption")[1]
    cells = next(line for line in robustness.splitlines() if line.startswith("| projector")).split(" | ")
    assert cells[4:13].count("-") == 8 and cells[6] != "-"  # of the nine corruptions only noise3 was tested


def test_wide_images_with_aspect_preserving_tiles(bench, tmp_path):
    """--image-aspect 2 renders 2:1 images; with data.tiling.max_tiles=2 (and no feature cache, which tiling
    cannot use) the saved model tiles each one as a 1x2 grid: a thumbnail plus two tiles that keep its sides."""
    from PIL import Image

    from vlm.processor import VLMProcessor

    _, first = bench
    config = next((first / "runs").glob("projector__*")) / "config.yaml"
    out = tmp_path / "wide"
    assert main(["bench", "fusion", "--config", str(config), "--out", str(out), "--strategies", "projector",
                 "--dropout", "0", "--max-steps", "2", "--budget", "9", "--eval-every", "2", "--train-images", "8",
                 "--eval-images", "2", "--test-images", "2", "--train-batch-size", "4", "--no-text-only",
                 "--image-aspect", "2", "--conditions", "clean,no_image",
                 "data.tiling.max_tiles=2", "data.cache_features=false"]) == 0
    images = sorted((out / "data" / "images").glob("*.png"))
    assert images and {Image.open(p).size for p in images} == {(128, 64)}
    assert "128x64 px" in (out / "results.md").read_text()
    run = next((out / "runs").iterdir())
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["tiling"]["max_tiles"] == 2
    assert VLMProcessor.from_pretrained(run / "final").grid_for(128, 64) == (1, 2)
    answered = (run / "predictions" / "clean.jsonl").read_text().splitlines()
    assert len(answered) == len(json.loads((out / "data" / "test_clean.json").read_text()))


def test_the_plots_draw_the_spread_over_seeds(tmp_path):
    """Two merged benches whose seeds have the same means but disagree by different amounts: every plot
    must look different, since the spread (bands, error bars) is all that differs."""
    import numpy as np
    from PIL import Image

    from vlm.bench.fusion_report import average_seeds, plot_corruption, plot_evidence, plot_params

    def rows(gap: float) -> list[dict]:
        keys = ["clean", "no_image", *(f"{k}{s}" for k in ("noise", "blur", "occlusion") for s in (1, 2, 3))]
        common = {"name": "projector", "kind": "vlm", "strategy": "projector", "regime": "align", "dropout": 0.0,
                  "status": "ok", "trainable_params": 1000}
        return [{**common, "seed": seed, **{f"{k}:{g}": 0.5 + sign * gap for k in keys
                                            for g in ("all", "image", "note", "redundant", "complementary")}}
                for seed, sign in ((0, -1), (1, 1))]

    for plot in (plot_corruption, plot_evidence, plot_params):
        pictures = []
        for gap in (0.0, 0.2):
            path = tmp_path / f"{plot.__name__}{gap}.png"
            plot(path, average_seeds(rows(gap)))
            pictures.append(np.asarray(Image.open(path).convert("RGB")))
        assert pictures[0].shape != pictures[1].shape or (pictures[0] != pictures[1]).any(), plot.__name__


def test_merge_keeps_benches_with_other_overrides_apart(tmp_path):
    """--merge averages seeds of one setting; two benches that differ by an override (tiled vs untiled) or an
    image shape are separate rows, labelled by what differs, never averaged as if they were seeds."""
    from vlm.bench.fusion import merge_results

    def bench(name: str, overrides: str, seeds: dict[int, float], shape: str = "") -> str:
        header = (f"Fusion benchmark: config `c.yaml`; evidence-bearing synthetic data (8 training{shape} images, 4 "
                  f"test questions); batch 4; seeds {', '.join(map(str, seeds))}; conditions: clean, no_image; "
                  f"overrides: {overrides}.")
        rows = [{"name": "cross_attention", "kind": "vlm", "strategy": "cross_attention", "regime": "align",
                 "dropout": 0.0, "seed": seed, "status": "ok", "scores": {"clean": {"all": acc}, "no_image": {"all": 0.0}}}
                for seed, acc in seeds.items()]
        (tmp_path / name).mkdir()
        (tmp_path / name / "rows.json").write_text(json.dumps({"header": header, "rows": rows}))
        return str(tmp_path / name)

    sources = [bench("untiled", "a=1", {0: 0.70}, " 128x64 px"), bench("untiled-seed1", "a=1", {1: 0.80}, " 128x64 px"),
               bench("tiled", "a=1 data.tiling.max_tiles=2", {0: 0.40}, " 128x64 px"), bench("square", "a=1", {0: 0.10})]
    merge_results(sources, tmp_path / "merged")
    table = (tmp_path / "merged" / "results.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| cross_attention")}
    assert set(rows) == {"cross_attention (images=128x64)", "cross_attention (images=128x64 data.tiling.max_tiles=2)",
                         "cross_attention"}, table
    assert "75.0" in rows["cross_attention (images=128x64)"]  # two seeds of one setting: averaged
    assert "40.0" in rows["cross_attention (images=128x64 data.tiling.max_tiles=2)"]
    assert "10.0" in rows["cross_attention"]
    # A merged folder merged again keeps its rows apart as before and lists every original source.
    merge_results([str(tmp_path / "merged"), bench("later", "a=1", {2: 0.90}, " 128x64 px")], tmp_path / "again")
    again = (tmp_path / "again" / "results.md").read_text()
    assert all(f"`{source}`" in again for source in [*sources, str(tmp_path / "later")])
    assert "| cross_attention (images=128x64) | align | 0 | 80.0 ± 10.0" in again, again
