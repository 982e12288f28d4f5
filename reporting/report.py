"""`report.html` for a pipeline run: what happened to the rows, told in six charts.

Every number comes from the written datasets (kept and rejected rows grouped by `status`), not
from logs or accumulators, so the page agrees with what a user reads back with Spark or pandas.
Charts are PNGs next to the page (matplotlib, Agg backend, no display needed).
"""

from __future__ import annotations

import glob
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from udfs import fsio

STAGE_ORDER = ("wat-extract", "dedup", "download", "image-dedup", "clip-score", "filter", "build-index")


@dataclass
class StageFunnel:
    stage: str
    rows_in: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def accounted(self) -> bool:
        return self.rows_in == self.kept + sum(self.dropped.values())


def _dataset(path: str, files_glob: str | None = None, storage_options: dict | None = None):
    """A pyarrow dataset of the parquet files of one dataset folder.

    Without a glob only hive-partitioned data files count (every folder below `path` is
    `key=value`), so side folders such as clip-score's `metadata/` or `_stats/` are left out.
    A remote root (s3://...) is listed and read through fsspec, with the same rules."""
    if fsio.is_remote(path):
        return _remote_dataset(path, files_glob, storage_options)
    if files_glob:
        files = sorted(glob.glob(os.path.join(path, files_glob)))
        return pads.dataset(files, format="parquet") if files else None
    if not os.path.isdir(path):
        return None
    files = sorted(str(f) for f in Path(path).rglob("*.parquet")
                   if all("=" in part for part in f.relative_to(path).parts[:-1])
                   and not f.name.startswith(("_", ".")))
    if not files:
        return None
    return pads.dataset(files, format="parquet", partitioning="hive", partition_base_dir=path)


def _remote_dataset(path: str, files_glob: str | None, storage_options: dict | None):
    fs, base = fsio.filesystem(path, storage_options)
    base = base.rstrip("/")
    if files_glob:
        files = sorted(fs.glob(f"{base}/{files_glob}"))
        return pads.dataset(files, format="parquet", filesystem=fs) if files else None
    if not fs.isdir(base):
        return None
    files = sorted(f for f in fs.find(base) if f.endswith(".parquet")
                   and all("=" in part for part in f[len(base) + 1:].split("/")[:-1])
                   and not f.rsplit("/", 1)[-1].startswith(("_", ".")))
    if not files:
        return None
    return pads.dataset(files, format="parquet", filesystem=fs, partitioning="hive", partition_base_dir=base)


def _table(path: str, columns: list[str], files_glob: str | None = None, storage_options: dict | None = None):
    ds = _dataset(path, files_glob, storage_options)
    if ds is None:
        return None
    present = [c for c in columns if c in ds.schema.names]
    return ds.to_table(columns=present)


def _count(path: str, files_glob: str | None = None, storage_options: dict | None = None) -> int:
    ds = _dataset(path, files_glob, storage_options)
    return 0 if ds is None else ds.count_rows()


def _by_status(path: str, files_glob: str | None = None, column: str = "status",
               where: tuple[str, str] | None = None, storage_options: dict | None = None) -> dict[str, int]:
    """Row counts by `column`, optionally only of rows whose `where[0]` equals `where[1]`."""
    columns = [column] + ([where[0]] if where else [])
    table = _table(path, columns, files_glob, storage_options)
    if table is None or column not in table.column_names:
        return {}
    keep = (table.column(where[0]).to_pylist() if where and where[0] in table.column_names
            else [where[1] if where else None] * table.num_rows)
    counts: dict[str, int] = {}
    for value, tag in zip(table.column(column).to_pylist(), keep):
        if where is None or tag == where[1]:
            counts[str(value)] = counts.get(str(value), 0) + 1
    return counts


