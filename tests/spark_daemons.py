"""Spark's own servers for the tests, started from the pip-installed pyspark on 127.0.0.1:
a standalone cluster (spark-class Master + Workers) and a Spark Connect server.

Every JVM is started in its own process group and stopped with it (executors and Python workers
included), also when the start fails. Sizes are small on purpose: the test machine is shared.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Short-lived test JVMs start faster and hold less memory with the serial GC and C1 only
# (as the local profile's driver does).
JVM_OPTS = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xss4m"


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict:
    """Loopback only, Spark from this pyspark, no proxies."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(SPARK_HOME=str(spark_home()), SPARK_LOCAL_IP="127.0.0.1", SPARK_LOCAL_HOSTNAME="localhost",
               SPARK_DAEMON_MEMORY="256m", SPARK_NO_DAEMONIZE="1")
    env.update(extra)
    return env


class Daemon:
    """One JVM (and its children) in its own process group, output to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._fh = open(self.log, "ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # children that left the group (none expected) die with their parent's group above
        self._fh.close()


def _wait(condition, timeout: float, daemons: list[Daemon], what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in daemons:
            if not d.alive():
                raise RuntimeError(f"{d.name} exited while waiting for {what}:\n{d.tail()}")
        if condition():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n" +
                       "\n".join(f"--- {d.name}\n{d.tail(1500)}" for d in daemons))


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def write_gpu_script(path: Path, addresses: list[str]) -> Path:
    """A GPU discovery script that reports fake addresses, in the format Spark expects."""
    path.write_text("#!/bin/sh\necho '" + json.dumps({"name": "gpu", "addresses": addresses}) + "'\n")
    path.chmod(0o755)
    return path


class StandaloneCluster:
    """A master and `len(gpus)` 1-core workers; worker i reports the fake GPU addresses gpus[i]."""

    def __init__(self, work: Path, gpus: list[list[str]], worker_memory: str = "1g"):
        self.work = work
        self.daemons: list[Daemon] = []
        self.port, self.ui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.gpus = gpus
        self.worker_memory = worker_memory

    def start(self, timeout: float = 180) -> "StandaloneCluster":
        spark_class = str(spark_home() / "bin" / "spark-class")
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            master_env = base_env(SPARK_DAEMON_JAVA_OPTS=JVM_OPTS)
            self.daemons.append(Daemon("master", [spark_class, "org.apache.spark.deploy.master.Master",
                                                  "--host", "127.0.0.1", "--port", str(self.port),
                                                  "--webui-port", str(self.ui_port)], master_env, logs))
            _wait(lambda: _port_open(self.port), timeout, self.daemons, "the master")
            for i, addresses in enumerate(self.gpus):
                script = write_gpu_script(self.work / f"gpus_worker{i}.sh", addresses)
                opts = (f"-Dspark.worker.resource.gpu.amount={len(addresses)} "
                        f"-Dspark.worker.resource.gpu.discoveryScript={script}")
                env = base_env(SPARK_DAEMON_JAVA_OPTS=JVM_OPTS, SPARK_WORKER_OPTS=opts)
                work_dir = self.work / f"worker{i}"
                work_dir.mkdir(exist_ok=True)
                self.daemons.append(Daemon(f"worker{i}", [
                    spark_class, "org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                    "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", "1",
                    "--memory", self.worker_memory, "--work-dir", str(work_dir)], env, logs))
            _wait(lambda: self.alive_workers() == len(self.gpus), timeout, self.daemons, "the workers")
        except BaseException:
            self.stop()
            raise
        return self

    def state(self) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=2) as resp:
                return json.loads(resp.read())
        except OSError:
            return {}

    def alive_workers(self) -> int:
        return sum(1 for w in self.state().get("workers", []) if w.get("state") == "ALIVE")

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()


class ConnectServer:
    """The Spark Connect server that ships inside pyspark, in local mode, on 127.0.0.1."""

    def __init__(self, work: Path, python: str = sys.executable, pythonpath: str | None = None,
                 master: str = "local[2,2]", memory: str = "1g", conf: dict | None = None):
        self.work = work
        self.port = free_port()
        self.url = f"sc://127.0.0.1:{self.port}"
        self.python, self.pythonpath = python, pythonpath
        self.master, self.memory, self.conf = master, memory, conf or {}
        self.daemon: Daemon | None = None

    def start(self, timeout: float = 180) -> "ConnectServer":
        self.work.mkdir(parents=True, exist_ok=True)
        conf = {"spark.connect.grpc.binding.address": "127.0.0.1",
                "spark.connect.grpc.binding.port": str(self.port),
                "spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1",
                "spark.ui.enabled": "false", "spark.sql.shuffle.partitions": "4", **self.conf}
        argv = [str(spark_home() / "bin" / "spark-submit"), "--master", self.master,
                "--driver-memory", self.memory, "--driver-java-options", JVM_OPTS,
                "--class", "org.apache.spark.sql.connect.service.SparkConnectServer"]
        for key, value in conf.items():
            argv += ["--conf", f"{key}={value}"]
        argv.append("spark-internal")
        env = base_env(PYSPARK_PYTHON=self.python)
        env.pop("SPARK_DAEMON_MEMORY")   # the launcher would size this driver's heap with it
        env.pop("PYTHONPATH", None)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath
        try:
            self.daemon = Daemon("connect-server", argv, env, self.work)
            _wait(lambda: _port_open(self.port), timeout, [self.daemon], "the Spark Connect server")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None


def node_python(folder: Path, site_packages: list[str]) -> Path:
    """A Python with the dependencies but NOT the checkout or the editable install: a fresh venv
    (no pip) whose only addition is a .pth listing `site_packages`. Paths listed in a .pth are
    added to sys.path but their own .pth files are not run, so the main venv's editable-install
    finder (`__editable__.clipcrawl-*.pth`) is never installed in it."""
    if not (folder / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    purelib = subprocess.run([str(folder / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "clipcrawl_test_deps.pth").write_text("\n".join(site_packages) + "\n")
    return folder / "bin" / "python"


def main_site_packages() -> list[str]:
    """The site-packages folders of this interpreter (the venv with the dependencies)."""
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def copy_dataset(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
