"""`vlm bench fusion` on a tiny setting: files, columns, and a failing strategy kept in its row."""

from __future__ import annotations

import csv

import yaml

from vlm.cli import main


def test_bench_fusion_writes_results_and_records_a_failure(backbones, synthetic, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"vision": str(backbones["vit"]), "lm": str(backbones["lm"]), "projector": {"type": "linear"}},
        "data": {"train_files": [str(synthetic["train"])], "max_length": 256},
        "train": {"stage": "finetune", "batch_size": 4, "lr": 1e-3, "seed": 0},
    }))
    out = tmp_path / "bench"
    code = main([
        "bench", "fusion", "--config", str(config), "--strategies", "projector,late,no_such_fusion",
        "--image-drop", "0,1.0", "--out", str(out), "--steps", "2", "--data", str(synthetic["test"]),
        "--max-new-tokens", "3", "--batch-size", "8",
    ])
    assert code == 1  # one strategy failed
    assert "| projector | ok |" in capsys.readouterr().out

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["strategy"] for r in rows] == ["projector", "late", "no_such_fusion"]
    expected = {"acc_colour", "acc_shape", "acc_position", "acc_size", "acc_count", "caption_cider",
                "acc_drop_0", "acc_drop_1", "trainable_params", "total_params", "step_ms", "peak_mem_mb", "eval_s"}
    assert expected <= set(rows[0])
    for row in rows[:2]:
        assert row["status"] == "ok", row["error"]
        assert 0 <= float(row["acc_drop_0"]) <= 1 and 0 <= float(row["acc_drop_1"]) <= 1
        assert 0 < int(row["trainable_params"]) <= int(row["total_params"])
        assert float(row["step_ms"]) > 0 and float(row["peak_mem_mb"]) > 100 and float(row["eval_s"]) > 0
        assert (out / row["strategy"] / "final" / "model.safetensors").is_file()
    assert rows[2]["status"] == "failed" and "no_such_fusion" in rows[2]["error"]
    assert "not a registered strategy" in rows[2]["error"]

    table = (out / "results.md").read_text()
    assert "| no_such_fusion | failed |" in table and "acc_drop_0.5" not in table
    assert (out / "fusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
