"""Build kNN indices (autofaiss) over each subset's CLIP embeddings.

Reads the filter output's clip-retrieval layout, `<dataset>/embeddings/<subset>/{img_emb,text_emb,
metadata}`, and writes per subset `<indices>/<subset>/{image.index, text.index, ids.parquet,
index_infos.json}`. The ids parquet maps index id -> SAMPLE_ID, URL, TEXT, similarity, LANGUAGE,
punsafe, pwatermark, key, tar_path. index_infos.json holds autofaiss's choices (index key, search
parameters, size, speed) and recall@10 against exact flat search on a sample of the subset.

Budgets come from the `index:` config section (max_index_memory_usage, current_memory_available,
max_index_query_time_ms). `--set index.distributed=true` builds with autofaiss's pyspark mode on
the current session (for embeddings that do not fit one machine); `--set index.memory_mapped=true`
builds indices that `clipcrawl serve` can memory-map instead of loading.

Example:
    clipcrawl build-index --input data/dataset --output data/indices
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/knn_index.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import dataclasses
import logging
import sys

from spark_jobs import cli
from spark_jobs.config import ConfigError
from spark_jobs.datasets import InputError, StageTimer, write_stats
from udfs import fsio
from udfs.index import build, layout, tuning

NAME = "build-index"
HELP = "build image and text kNN indices (autofaiss) for each subset's embeddings"
# Only the distributed mode needs Spark; a single-machine build does not pay for a JVM start.
NEEDS_SPARK = False

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="the filter output folder (holding embeddings/<subset>/)")
    parser.add_argument("--output", required=True, help="indices folder, one sub-folder per subset")
    parser.add_argument("--subset", action="append", default=None, metavar="NAME",
                        help="build only this subset (repeatable; default: every subset found)")


def run(spark, cfg, args) -> dict:
    try:
        params = tuning.BuildParams.from_config(cfg.section("index"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    storage_options = cfg.get("storage.storage_options") or None
    if params.distributed and spark is None:
        from spark_jobs.session import get_spark

        spark = get_spark(cfg, NAME)  # autofaiss finds the active session
    if params.distributed:
        from spark_jobs.session import is_connect

        if is_connect(spark):
            raise ConfigError("index.distributed needs a classic Spark session: autofaiss's distributed "
                              "build uses RDDs, which Spark Connect does not have (build on the driver instead)")
    try:
        subsets = layout.find_subsets(args.input, storage_options)
    except layout.EmbeddingLayoutError as exc:
        raise InputError(str(exc)) from exc
    if args.subset:
        unknown = sorted(set(args.subset) - set(subsets))
        if unknown:
            raise InputError(f"subset(s) {', '.join(unknown)} not found under "
                             f"{fsio.join(args.input, 'embeddings')} (found: {', '.join(subsets) or 'none'})")
        subsets = [s for s in subsets if s in args.subset]
    timer = StageTimer()
    per_subset = {}
    for subset in subsets:
        out = fsio.join(args.output, subset)
        # autofaiss's distributed mode writes partial indices where every executor can reach them.
        tmp = fsio.join(params.temporary_indices_folder or fsio.join(args.output, "_tmp_distributed"),
                        subset)
        try:
            with timer.phase(f"index {subset}"):
                build.build_subset(fsio.join(args.input, "embeddings", subset), out,
                                 dataclasses.replace(params, temporary_indices_folder=tmp),
                                 storage_options)
        except layout.EmbeddingLayoutError as exc:
            raise InputError(str(exc)) from exc
        per_subset[subset] = _summary(out, storage_options)
        log.info("subset %s: %s", subset, per_subset[subset])
    stats = {"input": args.input, "output": args.output, "subsets": per_subset,
             "index_config": cfg.section("index"), **timer.summary()}
    write_stats(args.output, NAME, stats, storage_options=storage_options)
    return stats


def _summary(folder: str, storage_options) -> dict:
    """What was built, read back from the written files (infos and the ids parquet)."""
    import pyarrow.parquet as pq

    infos = fsio.read_json(fsio.join(folder, layout.INFOS_FILE), storage_options)
    out = {"status": infos.get("status"), "nb_vectors": infos.get("nb_vectors")}
    ids_uri = fsio.join(folder, layout.IDS_FILE)
    if fsio.exists(ids_uri, storage_options):
        with fsio.open_uri(ids_uri, "rb", storage_options) as fh:
            out["ids_rows"] = pq.ParquetFile(fh).metadata.num_rows
    for kind, kinfo in infos.get("indices", {}).items():
        out[kind] = {k: kinfo.get(k) for k in ("index_key", "index_param", "size in bytes",
                                                "recall@10", "avg_search_speed_ms", "build_seconds")}
    return out


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
