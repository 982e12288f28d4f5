"""Remove listed items from everything a pipeline root has published, with a record of what was
removed from which file.

    clipcrawl takedown --root ROOT --list FILE

FILE (local or s3) holds one entry per line: a URL, `sample_id:<int>`, `sha256:<hex>` or
`domain:<host>`. Matches leave the three subsets' parquet, `scored`, the rejected datasets, the
clip-retrieval embeddings layouts (rewritten row-aligned), the tar shards and the kNN indices with
their ids parquet. The download metadata keeps a `taken_down` row per item (URL only), and the
download stage's inputs keep the row without its caption, so reruns plan the same shards.
`<ROOT>/_takedown/<UTC timestamp>.json` records the run; `<ROOT>/_takedown/blocked/` is the block
store the download stage reads, so a later `clipcrawl run` never fetches the items again;
`<ROOT>/_takedown/removal_list.txt` lists every SAMPLE_ID taken down, for holders of copies.

A second run with the same list removes nothing and says so. A killed run leaves each file old or
new; the next run finishes its swaps. Plain Python over files (a thread pool): no Spark session.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/takedown.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import logging
import sys

from spark_jobs import cli, faults
from spark_jobs.config import ConfigError
from spark_jobs.datasets import InputError
from udfs import fsio
from udfs.takedown import rewrite as td

NAME = "takedown"
HELP = "remove listed URLs / sample_ids / sha256s / domains from every published file under a root"
NEEDS_SPARK = False

log = logging.getLogger(__name__)

# Datasets that feed download: their rows are kept without content, so shard plans stay the same.
DOWNLOAD_INPUT_STAGES = ("wat-extract", "dedup")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="pipeline root (default: storage.root)")
    parser.add_argument("--list", dest="list_uri", required=True, metavar="FILE",
                        help="removal list (local or s3): URL, sample_id:<int>, sha256:<hex>, domain:<host>")


def run(spark, cfg, args) -> dict:
    root = args.root or cfg.get("storage.root")
    if not root:
        raise ConfigError("no root: give --root or set storage.root")
    storage_options = cfg.get("storage.storage_options") or None
    if not fsio.exists(args.list_uri, storage_options):
        raise InputError(f"removal list {args.list_uri} does not exist")
    if not fsio.exists(root, storage_options):
        raise InputError(f"root {root} does not exist")
    names = cfg.get("run.datasets") or {}
    tombstone_dirs = [names[s] for s in DOWNLOAD_INPUT_STAGES if s in names]
    spec = faults.fault_spec(cfg)
    try:
        record = td.takedown(root, args.list_uri, storage_options, tombstone_dirs=tombstone_dirs,
                             block_store=cfg.get("takedown.block_store"),
                             threads=int(cfg.get("takedown.threads") or 1),
                             fault=(lambda step: faults.maybe_fail_step(spec, NAME, step)) if spec else None)
    except td.TakedownError as exc:
        raise InputError(str(exc)) from exc
    log.info("takedown: %s (record %s)", record["message"], record["record"])
    if record["bad_lines"]:
        log.warning("takedown: %d lines of %s were not understood (listed in the record)",
                    len(record["bad_lines"]), args.list_uri)
    return {k: record[k] for k in ("record", "message", "changed", "items_removed", "removals",
                                   "files_changed", "matches_by_entry", "bad_lines", "seconds",
                                   "recovered_runs", "block_store_added")}


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
