"""bench/cost_model.py: its arithmetic on round numbers a person can check by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench import cost_model

REPO = Path(__file__).resolve().parent.parent


def fake_results() -> dict:
    """A results.json of a 2-core machine with round rates."""
    def fig(name, value, peer_value=None, note=""):
        return {"name": name, "value": value, "peer_value": peer_value, "note": note}
    return {"machine": "x86_64, 2 cores, Python 3.11", "started": "t0", "benchmarks": {
        "wat": {"figures": [fig("records/s per core (ours, FastWARC reader)", 1000)]},
        "dedup": {"figures": [fig("stage rows/s (exact + Bloom join, existing filter)", 2000)]},
        "download": {"figures": [fig("throughput, shard engine vs img2dataset", 200)]},
        "clip": {"figures": [fig("ViT-B-32 (random init) decode+preprocess, 1 thread", 250)]},
        "pipeline": {"figures": [fig("filter: seconds at 20000 vs 2000 images", 19.0, 10.0)]},
        "index": {"figures": [fig("build seconds", 500.0, note="1,000,000 x 512; ours X")]},
    }}


def fake_inputs() -> dict:
    node = {"vcpus": 10, "memory_gib": 1, "gpus": 0, "gpu": None, "network_gbps": 8, "ec2_usd_h": 1.0,
            "emr_usd_h": 0.5}
    gpu = dict(node, gpus=2, gpu="G")
    return {"instances": {"cpu": node, "gpu": gpu}, "sustained_network_fraction": 0.5,
            "stage_instances": {s: ("gpu" if s == "clip-score" else "cpu") for s in cost_model.STAGES},
            "gpu_images_per_s": {"G": 100},
            "workloads": {"w": {"label": "w", "pages": 3600.0, "wat_records_per_page": 3,
                                "candidate_pairs_per_page": 10.0, "deadline_hours": 1}},
            "fractions": {"kept_by_dedup": 0.5, "download_success": 0.5, "kept_by_filter": 0.1},
            "mean_image_bytes": 100_000, "anchors": {}}


def test_rates_are_per_core_and_filter_is_marginal():
    r = cost_model.Rates.from_results(fake_results())
    assert r.wat_records == 1000          # already per core
    assert r.dedup_rows == 1000           # 2000 on 2 cores
    assert r.download_urls == 100         # 200 on 2 processes
    assert r.filter_rows == 1000          # 18,000 more rows in 9 more seconds, on 2 cores
    assert r.index_vectors == 1000        # 1M vectors in 500 s on 2 cores


def test_rows_node_hours_and_dollars_by_hand():
    res = cost_model.model(fake_results(), fake_inputs(), "w")
    by = {s["stage"]: s for s in res["stages"]}
    # 3,600 pages x 3 records at 10 cores x 1,000/s = 1.08 node-seconds... in hours: 10,800/10,000/3600
    assert by["wat-extract"]["rows"] == 10_800
    assert by["wat-extract"]["node_hours"] == pytest.approx(10_800 / 10_000 / 3600)
    # 36,000 pairs; half unique = 18,000 downloads; half fetched = 9,000 scored and filtered
    assert (by["dedup"]["rows"], by["download"]["rows"], by["clip-score"]["rows"]) == (36_000, 18_000, 9_000)
    # download: CPU 10 x 100 = 1,000/s; network 8 Gbps x 0.5 / 8 bits / 100 kB = 5,000/s -> CPU-bound
    assert (by["download"]["node_rate"], by["download"]["bound"]) == (1000, "CPU")
    # clip: 2 GPUs x 100 = 200/s, decode 10 x 250 = 2,500/s -> GPU-bound; 9,000 / 200 = 45 s
    assert (by["clip-score"]["node_rate"], by["clip-score"]["bound"]) == (200, "GPU")
    assert by["clip-score"]["unit_hours"] == pytest.approx(2 * 45 / 3600)
    # index: 2 x (9,000 x 0.1) = 1,800 vectors (image + text)
    assert by["build-index"]["rows"] == 1_800
    assert by["download"]["usd"] == pytest.approx(18 / 3600 * 1.5)
    assert res["nodes"] == 1 and res["wall_hours"] == pytest.approx(res["total_node_hours"])


def test_download_becomes_network_bound_on_a_thin_pipe():
    inputs = fake_inputs()
    inputs["instances"]["cpu"]["network_gbps"] = 0.8    # 0.4 Gbps sustained = 500 images/s of 100 kB
    by = {s["stage"]: s for s in cost_model.model(fake_results(), inputs, "w")["stages"]}
    assert by["download"]["bound"] == "network"
    assert by["download"]["node_rate"] == pytest.approx(500)


def test_missing_benchmark_is_a_clear_error():
    results = fake_results()
    del results["benchmarks"]["index"]
    with pytest.raises(cost_model.MissingRate, match="--only index"):
        cost_model.Rates.from_results(results)


def test_committed_inputs_and_results_render(tmp_path):
    out = tmp_path / "cost.md"
    assert cost_model.main(["--results", str(REPO / "bench/results.json"),
                            "--inputs", str(REPO / "bench/cost_inputs.yaml"), "--out", str(out)]) == 0
    text = out.read_text()
    inputs = yaml.safe_load((REPO / "bench/cost_inputs.yaml").read_text())
    for stage in cost_model.STAGES:
        assert f"| {stage} |" in text
    assert inputs["workloads"]["one_crawl"]["label"] in text and "## Doubts" in text
    assert json.loads((REPO / "bench/results.json").read_text())["started"] in text