def _downstream(stage: str, upstream: dict[str, int], here: dict[str, int]) -> StageFunnel:
    """A pass-through stage: rows in = upstream successes; dropped = statuses beyond the carried ones."""
    carried = {k: v for k, v in upstream.items() if k != "success"}
    dropped = {k: v - carried.get(k, 0) for k, v in here.items()
               if k != "success" and v - carried.get(k, 0) != 0}
    return StageFunnel(stage, upstream.get("success", 0), here.get("success", 0), dropped)


def collect(root: str, datasets: dict[str, str], subsets: dict[str, str],
            storage_options: dict | None = None) -> dict[str, Any]:
    """Everything the report shows, read from the datasets under `root` (local or s3://)."""
    so = storage_options
    p = {stage: os.path.join(root, name) for stage, name in datasets.items()}
    facts: dict[str, Any] = {"root": root, "funnel": []}

    wat_kept = _count(p["wat-extract"], storage_options=so)
    # Only link-level rejects: record-level ones (invalid JSON, missing fields) are not image links.
    wat_rej = _by_status(p["wat-extract"] + "_rejected", where=("level", "link"), storage_options=so)
    facts["funnel"].append(StageFunnel("wat-extract", wat_kept + sum(wat_rej.values()), wat_kept, wat_rej))

    dedup_kept = _count(p["dedup"], storage_options=so)
    dedup_rej = _by_status(p["dedup"] + "_rejected", storage_options=so)
    facts["funnel"].append(StageFunnel("dedup", wat_kept, dedup_kept, dedup_rej))

    dl_status = _by_status(p["download"], "*.parquet", storage_options=so)
    facts["download_status"] = dl_status
    facts["funnel"].append(StageFunnel("download", sum(dl_status.values()), dl_status.get("success", 0),
                                       {k: v for k, v in dl_status.items() if k != "success"}))

    # clip-score and filter pass earlier failures through; the funnel shows each stage's input
    # as the rows still alive when it starts, and only the rows it dropped itself.
    scored_status = _by_status(p["clip-score"], storage_options=so)
    dedup_status = _by_status(p["image-dedup"], storage_options=so) if "image-dedup" in p else {}
    if dedup_status:   # image-dedup ran (enabled): its drops are its own, not clip-score's
        facts["funnel"].append(_downstream("image-dedup", dl_status, dedup_status))
    facts["funnel"].append(_downstream("clip-score", dedup_status or dl_status, scored_status))

    subset_counts = {name: _count(os.path.join(p["filter"], name), storage_options=so) for name in subsets.values()}
    facts["subsets"] = subset_counts
    filter_status = dict(_by_status(p["filter"] + "_rejected", storage_options=so))
    filter_status["success"] = sum(subset_counts.values())
    facts["funnel"].append(_downstream("filter", scored_status, filter_status))

    images = _table(p["download"], ["status", "original_width", "original_height", "bytes"], "*.parquet", so)
    facts["image_sizes"] = []
    if images is not None and "original_width" in images.column_names:
        for status, w, h in zip(images.column("status").to_pylist(),
                                images.column("original_width").to_pylist(),
                                images.column("original_height").to_pylist()):
            if status == "success" and w and h:
                facts["image_sizes"].append((int(w), int(h)))

    scored = _table(p["clip-score"], ["similarity"], storage_options=so)
    facts["similarities"] = ([] if scored is None else
                             [s for s in scored.column("similarity").to_pylist() if s is not None])

    languages: dict[str, int] = {}
    for name in subsets.values():
        table = _table(os.path.join(p["filter"], name), ["LANGUAGE"], storage_options=so)
        if table is not None and "LANGUAGE" in table.column_names:
            for lang in table.column("LANGUAGE").to_pylist():
                key = lang or "(none)"
                languages[key] = languages.get(key, 0) + 1
    facts["languages"] = dict(sorted(languages.items(), key=lambda kv: -kv[1]))

    run_json = os.path.join(root, "_run", "run.json")
    facts["stage_seconds"] = {}
    if fsio.exists(run_json, so):
        run = fsio.read_json(run_json, so)
        for stage, entry in run.get("stages", {}).items():
            if entry.get("seconds") is not None:
                facts["stage_seconds"][stage] = float(entry["seconds"])
    return facts


