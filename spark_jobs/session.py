"""The one place a SparkSession is obtained.

On EMR, Dataproc and Databricks the session (and its master, memory and GPU settings) belongs to
the cluster, so an active session is reused as it is. `spark.remote` (or the standard
`SPARK_REMOTE` variable) gives a Spark Connect session instead: the client/server mode of Spark 4,
and what Databricks serverless and shared-access compute hand a notebook. Otherwise a session is
built here when `spark.master` is set (the local profile, tests).

Stages use only APIs both kinds of session have; the few session-level calls that differ (log
level, job descriptions) live here, behind `is_connect`.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import time

from spark_jobs.config import Config

log = logging.getLogger(__name__)


def lighten_numpy_converters() -> list[str]:
    """Keep PySpark's py4j numpy converters from importing pandas and pyarrow into the driver.

    PySpark 4's NumpyScalarConverter / NumpyArrayConverter run `can_convert` on every py4j call
    argument, and it imports `pyspark.testing.utils` just to read `have_numpy` (is numpy
    installed?); that module imports pandas and pyarrow. The first py4j call (SparkConf in
    SparkContext's start) therefore costs every driver ~85 MB of RSS (129 -> 43 MB measured on a
    download run's driver). The replacement answers the same question without the import: an
    object can only be a numpy array or scalar if numpy is already imported. Only the versions
    that read `have_numpy` are patched; returns the names of the classes changed.
    """
    from pyspark.sql import types

    def can_convert_scalar(self, obj) -> bool:
        np = sys.modules.get("numpy")
        return np is not None and isinstance(obj, np.generic)

    def can_convert_array(self, obj) -> bool:
        np = sys.modules.get("numpy")
        return np is not None and isinstance(obj, np.ndarray) and obj.ndim == 1

    changed = []
    for name, replacement in (("NumpyScalarConverter", can_convert_scalar),
                              ("NumpyArrayConverter", can_convert_array)):
        cls = getattr(types, name, None)
        current = getattr(cls, "can_convert", None)
        if current is not None and "have_numpy" in current.__code__.co_names:
            cls.can_convert = replacement
            changed.append(name)
    return changed


def class_archive(setting: str | None) -> str | None:
    """The path of the driver JVM's class-data-sharing archive (`spark.class_archive`): None (off),
    a path, or `auto`: one per user, pyspark version and java binary under the temp dir."""
    if not setting:
        return None
    if setting != "auto":
        return os.path.expanduser(str(setting))
    import pyspark

    java = os.path.realpath(shutil.which("java") or os.environ.get("JAVA_HOME", "java"))
    tag = hashlib.sha1(f"{pyspark.__version__} {java}".encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"clipcrawl-cds-{os.getuid()}", f"spark-{tag}.jsa")


def class_archive_options(path: str | None) -> tuple[str, str | None]:
    """JVM options for AppCDS, and the file the JVM will dump to (None when it only reads).

    A Spark driver JVM loads ~10,000 classes at start; mapping them from an archive instead of
    parsing them from 280 jars is the start-up cost a short `clipcrawl <stage>` command pays.
    The first run dumps its loaded classes at exit (JDK 13+ dynamic archive) into a file of its
    own, which `promote_class_archive` renames into place once that JVM has exited, so a reader
    never maps a half-written archive; later runs map it. A stale archive (another JDK or class
    path) is refused by the JVM itself, silently, and the run proceeds without it.
    """
    if not path:
        return "", None
    quiet = "-Xlog:cds=off -Xlog:cds+dynamic=off"
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        return f"-XX:SharedArchiveFile={path} {quiet}", None
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    now = time.time()
    for name in os.listdir(folder):   # another run's dump: one at a time; a dead run's is removed
        other = os.path.join(folder, name)
        if name.startswith(os.path.basename(path) + ".") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(other) < DUMP_WAIT_SECONDS:
                    return "", None
                os.remove(other)
    dump = f"{path}.{os.getpid()}.tmp"
    return f"-XX:ArchiveClassesAtExit={dump} {quiet}", dump


DUMP_WAIT_SECONDS = 300.0   # the longest wait for the archive dump at exit (~25 s on 2 busy cores)


def promote_class_archive(dump: str, path: str, timeout: float = DUMP_WAIT_SECONDS) -> bool:
    """At interpreter exit: end the driver JVM (EOF on its stdin is how pyspark's gateway is told to
    exit), wait for its archive dump, and move the dump into place. True when it was moved."""
    from pyspark import SparkContext

    proc = getattr(getattr(SparkContext, "_gateway", None), "proc", None)
    if proc is None:
        return False
    try:
        if SparkContext._active_spark_context is not None:
            SparkContext._active_spark_context.stop()
        proc.stdin.close()
        proc.wait(timeout=timeout)
    except Exception:  # noqa: BLE001 - best effort at exit; the next run dumps again
        with contextlib.suppress(Exception):
            proc.kill()   # never leave a JVM writing a half archive behind
            proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            os.remove(dump)
        return False
    if proc.returncode == 0 and os.path.isfile(dump) and os.path.getsize(dump) > 0:
        os.replace(dump, path)
        return True
    with contextlib.suppress(OSError):
        os.remove(dump)
    return False


def is_connect(spark) -> bool:
    """A Spark Connect session (pyspark.sql.connect), which has no SparkContext, RDDs or py4j."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def remote_url(cfg: Config) -> str | None:
    """The Spark Connect URL: `spark.remote` from the config, else `SPARK_REMOTE` (pyspark's own
    variable, which its builder would read anyway), else None for a classic session."""
    return cfg.get("spark.remote") or os.environ.get("SPARK_REMOTE") or None


def get_spark(cfg: Config, app_name: str | None = None):
    """The active session, else a new one named `<spark.app_name>-<app_name>`: a Spark Connect
    session when `remote_url` gives one, else a classic one."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    prefix = cfg.get("spark.app_name") or "clipcrawl"
    builder = SparkSession.builder.appName(f"{prefix}-{app_name}" if app_name else prefix)
    remote = remote_url(cfg)
    if remote:
        # spark.master and static settings (driver memory, JVM options) belong to the server;
        # only session (spark.sql.*) settings are sent.
        builder = builder.remote(remote)
    else:
        lighten_numpy_converters()
        master = cfg.get("spark.master")
        if master and os.environ.get("PYSPARK_GATEWAY_PORT"):
            # A driver started by spark-submit (or the pyspark shell) already has its master;
            # the command line wins over the profile.
            log.info("spark.master %s ignored: this driver was started by spark-submit", master)
        elif master:
            builder = builder.master(master)
            # Local Python workers must run the interpreter that has our dependencies (the venv),
            # not whatever `python3` is first on PATH.
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
            os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    skipped = []
    conf = dict(cfg.get("spark.conf") or {})
    archive, dump = None, None
    if not remote and cfg.get("spark.master") and not os.environ.get("PYSPARK_GATEWAY_PORT"):
        archive = class_archive(cfg.get("spark.class_archive"))   # this process starts the JVM
        options, dump = class_archive_options(archive)
        if options:
            key = "spark.driver.extraJavaOptions"
            conf[key] = f"{conf.get(key) or ''} {options}".strip()
    for key, value in conf.items():
        if remote and not key.startswith("spark.sql."):
            skipped.append(key)   # static or application settings: the server's own
            continue
        builder = builder.config(key, str(value))
    if skipped:
        log.info("spark connect: %s left to the server (not session settings)", ", ".join(sorted(skipped)))
    spark = builder.getOrCreate()
    if dump:
        atexit.register(promote_class_archive, dump, archive)
    if is_connect(spark):
        # No log-level API over Connect: the server's log4j settings apply.
        log.info("spark connect session at %s (server version %s)", remote, spark.version)
    else:
        spark.sparkContext.setLogLevel("WARN")
        log.info("spark session %s (master=%s, version=%s)", spark.sparkContext.appName,
                 spark.sparkContext.master, spark.version)
    return spark


def shuffle_partitions(spark) -> int:
    """spark.sql.shuffle.partitions of the session (200, Spark's default, when unreadable)."""
    try:
        return max(1, int(spark.conf.get("spark.sql.shuffle.partitions")))
    except (TypeError, ValueError):
        return 200


@contextlib.contextmanager
def stage_jobs(spark, stage: str):
    """Label the Spark jobs of one stage: a job tag (`clipcrawl-<stage>`, shown in the UI's job
    list and usable with `spark.interruptTag`) on both kinds of session, plus the job description
    on a classic one (Connect has no API for descriptions; the server sets its own)."""
    tag = f"clipcrawl-{stage}"
    spark.addTag(tag)
    if not is_connect(spark):
        spark.sparkContext.setJobDescription(f"clipcrawl {stage}")
    try:
        yield
    finally:
        spark.removeTag(tag)
        if not is_connect(spark):
            spark.sparkContext.setJobDescription(None)


ARROW_MAX_BYTES = "spark.sql.execution.arrow.maxBytesPerBatch"
_INT_MAX = str(2 ** 31 - 1)   # the value Spark reads as "no byte limit"


@contextlib.contextmanager
def arrow_batches_by_rows(spark):
    """Arrow batches sent to Python workers cut by row count alone (maxRecordsPerBatch, 10,000 by
    default), for jobs whose rows are small (keys, export metadata). With a byte limit (64 MB by
    default since Spark 4) the JVM measures the whole batch after every row it appends, which here
    made the transfer to Python 1.2-1.9x slower (4M rows of keys: 1.9-2.2 s vs 1.0-1.2 s). Image
    bytes (clip-score) keep the byte limit. A limit the user set is kept."""
    try:
        mine = spark.conf.get(ARROW_MAX_BYTES, None) is None
    except Exception:  # noqa: BLE001 - a server that refuses the read: leave the setting alone
        mine = False
    if mine:
        spark.conf.set(ARROW_MAX_BYTES, _INT_MAX)
    try:
        yield
    finally:
        if mine:
            spark.conf.unset(ARROW_MAX_BYTES)
