"""bench/bench_clip_gpu.py runs its whole path (shards -> score_frame with a decode pool -> rates) on
the CPU with the tiny model, so the script is ready for a GPU machine."""

from __future__ import annotations

import pytest

from bench import bench_clip_gpu


@pytest.mark.slow
def test_gpu_bench_path_runs_on_cpu_and_scores_every_image(tmp_path):
    res = bench_clip_gpu.measure("local-dir:tests/fixtures/tiny_clip", None, images=96, batch=32,
                                 threads=[1, 2], work=tmp_path)
    assert res["device"] == "cpu" and res["images"] == 96
    assert [r["decode_threads"] for r in res["runs"]] == [1, 2]
    assert all(r["images"] == 96 and r["images_per_s"] > 0 for r in res["runs"])
    assert res["decode_threads_to_feed"] in (1, 2)
    assert res["bare_forward_images_per_s"] > 0
