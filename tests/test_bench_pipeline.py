"""The pipeline bench's growth arithmetic, on round numbers worked out by hand."""

from bench.bench_pipeline import growth_figures


def _run(images, seconds, rss, total):
    return {"images": images, "total_seconds": total, "peak_rss_mb": rss,
            "stages": {"download": {"seconds": seconds, "peak_rss_mb": rss}}}


def test_each_size_step_gets_its_own_ratio_and_memory_figure():
    runs = [_run(2000, 4.0, 1000, 40), _run(20000, 20.0, 1500, 100), _run(100000, 100.0, 1500, 400)]
    figs = growth_figures(runs)
    names = [f["name"] for f in figs]
    assert names == ["download: seconds at 20000 vs 2000 images",
                     "whole pipeline peak memory at 20000 vs 2000 images",
                     "download: seconds at 100000 vs 20000 images",
                     "whole pipeline peak memory at 100000 vs 20000 images"]
    # 4 s -> 20 s for 10x the images: ratio 5, goal <= 10; exponent log(5)/log(10) = 0.70
    assert figs[0]["ratio"] == 5.0 and figs[0]["goal"] == "<= 10 (linear)"
    assert "growth exponent 0.70" in figs[0]["note"]
    # 20 s -> 100 s for 5x: exactly linear, exponent 1.00
    assert figs[2]["ratio"] == 5.0 and figs[2]["goal"] == "<= 5 (linear)"
    assert "growth exponent 1.00" in figs[2]["note"]
    assert figs[1]["ratio"] == 1.5 and figs[3]["ratio"] == 1.0
