"""The pipeline benchmarks in their quickest modes on the tiny model: `skillgen bench pipeline` (interleaved rows,
pinned threads, the contention check, the JSON row schema) and `python -m bench.gpu_pipeline --smoke` on the CPU."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("diffusers")

from bench import gpu_pipeline
from bench import pipeline as bench_pipeline

pytestmark = pytest.mark.slow

ROW_FIELDS = {
    "backend", "precision", "provider", "adapter", "batch", "latency_ms_median", "latency_ms_min",
    "psnr_db_vs_torch", "threads", "runs", "contended",
}
QUICKEST = ["--size", "64", "--steps", "2", "--rounds", "3", "--threads", "1"]


def _run(tiny_model, tmp_path, capsys, *extra: str) -> dict:
    out = tmp_path / "pipeline.json"
    rc = bench_pipeline.main(["--json", "--model", str(tiny_model), "--out", str(out), *QUICKEST, *extra])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert out.with_suffix(".txt").read_text().count("\n") > 4
    return printed


def test_pipeline_bench_rows_schema_and_parity(tiny_model, tmp_path, capsys):
    report = _run(tiny_model, tmp_path, capsys)
    rows = report["rows"]
    assert [(r["backend"], r["adapter"], r["attention"]) for r in rows] == [
        ("diffusers", None, None), ("torch", None, None), ("onnx", None, "fused"),
        ("onnx", bench_pipeline.LORA_NAME, "fused"), ("onnx", None, "plain"),
    ]
    for row in rows:
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["threads"] == 1 and row["batch"] == 1 and row["runs"] == 3
        assert 0 < row["latency_ms_min"] <= row["latency_ms_median"]
        assert row["cpu_ms_median"] > 0 and row["ratio_vs_diffusers_cpu"] > 0
        assert isinstance(row["contended"], bool)
    assert rows[0]["ratio_vs_diffusers"] == rows[0]["ratio_vs_diffusers_min"] == 1.0
    onnx_base = rows[2]
    assert onnx_base["precision"] == "fp32" and onnx_base["provider"] == "CPUExecutionProvider"
    assert onnx_base["psnr_db_vs_torch"] > 30
    assert rows[3]["psnr_db_vs_torch"] > 30  # the adapter row against the torch engine on the same adapter
    assert rows[4]["psnr_db_vs_torch"] > 30  # plain attention: the same picture
    assert rows[0]["psnr_db_vs_torch"] > 30  # plain diffusers draws the same picture as the torch engine
    assert report["threads"] == 1 and report["rounds"] == 3
    assert 0 <= report["adapter_switch_ms"] < 1000 and report["adapter_first_fuse_ms"] > 0


def test_contention_check_reruns_and_marks_rows(tiny_model, tmp_path, capsys, monkeypatch):
    """A machine that slows down after the first calibration: every run is repeated once, and every row is marked."""
    readings = iter([10.0])
    monkeypatch.setattr(bench_pipeline, "calibrate", lambda: next(readings, 20.0))
    report = _run(tiny_model, tmp_path, capsys)
    assert report["contended"] is True
    for row in report["rows"]:
        assert row["contended"] is True
        assert row["reruns"] == row["runs"] == 3


def test_gpu_pipeline_smoke_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_pipeline.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["backend"] for r in result["rows"]} == {"torch", "torch-compile", "onnx-cpu"}
    assert result["setup_s"]["gflop_unet_forward"] > 0 and result["setup_s"]["gflop_vae_decode"] > 0
    assert all(r["gflop_per_image"] > 2 * r["steps"] * result["setup_s"]["gflop_unet_forward"] for r in result["rows"])
    compiled = [r for r in result["rows"] if r["backend"] == "torch-compile"]
    assert compiled and all(r["psnr_db_vs_torch"] > 60 for r in compiled)  # the same graph, traced
    assert set(result["skipped"]) == {"onnx-cuda", "onnx-tensorrt"}
    assert all("GPU" in reason for reason in result["skipped"].values())
    onnx_rows = [r for r in result["rows"] if r["backend"] == "onnx-cpu"]
    assert onnx_rows and all(r["psnr_db_vs_torch"] > 30 for r in onnx_rows)
