"""clipcrawl: LAION-style CLIP-filtered image-text datasets from Common Crawl, on Spark."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent


def requirements() -> list[str]:
    """Runtime dependencies: requirements.txt up to the test/lint section."""
    reqs = []
    for line in (HERE / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line.startswith("# tests"):
            break
        if line and not line.startswith("#"):
            reqs.append(line)
    return reqs


setup(
    name="clipcrawl",
    version="0.1.0",
    description="Build LAION-5B-style CLIP-filtered image-text datasets from Common Crawl with PySpark",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["spark_jobs", "udfs", "spark_jobs.conf", "reporting", "serving"],
    # conf/ ships inside the package so a wheel or --py-files zip finds base.yaml and the profiles.
    package_dir={"spark_jobs.conf": "conf"},
    package_data={"spark_jobs.conf": ["*.yaml", "presets/*.yaml", "gpu/*.sh"], "serving": ["static/*.html"]},
    install_requires=requirements(),
    entry_points={"console_scripts": ["clipcrawl=spark_jobs.cli:main"]},
)
