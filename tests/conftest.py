import os
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from fewstep.benchmarks.processes import fewstep_command, free_port

ROOT = Path(__file__).resolve().parent.parent
# How tests run fewstep in a subprocess: the installed console script, as a user would.
FEWSTEP = fewstep_command()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:  # Triton kernels decorate at import: without CUDA they must see the interpreter flag before anything (diffusers
    import torch  # included) imports triton, whatever order pytest collects the modules in

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_terminal_summary(terminalreporter):
    """The versions resolved, printed with every run's summary (CI runs the suite at the floors and at today's)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "diffusers", "transformers", "accelerate", "fastapi", "starlette", "uvicorn", "pydantic", "numpy",
             "av", "triton", "onnxscript", "tensorrt-rtx"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    terminalreporter.write_line("fewstep deps: " + ", ".join(found))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """All tiny random-weight checkpoints, built once per test session."""
    from tests import tiny_models

    root = tmp_path_factory.mktemp("tiny")
    for name, build in tiny_models.BUILDERS.items():
        build(root / name)
    return root


class ServerProcess:
    """`fewstep serve` as a real subprocess; waits for /ready."""

    def __init__(self, args: list[str], timeout: float = 120.0, env: dict[str, str] | None = None):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"fewstep-serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen([*FEWSTEP, "serve", "--port", str(self.port),
                                      *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **env} if env else None)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    return
                # (Ray Serve's proxy answers in plain text until the app's first replica is up)
                if r.headers.get("content-type", "").startswith("application/json") and r.json().get("error"):
                    self.stop()
                    raise RuntimeError(f"model failed to load: {r.json()['error']}")
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="session")
def tiny_server(tiny_dir):
    # A queue bound far above these tests' work: on a loaded 2-core host the warm-up timing can make a handful of
    # concurrent requests look like seconds of work; admission has its own tests (test_admission*.py).
    srv = ServerProcess(["--model", str(tiny_dir / "sd_turbo"), "--device", "cpu", "--max-wait-ms", "20",
                         "--max-queue-seconds", "120"])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def stream_server(tiny_dir):
    """`fewstep serve` on the tiny video model (StreamDiT). One intra-op thread: on a 2-core CI box the test
    process (client, browser) shares the cores, and OpenMP threads spinning against it make steps erratic."""
    srv = ServerProcess(["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1"])
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def split_stream_server(tiny_dir):
    """As ``stream_server``, with the engine in a process of its own (--engine-process): streams cross ZeroMQ."""
    srv = ServerProcess(["--model", str(tiny_dir / "stream_dit"), "--device", "cpu", "--threads", "1",
                         "--engine-process"])
    yield srv
    srv.stop()


class RayCluster:
    def __init__(self, address: str, metrics_url: str):
        self.address, self.metrics_url = address, metrics_url  # metrics_url: Ray's Prometheus port (ray_serve_*)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster owned by the test process (stopped at the end of the session, whatever happened): the
    Ray Serve tests run `fewstep serve --replicas N --ray-address` against it, and kill replicas through it. Four
    logical CPUs (one per replica, spare for restarts) on whatever cores the machine has; no dashboard."""
    import ray

    from fewstep.server.ray_routing import PROXY_CALLBACK

    os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)  # inherited by the proxies
    metrics_port = free_port()
    ctx = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                   namespace="fewstep-tests", _metrics_export_port=metrics_port)
    try:
        yield RayCluster(ctx.address_info["gcs_address"], f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        ray.shutdown()


class RayServeProcess(ServerProcess):
    """`fewstep serve --replicas N --ray-address ...` on the test's cluster; stop() also removes Serve from the
    cluster in case the CLI could not (it was killed), so the next app starts on a clean cluster."""

    def __init__(self, cluster: RayCluster, replicas: int, args: list[str], timeout: float = 240.0):
        super().__init__(["--replicas", str(replicas), "--ray-address", cluster.address, *args], timeout=timeout)
        self.cluster = cluster
        self.replicas = replicas

    def replica_ids(self, want: int | None = None, timeout: float = 60.0) -> set[str]:
        """The ids of the replicas answering (X-Fewstep-Replica), polled until ``want`` (default: all) are seen."""
        import httpx

        want = want or self.replicas
        seen: set[str] = set()
        deadline = time.time() + timeout
        while len(seen) < want and time.time() < deadline:
            r = httpx.get(self.url + "/health", timeout=10)
            if r.status_code == 200 and "x-fewstep-replica" in r.headers:
                seen.add(r.headers["x-fewstep-replica"])
        return seen

    def redeploy(self, args: dict) -> subprocess.Popen:
        """``serve.run`` of the app with these RayAppConfig args, as a new version (Ray's rolling update: the
        replicas are replaced a batch at a time), from a driver of its own started in the temporary directory (the
        driver's directory goes on Ray workers' sys.path; the checkout's kernels/ would shadow PyPI's). Returns
        that process: it exits once the new version is running."""
        import json
        import sys
        import tempfile

        code = ("import json, sys, ray\nfrom ray import serve\nfrom fewstep.server.ray import APP_NAME, build_app\n"
                "ray.init(address=sys.argv[1], logging_level='WARNING')\n"
                "serve.run(build_app(json.loads(sys.argv[2])), name=APP_NAME, route_prefix='/', blocking=False)\n")
        log = open(Path(tempfile.gettempdir()) / f"fewstep-redeploy-{self.port}.log", "w")
        return subprocess.Popen([sys.executable, "-c", code, self.cluster.address, json.dumps(args)],
                                cwd=tempfile.gettempdir(), stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # the CLI drains the replicas and removes the app (serve.shutdown)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        from ray import serve

        serve.shutdown()
