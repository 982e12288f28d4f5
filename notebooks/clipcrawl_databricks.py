# Databricks notebook source
# MAGIC %md
# MAGIC # clipcrawl on Databricks
# MAGIC
# MAGIC Runs the pipeline one stage per cell on the notebook's own `spark` session, using the installed
# MAGIC `clipcrawl` package (build it with `make package`, upload `dist/clipcrawl-*.whl`, install it on
# MAGIC the cluster or with `%pip` below). This notebook holds no pipeline logic of its own.
# MAGIC
# MAGIC Compute: every stage uses only DataFrame APIs that Spark Connect has, so the notebook runs on
# MAGIC serverless compute and on standard (shared) access mode clusters, which are Spark Connect
# MAGIC sessions, as well as on dedicated (single user) clusters. Use a GPU cluster (e.g. g5.xlarge
# MAGIC workers, ML GPU runtime, dedicated access mode) for the clip-score cell; elsewhere it runs on
# MAGIC CPU. On serverless and standard access mode, use a Unity Catalog volume
# MAGIC (`/Volumes/<catalog>/<schema>/<volume>/...`) as the root rather than `dbfs:/`.

# COMMAND ----------

# MAGIC %pip install /Volumes/main/default/clipcrawl/clipcrawl-0.1.0-py3-none-any.whl

# COMMAND ----------

dbutils = globals().get("dbutils")  # noqa: F821 - provided by Databricks
if dbutils is not None:
    dbutils.widgets.text("root", "/Volumes/main/default/clipcrawl/CC-MAIN-2024-22")
    dbutils.widgets.text("paths_file", "s3://commoncrawl/crawl-data/CC-MAIN-2024-22/wat.paths.gz")
    dbutils.widgets.text("config", "")  # optional: a YAML file of overrides, or a preset name (tiny_clip)
    ROOT = dbutils.widgets.get("root")
    PATHS_FILE = dbutils.widgets.get("paths_file") or None
    CONFIG = dbutils.widgets.get("config") or None
else:  # outside Databricks (tests import this file): harmless defaults
    ROOT, PATHS_FILE, CONFIG = "./clipcrawl-data", None, None

# COMMAND ----------

from spark_jobs.cli import setup_logging
from spark_jobs.config import load_config
from spark_jobs.run import STAGE_NAMES, run_stage

setup_logging("INFO")
cfg = load_config("databricks", CONFIG, overrides=[f"storage.root={ROOT}"])
print("stages:", ", ".join(STAGE_NAMES))

# COMMAND ----------

# MAGIC %md ## 1. Extract image/alt-text pairs from the WAT files

# COMMAND ----------


def run_cell(stage_name, **kwargs):
    """Run (or skip, if complete) one stage on the notebook's session and show its stats."""
    session = globals().get("spark")  # the notebook's session on Databricks (classic or Connect)
    if session is None:
        from spark_jobs.session import get_spark

        session = get_spark(cfg, "notebook")
    result = run_stage(session, cfg, stage_name, ROOT, **kwargs)
    print(f"{stage_name}: {result['status']} in {result['seconds']}s -> {result['output']}")
    return result


if dbutils is not None:
    run_cell("wat-extract", paths_file=PATHS_FILE)

# COMMAND ----------

# MAGIC %md ## 2. Exact dedup and the Bloom filter of pairs seen in earlier crawls

# COMMAND ----------

if dbutils is not None:
    run_cell("dedup")

# COMMAND ----------

# MAGIC %md ## 3. Download and resize the images into webdataset shards

# COMMAND ----------

if dbutils is not None:
    run_cell("download")

# COMMAND ----------

# MAGIC %md ## 3b. Image dedup: same bytes (sha256) and pHash near-duplicates never reach CLIP

# COMMAND ----------

if dbutils is not None:
    run_cell("image-dedup")

# COMMAND ----------

# MAGIC %md ## 4. CLIP embeddings and similarity (GPU when the cluster has one)

# COMMAND ----------

if dbutils is not None:
    run_cell("clip-score")

# COMMAND ----------

# MAGIC %md ## 5. Threshold filter and language split into laion2B-en / laion2B-multi / laion1B-nolang

# COMMAND ----------

if dbutils is not None:
    run_cell("filter")

# COMMAND ----------

# MAGIC %md ## 6. kNN indices over the embeddings

# COMMAND ----------

if dbutils is not None:
    run_cell("build-index")
