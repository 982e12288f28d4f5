"""Search a built kNN index by text, image or embedding and print the top results.

The query is embedded with the same CLIP configuration as `clip-score` (`clip.model`,
`clip.pretrained`), so scores are cosine similarities in the space the index was built from.
By default the image index is searched (text -> images, image -> similar images); `--modality text`
searches the captions' embeddings instead.

Examples:
    clipcrawl search --index data/indices/laion2B-en --text "a red circle" -k 10
    clipcrawl search --index data/indices --subset laion2B-en --image query.jpg
    clipcrawl search --index data/indices/laion2B-en --embedding query.npy --json
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/search.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import logging
import sys

import numpy as np

# pyarrow before faiss and the other native libraries: pyarrow loaded after them has crashed some
# processes at interpreter exit (apache/arrow#38352 and its kind; here once, "terminate called without
# an active exception" from a search subprocess, after `clipcrawl <command>` stopped importing every
# stage, and pandas with pyarrow first, for each command). Both commands read parquet with it anyway.
import pyarrow  # noqa: F401

from spark_jobs import cli
from spark_jobs.datasets import InputError
from udfs import fsio
from udfs.index import layout
from udfs.index import search as index_search

NAME = "search"
HELP = "search a kNN index by text, image or embedding; print URL, TEXT, score"
NEEDS_SPARK = False

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True,
                        help="one subset's index folder (<indices>/<subset>) or the indices folder")
    parser.add_argument("--subset", help="subset to search when --index holds several")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="text query")
    query.add_argument("--image", help="image file (path or URI) to search with")
    query.add_argument("--embedding", help=".npy file holding one query vector")
    parser.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    parser.add_argument("--modality", choices=sorted(layout.INDEX_FILES), default="image",
                        help="which index to search: image (default) or text embeddings")
    parser.add_argument("--json", action="store_true", help="print one JSON object per result")


def query_vector(cfg, args) -> np.ndarray:
    storage_options = cfg.get("storage.storage_options") or None
    if args.embedding:
        with fsio.open_uri(args.embedding, "rb", storage_options) as fh:
            return np.load(fh).astype(np.float32).reshape(-1)
    encoder = index_search.QueryEncoder(cfg.section("clip"), storage_options)
    if args.text is not None:
        if not args.text.strip():
            raise InputError("--text is empty")
        return encoder.encode_text(args.text)
    from PIL import Image, UnidentifiedImageError

    try:
        with fsio.open_uri(args.image, "rb", storage_options) as fh:
            image = Image.open(fh)
            image.load()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {args.image}: {exc}") from exc
    return encoder.encode_image(image)


def pick_subset(indices: dict, subset: str | None) -> index_search.SubsetIndex:
    if subset:
        if subset not in indices:
            raise InputError(f"subset {subset!r} not found (have: {', '.join(indices)})")
        return indices[subset]
    if len(indices) > 1:
        raise InputError(f"--index holds several subsets ({', '.join(indices)}): pick one with --subset")
    return next(iter(indices.values()))


def search(cfg, args) -> list[dict]:
    if args.k < 1 or args.k > int(cfg.get("serve.max_k")):
        raise InputError(f"-k must be between 1 and {cfg.get('serve.max_k')} (serve.max_k)")
    storage_options = cfg.get("storage.storage_options") or None
    memory_mapped = cfg.get("serve.memory_mapped")
    if memory_mapped is None:
        memory_mapped = bool(cfg.get("index.memory_mapped"))
    try:
        indices = index_search.open_indices(args.index, memory_mapped, cfg.get("serve.cache_dir"),
                                   storage_options)
        subset = pick_subset(indices, args.subset)
        vector = query_vector(cfg, args)
        return subset.search(vector, args.modality, args.k)
    except (layout.QueryError, ValueError) as exc:  # ModelLoadError is a ValueError too
        if isinstance(exc, InputError):
            raise
        raise InputError(str(exc)) from exc


def run(spark, cfg, args) -> None:
    results = search(cfg, args)
    for rank, row in enumerate(results, 1):
        if args.json:
            print(json.dumps(row, default=str, ensure_ascii=False))
        else:
            print(f"{rank:>3}  {row['score']:.4f}  {row['URL']}  {row['TEXT']}")
    if not results:
        print("no results", file=sys.stderr)
    return None


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
