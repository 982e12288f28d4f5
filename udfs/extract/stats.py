"""wat-extract's stats from what it wrote: kept pairs by crawl, rejected rows by reason and level,
and the per-file outcomes (udfs.extract.wat.FileOutcome) summed; with the balance checks that every
link and every record is accounted for.
"""

from __future__ import annotations

from collections import Counter

from udfs.extract.warc_records import MAX_EVENTS


def extract_stats(kept: dict[tuple, int], rejected: dict[tuple, int], outcomes: list[dict]) -> dict:
    """`kept`: rows by (crawl, alt_truncated); `rejected`: rows by (status, level); `outcomes`:
    one dict per input file."""
    kept_by_crawl: dict[str, int] = {}
    for (crawl, _), n in kept.items():
        kept_by_crawl[crawl] = kept_by_crawl.get(crawl, 0) + n
    rejected_by_reason: dict[str, int] = {}
    rejected_by_level: dict[str, int] = {}
    for (status, level), n in rejected.items():
        rejected_by_reason[status] = rejected_by_reason.get(status, 0) + n
        rejected_by_level[level] = rejected_by_level.get(level, 0) + n
    sums = {c: sum(int(o.get(c) or 0) for o in outcomes) for c in (
        "records_read", "metadata_records", "html_records", "links_seen", "records_non_utf8",
        "compressed_bytes", "records_lost", "bytes_skipped", "records_bad_date",
        "records_charset_detected", "records_not_html", "records_rejected", "records_damaged")}
    maps = {c: sum_maps(o.get(c) for o in outcomes)
            for c in ("records_by_type", "lost_reasons", "quirks", "damage_reasons")}
    # lost records with a rejected row: those of files that were read, one row per record up to
    # MAX_EVENTS per file (a file with nothing readable has only its outcome)
    lost_with_rows = sum(min(int(o.get("records_lost") or 0), MAX_EVENTS) for o in outcomes
                         if int(o.get("records_read") or 0) > 0)
    files_by_status = Counter(o["status"] for o in outcomes)
    problems = sorted(({"source_file": o["source_file"], "status": o["status"],
                        "error": o["error_message"]} for o in outcomes if o["status"] != "ok"),
                      key=lambda p: p["source_file"])
    pairs_kept = sum(kept_by_crawl.values())
    link_rejects = rejected_by_level.get("link", 0)
    out = {
        "files": {"total": len(outcomes), "ok": files_by_status.get("ok", 0),
                  "partial": files_by_status.get("partial", 0),
                  "failed": files_by_status.get("failed", 0)},
        "files_with_problems": problems[:100],
        "records_read": sums["records_read"],
        "metadata_records": sums["metadata_records"],
        "html_records": sums["html_records"],
        "links_seen": sums["links_seen"],
        "pairs_kept": pairs_kept,
        "pairs_kept_by_crawl": kept_by_crawl,
        "alt_truncated": sum(n for (_, truncated), n in kept.items() if truncated),
        "records_non_utf8": sums["records_non_utf8"],
        "rejected_by_reason": rejected_by_reason,
        "rejected_links": link_rejects,
        "rejected_records": rejected_by_level.get("record", 0),
        # kept + rejected links must equal the links seen; False would mean lost rows
        "links_accounted": pairs_kept + link_rejects == sums["links_seen"],
        "compressed_bytes": sums["compressed_bytes"],
        # every record accounted for: read (by type) or lost (by reason)
        "records_by_type": maps["records_by_type"],
        "records_accounted": sum(maps["records_by_type"].values()) == sums["records_read"],
        "records_not_html": sums["records_not_html"],
        "records_lost": sums["records_lost"],
        "lost_reasons": maps["lost_reasons"],
        # each lost record is also a rejected row (files losing over 1000 list the first 1000)
        "lost_in_rejected": sum(rejected_by_reason.get(k, 0) for k in maps["lost_reasons"]),
        "bytes_skipped": sums["bytes_skipped"],
        "records_bad_date": sums["records_bad_date"],
        "records_charset_detected": sums["records_charset_detected"],
        "quirks": maps["quirks"],
        # read although damaged (lying Content-Length, body that does not decode): each is one
        # rejected row with status bad_record (its pairs, if any, are kept)
        "records_damaged": sums["records_damaged"],
        "damage_reasons": maps["damage_reasons"],
        "damaged_in_rejected": rejected_by_reason.get("bad_record", 0),
        # the stage's input units, counted by the file outcomes: image links seen, plus records
        # rejected whole, read despite damage, or lost; kept + rejected rows must equal them
        "input_rows": (sums["links_seen"] + sums["records_rejected"] + sums["records_damaged"]
                       + lost_with_rows),
        "output_rows": pairs_kept,
        "rejected_rows": sum(rejected_by_reason.values()),
    }
    out["balanced"] = out["output_rows"] + out["rejected_rows"] == out["input_rows"]
    return out


def sum_maps(maps) -> dict:
    total: dict[str, int] = {}
    for m in maps:
        for k, v in (m or {}).items():
            total[k] = total.get(k, 0) + int(v or 0)
    return dict(sorted(total.items()))
