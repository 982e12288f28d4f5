"""Image grids for `report.html`: what was kept, what sits around the threshold, what was dropped.

A data engineer's first look after a run is at the images themselves. Three kinds of grid:
- **kept, per subset**: a seeded random sample (same `report.seed`, same sample on a rerun);
- **around the threshold**: the kept pairs closest above their bucket's threshold beside the
  dropped (`below_threshold`) pairs closest below it, where one decides if the threshold is right;
- **dropped, by reason**: a seeded sample of every drop reason whose rows have an image in a shard
  (below_threshold, near_duplicate and duplicate_image from image dedup, ...); reasons without an
  image (opted_out, failed_to_download, too_small, ...) are listed by name and count only.

Images are read from the webdataset tar shards (`tar_path`, or `<images>/<shard>.tar` from the
key) through fsspec with ranged reads, so an s3:// run works as a local one. Each is shrunk to at
most `report.thumbnail_size` px and embedded as a JPEG data URI: the page stays one file that
opens from disk with no server, at a few KB per image.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import random
from dataclasses import dataclass

from serving.thumbnails import ThumbnailReader

log = logging.getLogger(__name__)

MAX_THUMBNAIL = 128   # px: the ceiling; report.thumbnail_size may only lower it

GRID_CSS = """
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(138px,1fr));gap:8px;margin:.5em 0 1em}
.cell{border:1px solid #dee2e6;border-radius:4px;padding:4px;font-size:11px;line-height:1.3;background:#fff}
.cell img{display:block;margin:0 auto 3px;max-width:128px;max-height:128px;border:0}
.cell .cap{font-size:12px;word-break:break-word;color:#212529}
.cell .facts{color:#495057}
.cell.kept{border-top:3px solid #2b8a3e}.cell.dropped{border-top:3px solid #e8590c}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:14px}
.pair h3{font-size:14px;margin:.2em 0}
.empty{color:#868e96;font-style:italic}
@media (max-width:700px){.pair{grid-template-columns:1fr}}
"""


@dataclass
class GridOptions:
    max_images: int = 24          # report.max_images_per_grid
    thumbnail_size: int = 128     # report.thumbnail_size (capped at MAX_THUMBNAIL)
    quality: int = 70             # report.thumbnail_quality (JPEG)
    seed: int = 0                 # report.seed

    @classmethod
    def from_section(cls, section: dict | None) -> "GridOptions":
        section = section or {}
        opts = cls(**{k: section[k] for k in ("seed",) if section.get(k) is not None})
        if section.get("max_images_per_grid") is not None:
            opts.max_images = int(section["max_images_per_grid"])
        if section.get("thumbnail_size") is not None:
            opts.thumbnail_size = int(section["thumbnail_size"])
        if section.get("thumbnail_quality") is not None:
            opts.quality = int(section["thumbnail_quality"])
        opts.thumbnail_size = max(16, min(MAX_THUMBNAIL, opts.thumbnail_size))
        opts.max_images = max(1, opts.max_images)
        return opts


@dataclass
class Cell:
    """One image of a grid and what is written under it."""
    key: str
    tar_path: str | None
    caption: str
    similarity: float | None
    language: str | None
    status: str
    threshold: float | None = None
    detail: str | None = None     # e.g. the error_message of a dropped row
    data_uri: str | None = None


def _f(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class ThumbnailSource:
    """Image bytes by (tar_path, key) -> small JPEG data URI; the shard's member table is read once."""

    def __init__(self, images_dir: str | None, opts: GridOptions, storage_options: dict | None = None):
        self.images_dir = images_dir.rstrip("/") if images_dir else None
        self.opts = opts
        self.reader = ThumbnailReader(64, storage_options)
        self.read = 0
        self.missing = 0

    def tar_of(self, cell: Cell) -> str | None:
        if cell.tar_path:
            return cell.tar_path
        # download keys are {shard:05d}{index}; the shard's tar sits in the download folder
        if self.images_dir and cell.key and len(cell.key) > 5 and cell.key[:5].isdigit():
            return f"{self.images_dir}/{cell.key[:5]}.tar"
        return None

    def data_uri(self, cell: Cell) -> str | None:
        from PIL import Image

        tar = self.tar_of(cell)
        found = self.reader.read(tar, cell.key) if tar and cell.key else None
        if found is None:
            self.missing += 1
            return None
        try:
            img = Image.open(io.BytesIO(found[0]))
            img.draft("RGB", (self.opts.thumbnail_size, self.opts.thumbnail_size))
            img = img.convert("RGB")
            img.thumbnail((self.opts.thumbnail_size, self.opts.thumbnail_size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=self.opts.quality, optimize=True)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("report: image %s in %s unreadable: %s", cell.key, tar, exc)
            self.missing += 1
            return None
        self.read += 1
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def fill(self, cells: list[Cell], want: int) -> list[Cell]:
        """The first `want` cells whose image could be read, with their data URI. Gives up after
        a bounded number of misses (a reason whose rows never had an image costs little)."""
        out, misses = [], 0
        for cell in cells:
            if len(out) >= want or misses >= max(10 * want, 200):
                break
            cell.data_uri = self.data_uri(cell)
            if cell.data_uri:
                out.append(cell)
            else:
                misses += 1
        return out


def seeded_sample(cells: list[Cell], n: int, seed: int, label: str) -> list[Cell]:
    """A reproducible order: sort by key (file listing order does not matter), shuffle with a
    seed derived from `seed` and the grid's label (each grid its own stream)."""
    ordered = sorted(cells, key=lambda c: (c.key or "", c.caption))
    rng = random.Random(f"{seed}:{label}")
    rng.shuffle(ordered)
    return ordered[: max(n, 0)]


# --- the rows ------------------------------------------------------------------------------------

def kept_cells(table, subset: str) -> list[Cell]:
    if table is None:
        return []
    cols = table.column_names
    get = lambda name: table.column(name).to_pylist() if name in cols else [None] * table.num_rows  # noqa: E731
    return [Cell(key=k, tar_path=t, caption=x or "", similarity=_f(s), language=lang, status="kept",
                 detail=f"{w}×{h}" if w and h else None)
            for k, t, x, s, lang, w, h in zip(get("key"), get("tar_path"), get("TEXT"), get("similarity"),
                                              get("LANGUAGE"), get("WIDTH"), get("HEIGHT"))
            if k]


def dropped_cells(table) -> list[Cell]:
    """Rows of a rejected/annotated dataset that are not kept, with a key (so maybe an image)."""
    if table is None or "status" not in table.column_names or "key" not in table.column_names:
        return []
    cols = table.column_names
    get = lambda name: table.column(name).to_pylist() if name in cols else [None] * table.num_rows  # noqa: E731
    texts = get("text") if "text" in cols else get("TEXT")
    scores = [s if s is not None else sim for s, sim in zip(get("score"), get("similarity"))]
    out = []
    for k, t, x, s, thr, lang, status, err in zip(get("key"), get("tar_path"), texts, scores, get("threshold"),
                                                  get("LANGUAGE"), get("status"), get("error_message")):
        if k and status and status != "success":
            out.append(Cell(key=k, tar_path=t, caption=x or "", similarity=_f(s), language=lang,
                            status=status, threshold=_f(thr), detail=err))
    return out


# --- HTML ----------------------------------------------------------------------------------------

def _cell_html(cell: Cell, kind: str) -> str:
    facts = []
    if cell.similarity is not None:
        facts.append(f"sim {cell.similarity:.3f}" + (f" (thr {cell.threshold:g})" if cell.threshold is not None else ""))
    facts.append(cell.language or "no lang")
    facts.append(cell.status)
    # the error message, unless it only repeats the score and threshold shown above
    detail = (f"<div class='facts'>{html.escape(cell.detail[:90])}</div>"
              if cell.detail and kind == "dropped" and cell.status != "below_threshold" else "")
    if cell.detail and kind == "kept":
        facts.append(cell.detail)
    caption = html.escape(cell.caption[:140])
    return (f"<figure class='cell {kind}' style='margin:0'><img src='{cell.data_uri}' alt='{caption}' "
            f"><figcaption><div class='cap'>{caption}</div>"
            f"<div class='facts'>{html.escape(' · '.join(facts))}</div>{detail}</figcaption></figure>")


def _grid(cells: list[Cell], kind: str, grid_id: str) -> str:
    if not cells:
        return f"<p class='empty' id='{grid_id}'>no image to show</p>"
    return (f"<div class='grid' id='{grid_id}' data-images='{len(cells)}'>"
            + "".join(_cell_html(c, kind) for c in cells) + "</div>")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower())


def build_grids(kept: dict[str, list[Cell]], thresholds_by_subset: dict[str, float],
                dropped: list[Cell], source: ThumbnailSource) -> tuple[str, dict]:
    """(HTML of the grid sections, facts: images per grid and the rows each grid had)."""
    opts = source.opts
    n = opts.max_images
    facts: dict = {"grids": {}}
    parts = ["<section id='grids'><h2>Looking at the images</h2>"
             f"<p>Thumbnails (at most {opts.thumbnail_size} px) read from the tar shards; up to {n} per grid, "
             f"sampled with seed {opts.seed}, so a rerun shows the same images.</p>"]

    # Kept, per subset.
    parts.append("<h3>Kept pairs, by subset</h3>")
    for subset, cells in kept.items():
        shown = source.fill(seeded_sample(cells, len(cells), opts.seed, f"kept:{subset}"), n)
        facts["grids"][f"kept:{subset}"] = {"rows": len(cells), "images": len(shown)}
        parts.append(f"<h4>{html.escape(subset)}: {len(shown)} of {len(cells)} kept pairs</h4>")
        parts.append(_grid(shown, "kept", f"grid-kept-{_slug(subset)}"))

    # Around the threshold: margin = score - its bucket's threshold.
    lowest_kept = sorted(((c.similarity - thresholds_by_subset[s], c) for s, cells in kept.items()
                          for c in cells if c.similarity is not None and s in thresholds_by_subset),
                         key=lambda t: (t[0], t[1].key))
    for margin, cell in lowest_kept:
        cell.threshold = cell.threshold if cell.threshold is not None else cell.similarity - margin
    below = sorted((c for c in dropped if c.status == "below_threshold" and c.similarity is not None
                    and c.threshold is not None), key=lambda c: (-(c.similarity - c.threshold), c.key))
    half = max(1, n // 2)
    kept_side = source.fill([c for _, c in lowest_kept], half)
    dropped_side = source.fill(below, half)
    facts["grids"]["threshold:kept"] = {"rows": len(lowest_kept), "images": len(kept_side)}
    facts["grids"]["threshold:dropped"] = {"rows": len(below), "images": len(dropped_side)}
    parts.append("<h3 id='threshold'>Around the threshold</h3><p>Left: the kept pairs with the lowest "
                 "similarity above their language bucket's threshold. Right: the dropped pairs with the "
                 "highest similarity below it. If the right side looks as good as the left, the threshold "
                 "is too strict; if the left looks as bad as the right, it is too lax.</p>"
                 "<div class='pair' id='threshold-grid'>"
                 f"<div><h3>kept, lowest scores ({len(kept_side)})</h3>{_grid(kept_side, 'kept', 'grid-threshold-kept')}</div>"
                 f"<div><h3>dropped, highest scores ({len(dropped_side)})</h3>"
                 f"{_grid(dropped_side, 'dropped', 'grid-threshold-dropped')}</div></div>")

    # Dropped, by reason.
    by_reason: dict[str, list[Cell]] = {}
    for cell in dropped:
        by_reason.setdefault(cell.status, []).append(cell)
    parts.append("<h3>Dropped pairs, by reason</h3>")
    without = []
    for reason in sorted(by_reason, key=lambda r: -len(by_reason[r])):
        cells = by_reason[reason]
        shown = source.fill(seeded_sample(cells, len(cells), opts.seed, f"dropped:{reason}"), n)
        if not shown:
            without.append(f"{reason} ({len(cells)})")
            continue
        facts["grids"][f"dropped:{reason}"] = {"rows": len(cells), "images": len(shown)}
        parts.append(f"<h4>{html.escape(reason)}: {len(shown)} of {len(cells)} rows</h4>")
        parts.append(_grid(shown, "dropped", f"grid-dropped-{_slug(reason)}"))
    if without:
        facts["reasons_without_images"] = without
        parts.append("<p>Dropped before an image was stored (nothing to show): "
                     + html.escape(", ".join(without)) + ".</p>")
    parts.append("</section>")
    facts["thumbnails_read"] = source.read
    return "".join(parts), facts


# --- from a run's datasets -----------------------------------------------------------------------

KEPT_COLUMNS = ["key", "tar_path", "TEXT", "similarity", "LANGUAGE", "WIDTH", "HEIGHT"]
DROPPED_COLUMNS = ["key", "tar_path", "text", "TEXT", "score", "similarity", "threshold", "LANGUAGE",
                   "status", "error_message"]


def report_section(root: str, datasets: dict[str, str], subsets: dict[str, str],
                   thresholds: dict[str, float], section: dict | None, read_table,
                   storage_options: dict | None = None) -> tuple[str, dict]:
    """The grids of one run. `read_table(path, columns, files_glob=None)` is the report's own
    dataset reader (local or fsspec), so the grids read exactly what the charts count.

    Dropped rows come from the filter's rejected rows first (the final status of every row that
    reached it), then from the stages between download and filter (e.g. image dedup's
    near_duplicate rows), each key once, the latest stage's status winning."""
    opts = GridOptions.from_section(section)
    join = lambda *p: "/".join(x.rstrip("/") for x in p)  # noqa: E731 - URIs and local paths alike
    filter_dir = join(root, datasets["filter"])
    kept = {name: kept_cells(read_table(join(filter_dir, name), KEPT_COLUMNS), name)
            for name in subsets.values()}
    by_subset = {name: float(thresholds[bucket]) for bucket, name in subsets.items() if bucket in thresholds}
    stages = list(datasets)
    between = stages[stages.index("download"):stages.index("filter")] if {"download", "filter"} <= set(stages) else []
    sources = [(filter_dir + "_rejected", None)]
    for stage in reversed(between):
        path = join(root, datasets[stage])
        sources += [(path + "_rejected", None), (path, "*.parquet" if stage == "download" else None)]
    dropped, seen = [], set()
    for path, files_glob in sources:
        try:
            table = read_table(path, DROPPED_COLUMNS, files_glob)
        except (OSError, ValueError) as exc:   # an unreadable side dataset costs its grid, not the report
            log.warning("report grids: cannot read %s: %s", path, exc)
            continue
        for cell in dropped_cells(table):
            if cell.key not in seen:
                seen.add(cell.key)
                dropped.append(cell)
    source = ThumbnailSource(join(root, datasets["download"]) if "download" in datasets else None, opts,
                             storage_options)
    return build_grids(kept, by_subset, dropped, source)
