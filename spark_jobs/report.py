"""Write `report.html` and its PNG charts for a pipeline run under `--root`.

The page tells a run's story from the written data: the row funnel with drop reasons, the CLIP
similarity histogram with the thresholds, caption languages, download outcomes, image sizes and the
time per stage, then grids of the images themselves (kept per subset, around the threshold, dropped
by reason; `report:` config). It needs no Spark: it reads the parquet datasets with pyarrow and the
thumbnails from the tar shards, locally or on s3:// through fsspec.
"""

if __package__ in (None, ""):  # run as `spark-submit spark_jobs/report.py`: make the repo importable
    import os
    import sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import sys

from spark_jobs import cli
from spark_jobs.config import Config, ConfigError

NAME = "report"
HELP = "write report.html (+ PNG charts) for a pipeline run"
NEEDS_SPARK = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="the run's root folder or URI (default: storage.root)")
    parser.add_argument("--output", help="local folder for report.html and the charts "
                                         "(default: <root>/report, or ./report for an s3:// root)")


def run(spark, cfg: Config, args: argparse.Namespace) -> dict:
    from reporting.report import build_report
    from udfs import fsio

    root = args.root or cfg.get("storage.root")
    if args.output and fsio.is_remote(args.output):
        raise ConfigError("--output must be a local folder: the report is read from disk")
    path = build_report(root, cfg.get("run.datasets"), cfg.get("filter.subsets"), args.output,
                        cfg.section("report"), cfg.get("storage.storage_options") or None)
    return {"report": path}


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
