"""`make package`: what `spark-submit --py-files` needs on a cluster.

Writes into DIST (default `dist/`):
- `clipcrawl-pyfiles.zip`: the importable packages (spark_jobs with conf/ inside it, udfs, and the
  optional serving/reporting packages), for `--py-files`;
- `jobs/<stage>.py`: the entry scripts, for `spark-submit dist/jobs/<stage>.py ARGS`;
- `requirements-cluster.txt`: the runtime dependencies, for a bootstrap/init action to pip install
  on every node when the zip is used (the wheel declares the same packages itself).
The wheel itself is built by `pip wheel` in the Makefile. Nothing in dist/ depends on the working
directory: config, profiles and presets are read as package resources (spark_jobs.config).
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("spark_jobs", "udfs", "serving", "reporting")


def _add_tree(zf: zipfile.ZipFile, folder: Path, arcroot: str) -> int:
    count = 0
    for path in sorted(folder.rglob("*")):
        if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        zf.write(path, f"{arcroot}/{path.relative_to(folder).as_posix()}")
        count += 1
    return count


def build(dist: Path) -> dict:
    dist.mkdir(parents=True, exist_ok=True)
    zip_path = dist / "clipcrawl-pyfiles.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        files = 0
        for name in PACKAGES:
            if (REPO / name / "__init__.py").exists():
                files += _add_tree(zf, REPO / name, name)
        files += _add_tree(zf, REPO / "conf", "spark_jobs/conf")
    jobs = dist / "jobs"
    jobs.mkdir(exist_ok=True)
    from spark_jobs.cli import STAGE_MODULES

    scripts = []
    for module in STAGE_MODULES:
        src = REPO / (module.replace(".", "/") + ".py")
        shutil.copy2(src, jobs / src.name)
        scripts.append(str(jobs / src.name))
    shutil.copyfile(REPO / "requirements-cluster.txt", dist / "requirements-cluster.txt")
    return {"zip": str(zip_path), "files_in_zip": files, "entry_scripts": scripts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    result = build(Path(argv[0] if argv else "dist"))
    print(f"wrote {result['zip']} ({result['files_in_zip']} files) and "
          f"{len(result['entry_scripts'])} entry scripts in {Path(result['entry_scripts'][0]).parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
