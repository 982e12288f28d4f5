"""clipcrawl: LAION-style CLIP-filtered image-text datasets from Common Crawl, on Spark."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _lines(name: str) -> list[str]:
    """Requirement lines of a requirements file (comments, inline ones too, and blanks dropped)."""
    out = []
    for line in (HERE / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def _named(lines: list[str], *names: str) -> list[str]:
    def name_of(line: str) -> str:
        return re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")

    return [ln for ln in lines if name_of(ln) in names]


# Runtime dependencies of the stages: requirements-cluster.txt (what a cluster node needs, without
# pyspark, which the cluster provides). Off a cluster: `clipcrawl[spark]`, and `[connect]` for the
# Spark Connect client; the versions are requirements.txt's.
REQUIREMENTS = _lines("requirements-cluster.txt")
EXTRAS = {
    "spark": _named(_lines("requirements.txt"), "pyspark"),
    "connect": _named(_lines("requirements.txt"), "grpcio", "grpcio-status", "googleapis-common-protos",
                      "protobuf", "zstandard"),
}


setup(
    name="clipcrawl",
    version="0.1.0",
    description="Build LAION-5B-style CLIP-filtered image-text datasets from Common Crawl with PySpark",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every package with an __init__.py, so udfs/<stage>/ subpackages are never left out of the wheel
    packages=find_packages(include=["spark_jobs", "udfs", "udfs.*", "reporting", "serving"]) + ["spark_jobs.conf"],
    # conf/ ships inside the package so a wheel or --py-files zip finds base.yaml and the profiles.
    package_dir={"spark_jobs.conf": "conf"},
    package_data={"spark_jobs.conf": ["*.yaml", "presets/*.yaml", "gpu/*.sh"], "serving": ["static/*.html"]},
    install_requires=REQUIREMENTS,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["clipcrawl=spark_jobs.cli:main"]},
)