def _charts(facts: dict[str, Any], thresholds: dict[str, float], out: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        charts[name.rsplit(".", 1)[0]] = name

    funnel: list[StageFunnel] = facts["funnel"]
    fig, ax = plt.subplots(figsize=(10.5, 4.5))
    reasons = sorted({r for f in funnel for r in f.dropped})
    colors = ["#e8590c", "#1c7ed6", "#f59f00", "#ae3ec9", "#e03131", "#868e96", "#0c8599", "#5f3dc4",
              "#d6336c", "#495057"]
    x = range(len(funnel))
    ax.bar(x, [f.kept for f in funnel], color="#2b8a3e", label="kept")
    bottom = [f.kept for f in funnel]
    for i, reason in enumerate(reasons):
        vals = [f.dropped.get(reason, 0) for f in funnel]
        ax.bar(x, vals, bottom=bottom, color=colors[i % len(colors)], label=f"dropped: {reason}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, f in enumerate(funnel):
        ax.text(i, f.rows_in, f"{f.kept}/{f.rows_in}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [f.stage for f in funnel])
    ax.set_ylabel("rows")
    ax.set_title("Rows per stage: kept (green) and dropped by reason")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save(fig, "funnel.png")

    fig, ax = plt.subplots(figsize=(7, 3.8))
    sims = facts["similarities"]
    if sims:
        ax.hist(sims, bins=40, color="#4263eb")
    styles = {"en": "-", "multi": "--", "nolang": ":"}
    for bucket, value in thresholds.items():
        ax.axvline(value, color="#c92a2a", linestyle=styles.get(bucket, "-."), label=f"{bucket} >= {value}")
    ax.set_xlabel("CLIP cosine similarity (image, alt-text)")
    ax.set_ylabel("pairs")
    ax.set_title("Similarity of scored pairs, with the keep thresholds")
    ax.legend(fontsize=8)
    save(fig, "similarity.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    langs = facts["languages"]
    ax.bar(list(langs), list(langs.values()), color="#f08c00")
    ax.set_ylabel("kept pairs")
    ax.set_title("Caption language of kept pairs")
    save(fig, "languages.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    status = dict(sorted(facts["download_status"].items(), key=lambda kv: -kv[1]))
    ax.barh(list(status), list(status.values()),
            color=["#2b8a3e" if k == "success" else "#868e96" for k in status])
    ax.set_xlabel("rows")
    ax.set_title("Download outcome per URL")
    save(fig, "download_status.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = facts["image_sizes"]
    if sizes:
        ax.scatter([w for w, _ in sizes], [h for _, h in sizes], s=10, alpha=0.6, color="#1098ad")
    ax.set_xlabel("original width (px)")
    ax.set_ylabel("original height (px)")
    ax.set_title("Sizes of downloaded images")
    save(fig, "image_sizes.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    secs = facts["stage_seconds"]
    ordered = [s for s in STAGE_ORDER if s in secs]
    ax.barh(ordered[::-1], [secs[s] for s in ordered][::-1], color="#7048e8")
    ax.set_xlabel("seconds")
    ax.set_title("Time per stage")
    save(fig, "stage_seconds.png")
    return charts


OPT_OUT_SOURCES = ("page_meta", "opt_out_list", "robots_txt", "tdmrep", "x_robots_tag")


def _opt_out_section(root: str, datasets: dict[str, str], out: Path, storage_options: dict | None = None) -> str:
    """A chart of the download's opted_out rows per opt_out_source (every source shown, zeros
    included, so that an empty chart says "nothing opted out" rather than "not checked")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = _by_status(fsio.join(root, datasets["download"]), "*.parquet", column="opt_out_source",
                        where=("status", "opted_out"), storage_options=storage_options)
    sources = list(OPT_OUT_SOURCES) + sorted(set(counts) - set(OPT_OUT_SOURCES))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = [counts.get(src, 0) for src in sources]
    ax.barh(sources[::-1], values[::-1], color="#c2255c")
    for y, v in enumerate(values[::-1]):
        ax.text(v, y, f" {v}", va="center", fontsize=8)
    ax.set_xlabel("opted_out rows")
    ax.set_title("Opt-outs honoured, by source")
    fig.tight_layout()
    fig.savefig(out / "opt_outs.png", dpi=110)
    plt.close(fig)
    return ("<section><h2>Consent: opt-outs by source</h2><p>Rows the download stage did not fetch (or whose "
            "body it did not read) because the publisher opted out: the page's meta tags, an opt-out list, "
            "robots.txt (an unreachable robots.txt counts here too), TDMRep (tdmrep.json or the "
            "<code>tdm-reservation</code> header) or the image's X-Robots-Tag. The matching rule of each row is "
            "in its <code>error_message</code>.</p><p>" + ", ".join(f"{html.escape(k)}: {v}" for k, v in
                                                                 zip(sources, values)) +
            "</p><img src='opt_outs.png' alt='opt-outs by source'></section>")


DEDUP_LAYERS = (("dedup", "duplicate", "same URL + alt-text"),
                ("image-dedup", "duplicate_image", "same image bytes (sha256)"),
                ("image-dedup", "near_duplicate", "pHash near-duplicate"),
                ("filter", "eval_overlap", "eval-set overlap"),
                ("filter", "semantic_duplicate", "semantic duplicate (SemDeDup)"))


def dedup_layer_counts(root: str, datasets: dict[str, str], storage_options: dict | None = None) -> dict[str, int]:
    """Rows each dedup layer removed, counted from the rejected / marked rows of its stage."""
    where = {"dedup": fsio.join(root, datasets["dedup"]) + "_rejected",
             "image-dedup": fsio.join(root, datasets["image-dedup"]) if "image-dedup" in datasets else None,
             "filter": fsio.join(root, datasets["filter"]) + "_rejected"}
    counts: dict[str, int] = {}
    cache: dict[str, dict[str, int]] = {}
    for stage, status, label in DEDUP_LAYERS:
        if where[stage] is None:
            continue
        if stage not in cache:
            cache[stage] = _by_status(where[stage], storage_options=storage_options)
        counts[label] = cache[stage].get(status, 0)
    return counts


def dedup_layers_chart(root: str, datasets: dict[str, str], out: Path,
                       storage_options: dict | None = None) -> dict[str, str]:
    """`dedup_layers.png`: one bar per dedup layer, in pipeline order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = dedup_layer_counts(root, datasets, storage_options)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = list(counts)[::-1]
    ax.barh(labels, [counts[k] for k in labels], color="#d9480f")
    for i, k in enumerate(labels):
        ax.text(counts[k], i, f" {counts[k]}", va="center", fontsize=8)
    ax.set_xlabel("rows removed")
    ax.set_title("What each dedup layer removed")
    fig.tight_layout()
    fig.savefig(out / "dedup_layers.png", dpi=110)
    plt.close(fig)
    return {"dedup_layers": "dedup_layers.png"}


def _funnel_table(funnel: list[StageFunnel]) -> str:
    rows = []
    for f in funnel:
        drops = ", ".join(f"{html.escape(k)}: {v}" for k, v in sorted(f.dropped.items(), key=lambda kv: -kv[1]))
        check = "yes" if f.accounted else f"<b>no: {f.rows_in - f.kept - sum(f.dropped.values())} rows unaccounted</b>"
        rows.append(f"<tr><td>{f.stage}</td><td>{f.rows_in}</td><td>{f.kept}</td><td>{drops or '-'}</td>"
                    f"<td>{check}</td></tr>")
    return ("<table><tr><th>stage</th><th>rows in</th><th>kept</th><th>dropped (reason: rows)</th>"
            "<th>in = kept + dropped</th></tr>" + "".join(rows) + "</table>")


def build_report(root: str, datasets: dict[str, str], subsets: dict[str, str],
                 out_dir: str | None = None, report_section: dict | None = None,
                 storage_options: dict | None = None) -> str:
    """Write report.html (+ charts) for the run under `root` (local or s3://) into `out_dir`, a
    local folder (default `<root>/report`; for a remote root, `./report`)."""
    from reporting import grids

    so = storage_options
    out = Path(out_dir or ("report" if fsio.is_remote(root) else os.path.join(root, "report")))
    out.mkdir(parents=True, exist_ok=True)
    facts = collect(root, datasets, subsets, so)
    # The thresholds the filter really applied (presets resolved), from its stats.
    filter_stats = os.path.join(root, datasets["filter"], "_stats", "stats.json")
    thresholds: dict[str, float] = {}
    if fsio.exists(filter_stats, so):
        thresholds = fsio.read_json(filter_stats, so).get("thresholds") or {}
    charts = _charts(facts, thresholds, out)
    grid_html, facts["image_grids"] = grids.report_section(
        root, datasets, subsets, thresholds, report_section,
        lambda path, columns, files_glob=None: _table(path, columns, files_glob, so), so)
    charts.update(dedup_layers_chart(root, datasets, out, so))
    subset_list = "".join(f"<li><code>{html.escape(k)}</code>: {v} pairs</li>" for k, v in facts["subsets"].items())
    captions = {
        "funnel": "Each bar is one stage's input. Green is what the stage kept; the coloured parts are rows it "
                  "dropped, by reason. Every dropped row is in the stage's <code>_rejected</code> dataset.",
        "similarity": "CLIP cosine similarity between each downloaded image and its alt-text. Pairs right of "
                      "the red line for their language bucket are kept.",
        "languages": "Detected caption language of the kept pairs (none = no confident language).",
        "download_status": "What happened to each URL in the download stage.",
        "image_sizes": "Original dimensions of the images that downloaded successfully.",
        "stage_seconds": "Wall-clock seconds per stage in this run (skipped stages show their earlier time).",
        "dedup_layers": "Rows removed by each dedup layer, in pipeline order: pair dedup, image bytes, pHash "
                        "near-duplicates (image-dedup), eval-set overlap and SemDeDup (filter).",
    }
    sections = "".join(
        f"<section><h2>{title}</h2><p>{captions[key]}</p><img src='{charts[key]}' alt='{title}'></section>"
        for key, title in (("funnel", "1. The funnel"), ("similarity", "2. CLIP similarity"),
                           ("languages", "3. Languages"), ("download_status", "4. Download outcomes"),
                           ("image_sizes", "5. Image sizes"), ("stage_seconds", "6. Time per stage"),
                           ("dedup_layers", "7. Dedup layers"))
        if key in charts)
    sections += _opt_out_section(root, datasets, out, so)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipcrawl run report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#212529}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ced4da;padding:4px 8px;text-align:left}}
img{{max-width:100%;border:1px solid #e9ecef}}section{{margin-bottom:2em}}{grids.GRID_CSS}</style></head>
<body><h1>clipcrawl run report</h1>
<p>Run root: <code>{html.escape(root)}</code>. Common Crawl pages were parsed for image/alt-text pairs,
deduplicated, downloaded, scored with CLIP and split by caption language. The final subsets:</p>
<ul>{subset_list}</ul>
{_funnel_table(facts["funnel"])}
{sections}
{grid_html}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    (out / "report_facts.json").write_text(json.dumps(
        {**facts, "funnel": [f.__dict__ for f in facts["funnel"]], "similarities": len(facts["similarities"]),
         "image_sizes": len(facts["image_sizes"])}, indent=2), encoding="utf-8")
    return str(path)
