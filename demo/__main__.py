"""`make demo`: the whole pipeline on a bundled sample, on this machine, in a few minutes.

1. Starts a loopback image server and writes a few synthetic Common Crawl WAT files whose image
   links point at it (demo/sample.py: matching and mismatching captions in en/de/fr, plus tiny
   images, opted-out images, 404s, duplicates and too-short alt-texts).
2. Runs every stage in local[*] with `clipcrawl run`, using the project's own tiny CLIP model
   (conf/presets/tiny_clip.yaml; hub weights can't be downloaded everywhere).
3. Prints where everything is and a sample search; writes report.html with its charts.

    python -m demo [--images 240] [--out demo-output]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET = REPO / "conf" / "presets" / "tiny_clip.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240, help="distinct image links in the sample")
    parser.add_argument("--wat-files", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "demo-output"), help="demo folder (wiped first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides")
    parser.add_argument("--query", default="a red circle", help="the sample search")
    return parser.parse_args(argv)


def demo_config(root: Path, wat_files: list[str], extra: list[str]):
    from spark_jobs.config import load_config

    return load_config("local", config_file=str(PRESET), overrides=[
        f"storage.root={root}",
        f"run.input={json.dumps(wat_files)}",
        "download.allowed_cidrs=127.0.0.0/8",   # the sample's images live on loopback
        f"dedup.seen={root / '_filters' / 'seen_pairs'}",
        "dedup.shards=4",                        # a sample of hundreds of rows needs few filter shards
        "dedup.expected_keys=100000",
        *extra,
    ])


def run_demo(images: int, wat_files: int, out: Path, overrides: list[str], query: str) -> dict:
    from demo.sample import build_sample
    from spark_jobs import run as pipeline
    from spark_jobs import search
    from spark_jobs.cli import setup_logging
    from spark_jobs.session import get_spark
    from tests.gen.image_server import ImageServer

    setup_logging("INFO")
    log = logging.getLogger("demo")
    if out.exists():
        shutil.rmtree(out)
    root = out / "run"
    t0 = time.time()
    with ImageServer() as server:
        log.info("image server on %s", server.url("/"))
        sample = build_sample(server, out / "sample", n_images=images, n_files=wat_files)
        log.info("sample: %d WAT files, %d image links (%s)", len(sample["wat_files"]), sample["links"],
                 ", ".join(f"{k}={v}" for k, v in sorted(sample["kinds"].items())))
        cfg = demo_config(root, sample["wat_files"], overrides)
        spark = get_spark(cfg, "demo")
        result = pipeline.run(spark, cfg, argparse.Namespace(
            input=None, paths_file=None, root=None, from_stage=pipeline.STAGE_NAMES[0],
            to_stage=pipeline.STAGE_NAMES[-1], force=[]))
        log.info("image server answered %d requests", server.request_count())

    from reporting.report import build_report

    report = build_report(str(root), cfg.get("run.datasets"), cfg.get("filter.subsets"), str(out / "report"))
    en_subset = cfg.get("filter.subsets.en")
    hits = search.search(cfg, argparse.Namespace(
        index=str(root / cfg.get("run.datasets.build-index")), subset=en_subset, text=query, image=None,
        embedding=None, k=5, modality="image", json=False))
    return {"root": root, "sample": sample, "result": result, "report": report, "hits": hits,
            "seconds": time.time() - t0, "cfg": cfg}


def print_summary(d: dict, query: str) -> None:
    cfg, root = d["cfg"], d["root"]
    names = cfg.get("run.datasets")
    print("\n== clipcrawl demo finished in %.0fs" % d["seconds"])
    print(f"sample WAT files : {Path(d['sample']['wat_files'][0]).parent}")
    for stage, info in d["result"]["stages"].items():
        print(f"{stage:<12} {info['status']:<8} {info['seconds'] or 0:>7.1f}s  {root / names[stage]}")
    for subset in cfg.get("filter.subsets").values():
        print(f"subset           {root / names['filter'] / subset}")
    print(f"report           {d['report']}")
    print(f"\n== search the {cfg.get('filter.subsets.en')} image index for {query!r}:")
    for rank, hit in enumerate(d["hits"], 1):
        print(f"{rank:>3}  {hit['score']:.3f}  {hit['TEXT']:<40} {hit['URL']}")
    print(f"\nTry: .venv/bin/clipcrawl search --config {PRESET.relative_to(REPO)} "
          f"--index {root / names['build-index']} --subset {cfg.get('filter.subsets.en')} --text 'ein blauer Stern'")
    print(f"     .venv/bin/clipcrawl serve --config {PRESET.relative_to(REPO)} --index {root / names['build-index']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run_demo(args.images, args.wat_files, Path(args.out).resolve(), args.overrides, args.query)
    print_summary(result, args.query)
    return 0


if __name__ == "__main__":
    sys.exit(main())
