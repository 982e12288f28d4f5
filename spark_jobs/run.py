"""Run the whole pipeline from one config: wat-extract -> dedup -> download -> clip-score ->
filter -> build-index, under one root (`storage.root`) with one folder per dataset.

A stage whose output is complete (its `_stats/stats.json` exists) is skipped, so a killed run
resumes where it stopped; once a stage runs, every later stage runs too, because its input changed.
`--force STAGE` redoes one stage (and therefore the ones after it). One SparkSession serves all
stages. A summary of every stage (seconds, rows in/out) is written to `<root>/_run/run.json`.
`run.export` (empty by default) names subsets to export for training at the end (spark_jobs/export.py).

Example:
    clipcrawl run --config my_crawl.yaml --set storage.root=s3://bucket/laion-cc-2024-22
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/run.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import importlib
import logging
import sys
import time
from dataclasses import dataclass

from spark_jobs import cli, session
from spark_jobs.config import Config, ConfigError
from spark_jobs.datasets import is_complete, read_stats
from udfs import fsio

NAME = "run"
HELP = "run all stages in order from one config, skipping stages whose output is complete"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineStage:
    name: str          # CLI name, also the key in run.datasets
    module: str
    input_from: str | None   # the stage whose dataset is this stage's input (None: the crawl files)


PIPELINE = (
    PipelineStage("wat-extract", "spark_jobs.wat_extract", None),
    PipelineStage("dedup", "spark_jobs.dedup", "wat-extract"),
    PipelineStage("download", "spark_jobs.download", "dedup"),
    PipelineStage("image-dedup", "spark_jobs.image_dedup", "download"),
    PipelineStage("clip-score", "spark_jobs.clip_score", "image-dedup"),
    PipelineStage("filter", "spark_jobs.filter", "clip-score"),
    PipelineStage("build-index", "spark_jobs.knn_index", "filter"),
)
STAGE_NAMES = tuple(s.name for s in PIPELINE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="WAT/WARC paths, URIs or globs (default: run.input from the config)")
    parser.add_argument("--paths-file", help="a paths list such as wat.paths.gz (default: run.paths_file)")
    parser.add_argument("--root", help="output root, one folder per dataset (default: storage.root)")
    parser.add_argument("--from", dest="from_stage", choices=STAGE_NAMES, default=STAGE_NAMES[0],
                        help="first stage to consider")
    parser.add_argument("--to", dest="to_stage", choices=STAGE_NAMES, default=STAGE_NAMES[-1],
                        help="last stage to run")
    parser.add_argument("--force", action="append", default=[], choices=STAGE_NAMES, metavar="STAGE",
                        help="redo this stage even if its output is complete (repeatable)")


def dataset_path(cfg: Config, root: str, stage: str) -> str:
    names = cfg.get("run.datasets") or {}
    if stage not in names:
        raise ConfigError(f"run.datasets has no folder name for stage {stage!r}")
    return fsio.join(root, names[stage])


def stage_argv(cfg: Config, args: argparse.Namespace, root: str, stage: PipelineStage) -> list[str]:
    """The command line the stage would get from a user, built from the run config."""
    output = dataset_path(cfg, root, stage.name)
    if stage.input_from is not None:
        return ["--input", dataset_path(cfg, root, stage.input_from), "--output", output]
    inputs = args.input or cfg.get("run.input") or []
    paths_file = args.paths_file or cfg.get("run.paths_file")
    if not inputs and not paths_file:
        raise ConfigError("no crawl input: give --input/--paths-file or set run.input / run.paths_file")
    argv = ["--output", output]
    if inputs:
        argv += ["--input", *inputs]
    if paths_file:
        argv += ["--paths-file", paths_file]
    return argv


def parse_stage_args(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"clipcrawl {module.NAME}", add_help=False)
    module.add_arguments(parser)
    cli.add_common_arguments(parser)
    return parser.parse_args(argv)


def selected_stages(from_stage: str, to_stage: str) -> list[PipelineStage]:
    first, last = STAGE_NAMES.index(from_stage), STAGE_NAMES.index(to_stage)
    if first > last:
        raise ConfigError(f"--from {from_stage} comes after --to {to_stage}")
    return list(PIPELINE[first:last + 1])


def _row_summary(stats: dict) -> str:
    keys = ("input_rows", "output_rows", "rejected_rows")
    parts = [f"{k.replace('_rows', '')}={stats[k]}" for k in keys if isinstance(stats.get(k), int)]
    return ", ".join(parts) or "no row counts"


def run_stage(spark, cfg: Config, stage_name: str, root: str, inputs: list[str] | None = None,
              paths_file: str | None = None, force: bool = False) -> dict:
    """Run one stage under `root` (or skip it if its output is complete and not forced).

    Returns {"status": "ran"|"skipped", "output", "seconds", "stats"}. Used by `run` and by the
    Databricks notebook, which runs the pipeline one cell per stage.
    """
    stage = PIPELINE[STAGE_NAMES.index(stage_name)]
    output = dataset_path(cfg, root, stage.name)
    storage_options = cfg.get("storage.storage_options") or None
    if is_complete(output, storage_options) and not force:
        stats = read_stats(output, storage_options=storage_options)
        log.info("%s: output complete at %s, skipped (%s)", stage.name, output, _row_summary(stats))
        return {"status": "skipped", "output": output, "seconds": stats.get("seconds"), "stats": stats}
    module = importlib.import_module(stage.module)
    crawl_args = argparse.Namespace(input=inputs, paths_file=paths_file)
    stage_args = parse_stage_args(module, stage_argv(cfg, crawl_args, root, stage))
    log.info("%s: started -> %s", stage.name, output)
    t0 = time.time()
    with session.stage_jobs(spark, stage.name):
        stats = module.run(spark, cfg, stage_args) or {}
    seconds = round(time.time() - t0, 2)
    log.info("%s: finished in %.1fs (%s)", stage.name, seconds, _row_summary(stats))
    return {"status": "ran", "output": output, "seconds": seconds, "stats": stats}


def export_subsets(spark, cfg: Config, root: str, force: bool) -> dict:
    """`run.export`: each named subset exported to <root>/<run.datasets.export>/<subset> (see
    spark_jobs/export.py), skipped when complete unless the filter output changed in this run."""
    from spark_jobs import export

    storage_options = cfg.get("storage.storage_options") or None
    results = {}
    for subset in cfg.get("run.export") or []:
        output = fsio.join(dataset_path(cfg, root, "export"), subset)
        if is_complete(output, storage_options) and not force:
            stats = read_stats(output, storage_options=storage_options)
            log.info("export %s: complete at %s, skipped (%s)", subset, output, _row_summary(stats))
            results[subset] = {"status": "skipped", "output": output, "seconds": stats.get("seconds"), "stats": stats}
            continue
        stage_args = parse_stage_args(export, ["--dataset", dataset_path(cfg, root, "filter"),
                                               "--subset", subset, "--output", output])
        t0 = time.time()
        stats = export.run(spark, cfg, stage_args)
        results[subset] = {"status": "ran", "output": output, "seconds": round(time.time() - t0, 2), "stats": stats}
    return results


def _check_export_subsets(cfg: Config) -> None:
    names = set((cfg.get("filter.subsets") or {}).values())
    unknown = [s for s in cfg.get("run.export") or [] if s not in names]
    if unknown:
        raise ConfigError(f"run.export names subsets the filter does not write: {', '.join(unknown)} "
                          f"(filter.subsets: {', '.join(sorted(names))})")


def run(spark, cfg: Config, args: argparse.Namespace) -> dict:
    root = args.root or cfg.get("storage.root")
    if not root:
        raise ConfigError("no output root: give --root or set storage.root")
    _check_export_subsets(cfg)
    stages = selected_stages(args.from_stage, args.to_stage)
    summary: dict = {"root": root, "stages": {}}
    upstream_ran = False
    filter_changed = False   # the filter's output (the exports' input) was rewritten in this run
    t_run = time.time()
    for position, stage in enumerate(stages, 1):
        log.info("[%d/%d] %s", position, len(stages), stage.name)
        result = run_stage(spark, cfg, stage.name, root, args.input, args.paths_file,
                           force=upstream_ran or stage.name in args.force)
        summary["stages"][stage.name] = result
        upstream_ran = upstream_ran or result["status"] == "ran"
        if stage.name == "filter":
            filter_changed = upstream_ran
    if cfg.get("run.export") and STAGE_NAMES.index(args.to_stage) >= STAGE_NAMES.index("filter"):
        summary["exports"] = export_subsets(spark, cfg, root, force=filter_changed)
    summary["seconds"] = round(time.time() - t_run, 2)
    fsio.write_json(fsio.join(root, "_run", "run.json"), summary, cfg.get("storage.storage_options") or None)
    out = {"root": root, "seconds": summary["seconds"],
           "stages": {k: {"status": v["status"], "seconds": v["seconds"], "output": v["output"]}
                      for k, v in summary["stages"].items()}}
    if "exports" in summary:
        out["exports"] = {k: {"status": v["status"], "seconds": v["seconds"], "output": v["output"]}
                          for k, v in summary["exports"].items()}
    return out


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
