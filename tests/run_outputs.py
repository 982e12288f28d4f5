"""What two `clipcrawl run`s on the same sample must agree on, read back with pyarrow (no Spark),
for comparing a run on a cluster manager or over Spark Connect with a `local[*]` run."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as pads


def _rows(folder: Path, columns: list[str], digits: dict | None = None) -> list[tuple]:
    if not folder.exists():
        return []
    dataset = pads.dataset(str(folder), format="parquet", partitioning="hive", exclude_invalid_files=True)
    if not dataset.files:   # a dataset with no rows (Spark writes only _SUCCESS)
        return []
    table = dataset.to_table(columns=columns)
    out = []
    for r in table.to_pylist():
        out.append(tuple(round(r[c], digits[c]) if digits and c in digits and r[c] is not None else r[c]
                         for c in columns))
    return sorted(out, key=repr)


def subset_rows(root: Path, cfg) -> dict[int, tuple]:
    """SAMPLE_ID -> the row's values, over all three subsets (similarity to 4 decimals: the
    embeddings are computed in other batches on other workers)."""
    rows: dict[int, tuple] = {}
    for subset in cfg.get("filter.subsets").values():
        folder = root / cfg.get("run.datasets.filter") / subset
        for sample_id, url, text, sim, width, height in _rows(
                folder, ["SAMPLE_ID", "URL", "TEXT", "similarity", "WIDTH", "HEIGHT"], {"similarity": 4}):
            assert sample_id not in rows, f"duplicate SAMPLE_ID {sample_id}"
            rows[sample_id] = (subset, url, text, sim, width, height)
    return rows


def stage_counts(root: Path, cfg, stages) -> dict[str, dict]:
    """input/output/rejected rows from each stage's stats.json."""
    out = {}
    for stage in stages:
        stats = json.loads((root / cfg.get(f"run.datasets.{stage}") / "_stats" / "stats.json").read_text())
        out[stage] = {k: stats.get(k) for k in ("input_rows", "output_rows", "rejected_rows")}
    return out


def pipeline_outputs(root: Path, cfg, first: str = "wat-extract") -> dict:
    """Every stage's data from `first` on: kept and rejected rows, download outcomes, scores,
    the subsets and the kNN indices' ids."""
    from spark_jobs.run import STAGE_NAMES

    names = cfg.get("run.datasets")   # folders; also holds `export`, which is not a chain stage
    stages = list(STAGE_NAMES)[list(STAGE_NAMES).index(first):]
    out: dict = {"counts": stage_counts(root, cfg, stages)}
    if "wat-extract" in stages:
        out["wat_pairs"] = _rows(root / names["wat-extract"], ["uid", "url", "text", "page_url", "crawl"])
        out["wat_rejected"] = _rows(root / (names["wat-extract"] + "_rejected"), ["url", "text", "status"])
    if "dedup" in stages:
        out["dedup"] = _rows(root / names["dedup"], ["uid", "url", "text"])
        out["dedup_rejected"] = _rows(root / (names["dedup"] + "_rejected"), ["uid", "status"])
    out["download"] = _rows(root / names["download"], ["key", "uid", "url", "status", "width", "height", "shard"])
    out["scored"] = _rows(root / names["clip-score"], ["key", "uid", "status", "similarity"], {"similarity": 4})
    out["subsets"] = subset_rows(root, cfg)
    indices = root / names["build-index"]
    out["indices"] = {p.parent.name: sorted(pads.dataset(str(p)).to_table(columns=["index_id", "SAMPLE_ID"])
                                            .to_pylist(), key=lambda r: r["index_id"])
                      for p in sorted(indices.glob("*/ids.parquet"))}
    return out
