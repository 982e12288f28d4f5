"""Serve built kNN indices over HTTP: a JSON API and a search page.

`--index` is the indices folder (every subset is served; pick one per query with `indice_name`)
or one subset's folder. The API mirrors clip-retrieval's back end (`POST /knn-service`,
`GET /indices-list`, `POST /metadata`), so its front end and `ClipClient` can point at this server.
Text and image queries are embedded with the `clip:` config (the same model as clip-score); the
model is loaded at start unless `--no-model` (then only embedding queries are answered).
Thumbnails on the page are read from the tar shards named in the ids parquet. The page's state is
its URL (`/?q=a+red+circle&subset=laion2B-en&k=40`), so a search can be shared as a link; it
searches all subsets unless one is chosen (serving/static/index.html).

Example:
    clipcrawl serve --index data/indices --port 1234
    curl -s localhost:1234/knn-service -d '{"text": "a red circle", "num_images": 5}'
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/serve.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import logging
import sys

# pyarrow before faiss and the other native libraries: pyarrow loaded after them has crashed some
# processes at interpreter exit (apache/arrow#38352 and its kind; here once, "terminate called without
# an active exception" from a search subprocess, after `clipcrawl <command>` stopped importing every
# stage, and pandas with pyarrow first, for each command). Both commands read parquet with it anyway.
import pyarrow  # noqa: F401

from spark_jobs import cli
from spark_jobs.datasets import InputError
from udfs.index import layout, search

NAME = "serve"
HELP = "serve kNN indices: JSON API (clip-retrieval compatible) and a search web page"
NEEDS_SPARK = False

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, help="indices folder, or one subset's folder")
    parser.add_argument("--host", help="address to bind (default serve.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default serve.port; 0 picks a free one)")
    parser.add_argument("--no-model", action="store_true",
                        help="do not load CLIP: answer embedding queries only")


def build_service(cfg, index: str, with_model: bool = True):
    """Load the indices (and the model) into a KnnService; user problems become InputError."""
    from serving.service import KnnService

    storage_options = cfg.get("storage.storage_options") or None
    serve_cfg = cfg.section("serve")
    memory_mapped = serve_cfg.get("memory_mapped")
    if memory_mapped is None:
        memory_mapped = bool(cfg.get("index.memory_mapped"))
    try:
        indices = search.open_indices(index, memory_mapped, serve_cfg.get("cache_dir"), storage_options)
    except layout.QueryError as exc:
        raise InputError(str(exc)) from exc
    encoder = None
    if with_model:
        encoder = search.QueryEncoder(cfg.section("clip"), storage_options)
        try:
            dim = encoder.model.dim  # load now: a wrong model config fails at start, not per query
        except ValueError as exc:  # ModelLoadError
            raise InputError(f"cannot load the query model: {exc} (or run with --no-model)") from exc
        dims = {name: idx.dim for name, idx in indices.items() if idx.dim is not None}
        wrong = {name: d for name, d in dims.items() if d != dim}
        if wrong:
            raise InputError(f"the CLIP model gives {dim}-d vectors but these indices are not: {wrong}")
    return KnnService(indices, serve_cfg, encoder, storage_options)


def run(spark, cfg, args) -> None:
    from serving.http import make_server

    service = build_service(cfg, args.index, with_model=not args.no_model)
    host = args.host or cfg.get("serve.host")
    port = args.port if args.port is not None else int(cfg.get("serve.port"))
    server = make_server(service, host, port)
    print(f"serving {', '.join(service.indices)} on http://{host}:{server.server_address[1]}/",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
    return None


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
