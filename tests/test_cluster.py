"""The README's `--py-files` recipe on a real cluster manager, and GPU scheduling for clip-score.

A Spark standalone cluster (a master and two 1-core workers from pyspark's own `spark-class`, on
127.0.0.1, random ports; each worker reports one fake GPU through a discovery script) runs
`spark-submit --py-files <dist>/clipcrawl-pyfiles.zip <dist>/jobs/run.py` from an empty folder.
Driver and executors run a Python that has the dependencies but not the checkout: a fresh venv
whose only addition is a .pth naming the main venv's site-packages (so the editable install's
finder, a .pth of its own, is never run). It cannot import spark_jobs by itself (checked), so the
job's code can only come from the zip. The run starts at download (the local run's dedup output
is its input, images from the loopback server) and goes through build-index; every dataset it
writes must equal the local run's (tests/conftest.py `local_demo_run`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests import spark_daemons
from tests.run_outputs import pipeline_outputs

REPO = Path(__file__).resolve().parent.parent
FAKE_GPUS = [["3"], ["5"]]    # worker i's GPU addresses: never the habitual "0"


# --- unit: the device clip-score picks for a task (TaskContext and CUDA mocked) ----------------

class FakeTaskContext:
    def __init__(self, gpus=None, partition=0):
        from pyspark.resource import ResourceInformation

        self._resources = {"gpu": ResourceInformation("gpu", gpus)} if gpus else {}
        self._partition = partition

    def resources(self):
        return self._resources

    def partitionId(self):
        return self._partition

    def cpus(self):
        return 1


def test_task_device_is_the_assigned_gpu():
    from udfs.clip.partition import assigned_gpus, task_device

    assert assigned_gpus(FakeTaskContext(["3"])) == ["3"]
    assert assigned_gpus(FakeTaskContext()) is None and assigned_gpus(None) is None
    assert task_device("auto", ["3"], has_cuda=True) == "cuda:3"
    assert task_device("auto", ["2", "6"], has_cuda=True) == "cuda:2"
    assert task_device("auto", None, has_cuda=True) == "cuda"        # no GPU scheduling: torch's default
    assert task_device("auto", ["3"], has_cuda=False) == "cpu"       # assigned, but no CUDA in this worker
    assert task_device("cuda:1", ["3"], has_cuda=True) == "cuda:1"   # an explicit device wins


def test_scorer_loads_the_model_on_the_tasks_gpu(monkeypatch, tmp_path):
    """The scorer Spark runs (make_partition_scorer) asks for the model on cuda:<assigned>, with
    TaskContext mocked to carry GPU 5 and torch.cuda.is_available mocked to True."""
    import pyspark
    import torch

    from spark_jobs import clip_score
    from udfs.clip import clip_model

    asked = []

    class Stop(Exception):
        pass

    def fake_cached_clip(model, pretrained, device, precision, gpus, storage_options):
        asked.append(device)
        raise Stop

    monkeypatch.setattr(pyspark.TaskContext, "get", classmethod(lambda cls: FakeTaskContext(["5"], 7)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)   # not this test process's threads
    monkeypatch.setattr(clip_model, "cached_clip", fake_cached_clip)
    scorer = clip_score.make_partition_scorer({"device": "auto", "torch_threads": 1}, {"model": "m", "pretrained": None},
                                              None, str(tmp_path), str(tmp_path), None)
    frame = pd.DataFrame([{"key": "000000000", "shard": 0, "status": "success", "url": "u", "text": "t"}])
    with pytest.raises(Stop):
        list(scorer(iter([frame])))
    assert asked == ["cuda:5"]


# --- packaging: requirements, and config read from the zip and the wheel ----------------------------

def _requirement_lines(path: Path) -> list[str]:
    return [ln.split("#")[0].strip() for ln in path.read_text().splitlines() if ln.split("#")[0].strip()]


def test_cluster_requirements_are_the_runtime_requirements():
    """requirements-cluster.txt pins what requirements.txt pins (same specifiers) and is what the
    wheel declares; pyspark and the Connect client are extras, not node requirements."""
    import runpy

    import setuptools

    cluster = _requirement_lines(REPO / "requirements-cluster.txt")
    assert set(cluster) <= set(_requirement_lines(REPO / "requirements.txt"))
    captured = {}
    real_setup = setuptools.setup
    setuptools.setup = lambda **kw: captured.update(kw)
    try:
        runpy.run_path(str(REPO / "setup.py"), run_name="setup")
    finally:
        setuptools.setup = real_setup
    assert captured["install_requires"] == cluster
    assert captured["extras_require"]["spark"] == ["pyspark==4.3.0"]
    assert {r.split("==")[0] for r in captured["extras_require"]["connect"]} == {
        "grpcio", "grpcio-status", "googleapis-common-protos", "protobuf", "zstandard"}


CONFIG_PROBE = ("import json, spark_jobs, spark_jobs.config as c; "
                "cfg = c.load_config('standalone', 'conf/presets/tiny_clip.yaml'); "
                "print(json.dumps({'module': spark_jobs.__file__, 'conf': str(c.conf_dir()), 'presets': c.presets(), "
                "'threshold': cfg.get('filter.thresholds.en'), 'batch': c.load_config('emr', 'tiny_clip').get('clip.batch_size'), "
                "'image_size': cfg.get('download.image_size')}))")


def _probe_config(python: Path, path_entry: Path, cwd: Path) -> dict:
    env = spark_daemons.base_env(PYTHONPATH=str(path_entry))
    proc = subprocess.run([str(python), "-c", CONFIG_PROBE], capture_output=True, text=True, cwd=str(cwd),
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_config_and_presets_load_from_the_zip_and_the_wheel(node_python, tmp_path):
    """From another working directory, with only the zip (or only the unpacked wheel) on the path,
    base.yaml, the profiles and the presets are read as package resources."""
    import zipfile

    from spark_jobs import package

    expected = {"presets": ["tiny_clip"], "threshold": 0.7, "batch": 32, "image_size": 256}
    zipped = package.build(tmp_path / "dist")["zip"]
    out = _probe_config(node_python, Path(zipped), tmp_path)
    assert out["module"].startswith(zipped) and out["conf"].startswith(zipped)
    assert {k: out[k] for k in expected} == expected

    wheel_dir = tmp_path / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(wheel_dir), str(REPO)], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheel_dir.glob("clipcrawl-*.whl")
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(installed)
    out = _probe_config(node_python, installed, tmp_path)
    assert out["conf"] == str(installed / "spark_jobs" / "conf")
    assert {k: out[k] for k in expected} == expected


# --- the standalone cluster ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = spark_daemons.StandaloneCluster(tmp_path_factory.mktemp("standalone"), FAKE_GPUS)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def node_python(tmp_path_factory):
    return spark_daemons.node_python(tmp_path_factory.mktemp("node_env") / "venv",
                                     spark_daemons.main_site_packages())


def test_node_python_has_the_dependencies_but_not_the_checkout(node_python, tmp_path):
    probe = ("import importlib.util, json, sys; import pyspark, pandas, pyarrow, torch, open_clip, yaml; "
             "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in ('spark_jobs', 'udfs', 'conf')}"
             " | {'finders': [type(f).__name__ for f in sys.meta_path]}))")
    env = spark_daemons.base_env()
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(node_python), "-c", probe], capture_output=True, text=True, cwd=str(tmp_path),
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert {k: out[k] for k in ("spark_jobs", "udfs", "conf")} == {"spark_jobs": False, "udfs": False, "conf": False}
    assert not any("Editable" in f for f in out["finders"]), out["finders"]


@pytest.mark.slow
def test_pyfiles_recipe_on_standalone_cluster_equals_local_run(local_demo_run, node_python, cluster, tmp_path):
    from spark_jobs import package

    local = local_demo_run
    cfg = local["cfg"]
    dist = tmp_path / "dist"
    package.build(dist)                              # what `make package` writes besides the wheel
    root = tmp_path / "run"
    dedup = cfg.get("run.datasets.dedup")
    spark_daemons.copy_dataset(local["root"] / dedup, root / dedup)   # the input of download

    submit_dir = tmp_path / "submit"                 # an empty working directory
    submit_dir.mkdir()
    env = spark_daemons.base_env(PYSPARK_PYTHON=str(node_python), PYSPARK_DRIVER_PYTHON=str(node_python))
    env.pop("PYTHONPATH", None)
    argv = [str(spark_daemons.spark_home() / "bin" / "spark-submit"), "--master", cluster.url,
            "--py-files", str(dist / "clipcrawl-pyfiles.zip"),
            "--driver-memory", "640m", "--executor-memory", "640m",
            "--driver-java-options", spark_daemons.JVM_OPTS,
            "--conf", "spark.executor.cores=1",
            "--conf", "spark.executor.resource.gpu.amount=1", "--conf", "spark.task.resource.gpu.amount=1",
            "--conf", "spark.sql.shuffle.partitions=4", "--conf", "spark.ui.enabled=false",
            "--conf", "spark.driver.host=127.0.0.1", "--conf", "spark.driver.bindAddress=127.0.0.1",
            str(dist / "jobs" / "run.py"), "--profile", "standalone",
            "--config", "tiny_clip",                 # the packaged preset, read from the zip
            "--from", "download", "--root", str(root),
            "--set", f"clip.model=local-dir:{REPO / 'tests' / 'fixtures' / 'tiny_clip'}",
            "--set", "download.allowed_cidrs=127.0.0.0/8"]
    for key in ("download.shard_size", "download.thread_count", "clip.batch_size"):
        argv += ["--set", f"{key}={cfg.get(key)}"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(submit_dir), env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]

    ours, reference = pipeline_outputs(root, cfg, "download"), pipeline_outputs(local["root"], cfg, "download")
    assert ours["subsets"], "the sample should keep some pairs"
    for name in reference:
        assert ours[name] == reference[name], name

    # the executors ran code shipped as --py-files (each has the zip in its work folder)
    shipped = sorted(cluster.work.glob("worker*/app-*/*/clipcrawl-pyfiles.zip"))
    assert {p.parts[-4] for p in shipped} == {"worker0", "worker1"}, shipped

    # clip-score's tasks got the fake GPUs the workers reported; with no CUDA here they ran on the CPU
    parts = [json.loads(p.read_text()) for p in
             (root / cfg.get("run.datasets.clip-score") / "_stats" / "parts").glob("partition_*.json")]
    assigned = [tuple(p["gpu_addresses"] or ()) for p in parts]
    assert parts and set(assigned) <= {("3",), ("5",)} and all(assigned), assigned
    assert {p["device"] for p in parts if "device" in p} == {"cpu"}
