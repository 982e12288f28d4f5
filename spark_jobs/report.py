"""Write `report.html` and its PNG charts for a pipeline run under `--root`.

The page tells a run's story from the written data: the row funnel with drop reasons, the CLIP
similarity histogram with the thresholds, caption languages, download outcomes, image sizes and the
time per stage. It needs no Spark: it reads the parquet datasets with pyarrow.
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
    parser.add_argument("--root", help="the run's root folder (default: storage.root); local paths only")
    parser.add_argument("--output", help="folder for report.html and the charts (default: <root>/report)")


def run(spark, cfg: Config, args: argparse.Namespace) -> dict:
    from reporting.report import build_report
    from udfs import fsio

    root = args.root or cfg.get("storage.root")
    if fsio.is_remote(root):
        raise ConfigError("the report reads a local run root; copy the datasets locally first")
    path = build_report(root, cfg.get("run.datasets"), cfg.get("filter.subsets"), args.output)
    return {"report": path}


def main(argv=None):
    return cli.main_for_stage(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
