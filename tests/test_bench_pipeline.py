"""The pipeline bench's growth arithmetic, on round numbers worked out by hand."""

from bench.bench_pipeline import growth_figures, memory_breakdown, parse_jstat_gc


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


def test_jstat_row_gives_heap_used_and_committed():
    """A `jstat -gc` row of JDK 17 with a serial collector (CGC columns unset), KB values summed
    by hand: used 0 + 3000 + 90000 + 140000 KB, committed 10000 + 10000 + 100000 + 200000 KB."""
    header = "S0C S1C S0U S1U EC EU OC OU MC MU CCSC CCSU YGC YGCT FGC FGCT CGC CGCT GCT"
    row = "10000.0 10000.0 0.0 3000.0 100000.0 90000.0 200000.0 140000.0 36032.0 33928.2 8640.0 7605.1 45 2.1 5 2.5 - - 4.6"
    assert parse_jstat_gc(header, row) == (233000 * 1024, 320000 * 1024)
    assert parse_jstat_gc(header, header) is None      # a repeated header is not a sample
    assert parse_jstat_gc(header, "1 2 3") is None


def test_memory_breakdown_names_each_component_between_sizes():
    a = {"peak_jvm_rss_mb": 900, "peak_heap_used_mb": 300, "peak_driver_rss_mb": 200}
    b = {"peak_jvm_rss_mb": 1400, "peak_heap_used_mb": 320, "peak_driver_rss_mb": 800,
         "peak_workers_rss_mb": 50}
    assert memory_breakdown(a, b) == "JVM RSS 900->1400, heap used 300->320, driver Python 200->800"
