"""The `clipcrawl` command: one subcommand per stage, the same arguments as
`spark-submit spark_jobs/<stage>.py`.

A stage module provides NAME, HELP, `add_arguments(parser)` and `run(spark, cfg, args) -> dict`
(the stats it wrote); `NEEDS_SPARK = False` marks commands that run without a session (search,
serve). This module adds the flags every stage shares and turns user errors into one-line
messages with exit code 2 instead of tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from types import ModuleType

from spark_jobs.config import PROFILES, ConfigError, load_config

# Subcommands in pipeline order: command name -> module. A new stage adds its module here.
# The names are here, not only in each module's NAME, so that `clipcrawl <command>` imports that
# command's module alone: importing all of them pulls pandas and pyarrow into the driver (the
# filter and export modules' udfs), ~70 MB of driver RSS and ~0.5 s before the JVM even starts.
STAGES = {
    "wat-extract": "spark_jobs.wat_extract",
    "dedup": "spark_jobs.dedup",
    "download": "spark_jobs.download",
    "image-dedup": "spark_jobs.image_dedup",
    "clip-score": "spark_jobs.clip_score",
    "filter": "spark_jobs.filter",
    "run": "spark_jobs.run",
    "report": "spark_jobs.report",
    "build-index": "spark_jobs.knn_index",
    "search": "spark_jobs.search",
    "serve": "spark_jobs.serve",
    "takedown": "spark_jobs.takedown",
    "export": "spark_jobs.export",
}
STAGE_MODULES = tuple(STAGES.values())

EXIT_USER_ERROR = 2


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("configuration")
    group.add_argument("--profile", choices=PROFILES, default="local",
                       help="config profile from conf/<profile>.yaml (default: local)")
    group.add_argument("--config", metavar="FILE",
                       help="a YAML file merged over the profile (same keys as conf/base.yaml)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config value, e.g. --set download.image_size=384 (repeatable)")
    group.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def _load_stage(name: str) -> ModuleType:
    return importlib.import_module(name)


def build_parser(modules: list[ModuleType] | None = None) -> argparse.ArgumentParser:
    modules = modules if modules is not None else [_load_stage(m) for m in STAGE_MODULES]
    parser = argparse.ArgumentParser(
        prog="clipcrawl",
        description="Build LAION-style CLIP-filtered image-text datasets from Common Crawl with Spark.",
        epilog="Run `clipcrawl <command> --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for module in modules:
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        add_common_arguments(p)
        p.set_defaults(_module=module)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "botocore", "s3fs", "fsspec", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def execute(module: ModuleType, args: argparse.Namespace) -> int:
    """Load config, get the session if the command needs one, run it, print its summary."""
    from spark_jobs.datasets import InputError

    setup_logging(args.log_level)
    try:
        cfg = load_config(args.profile, args.config, args.overrides)
        spark = None
        if getattr(module, "NEEDS_SPARK", True):
            from spark_jobs.session import get_spark
            spark = get_spark(cfg, module.NAME)
        result = module.run(spark, cfg, args)
    except (ConfigError, InputError) as exc:
        print(f"clipcrawl {module.NAME}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if result is not None:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


def parser_for(argv: list[str]) -> argparse.ArgumentParser:
    """The parser of the command that argv names, built from that module alone; the whole
    parser (every module) when argv names none, as for `clipcrawl --help` or a typo."""
    name = argv[0] if argv else None
    return build_parser([_load_stage(STAGES[name])] if name in STAGES else None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser_for(argv).parse_args(argv)
    return execute(args._module, args)


def main_for_stage(module: ModuleType, argv: list[str] | None = None) -> int:
    """Entry point of `spark-submit spark_jobs/<stage>.py ARGS`: the stage's own parser."""
    parser = argparse.ArgumentParser(prog=f"spark_jobs/{os.path.basename(module.__file__)}",
                                     description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    add_common_arguments(parser)
    return execute(module, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
