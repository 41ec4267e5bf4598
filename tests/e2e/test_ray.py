"""fewstep on Ray Serve (server/ray.py): a real local Ray cluster, `fewstep serve --replicas 2` on the embedded default
models, driven over HTTP and WebSockets through Ray's proxy. The shared API tests run against the Ray app too
(tests/e2e/test_server.py, parametrised over both servers)."""

import concurrent.futures as cf
import re
import threading
import time

import httpx
import pytest

from tests.conftest import RayServeProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_defaults(ray_cluster):
    """Both embedded models, 2 replicas, one intra-op thread each (2 cores on CI)."""
    srv = RayServeProcess(ray_cluster, 2, ["--device", "cpu", "--threads", "1"])
    yield srv
    srv.stop()


def replica_metric(srv, replica: str, name: str, labels: str) -> float:
    """One sample of one replica's /metrics (pinned with ?replica=ID; every sample carries replica="ID")."""
    text = httpx.get(srv.url + f"/metrics?replica={replica}", timeout=30).text
    assert f'replica="{replica}"' in text
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", text, re.M):
        if all(part in m.group(1) for part in labels.split(",")) and f'replica="{replica}"' in m.group(1):
            total += float(m.group(2))
    return total


def ok_count(srv, replica: str) -> float:
    return replica_metric(srv, replica, "fewstep_requests_total", 'model="fewstep-default",status="200"')


def test_requests_spread_over_both_replicas(ray_defaults):
    srv = ray_defaults
    replicas = srv.replica_ids()
    assert len(replicas) == 2, replicas
    before = {r: ok_count(srv, r) for r in replicas}

    def one(i):
        return httpx.post(srv.url + "/v1/images/generations", json={"prompt": "a red circle", "seed": i},
                          timeout=120)

    with cf.ThreadPoolExecutor(4) as ex:
        res = list(ex.map(one, range(24)))
    assert all(r.status_code == 200 for r in res), [r.text for r in res if r.status_code != 200]
    served = {r: ok_count(srv, r) - before[r] for r in replicas}
    print(f"\nper-replica completed image requests (from /metrics): {served}")
    assert sum(served.values()) == 24
    assert all(n > 0 for n in served.values()), served
    # the same seed draws the same image whichever replica serves it
    a, b = one(7), one(7)
    assert a.json()["data"][0]["b64_json"] == b.json()["data"][0]["b64_json"]
    # Ray Serve's own metrics (Ray's Prometheus port) count the same requests per replica as ours
    ours = {r: ok_count(srv, r) for r in replicas}
    deadline, theirs = time.time() + 60, {}
    while time.time() < deadline:  # Ray exports every few seconds
        text = httpx.get(srv.cluster.metrics_url, timeout=30).text
        theirs = {r: sum(float(m.group(1)) for m in re.finditer(
            rf'^ray_serve_deployment_request_counter_total\{{[^}}]*replica="{r}"[^}}]*'
            rf'route="/v1/images/generations"[^}}]*\}} ([0-9.e+]+)$', text, re.M)) for r in replicas}
        if theirs == ours:
            break
        time.sleep(2)
    assert theirs == ours


def test_stream_and_its_viewers_stay_on_their_replica(ray_defaults):
    """A stream's prompt updates ride its socket (one Ray request, one replica); its MJPEG viewers, new HTTP
    requests, are routed by the replica id in the session id to the replica that holds the buffer."""
    from fewstep.clients.python import FewstepClient

    srv = ray_defaults
    # The replica ids are read before the stream opens: while it is open, Ray's router sends every /health to the
    # other replica (the holder has one more ongoing request), so polling for both would last until the unread
    # socket's keepalive timed out (1011) and the session ended.
    replicas = srv.replica_ids()
    with FewstepClient(srv.url) as client:
        with client.stream("a red circle moving right", seed=3, fps=0) as s:
            sid = s.info["session_id"]
            holder = sid.split(".")[0]
            assert holder in replicas, sid
            frames, viewers = 0, []
            for f in s:
                frames += 1
                if frames % 4 == 0 and len(viewers) < 3:
                    s.update("a blue square moving left" if len(viewers) % 2 == 0 else "a red circle moving right")
                    with httpx.stream("GET", srv.url + s.info["mjpeg_url"], timeout=30) as r:
                        assert r.status_code == 200
                        got = b""
                        for chunk in r.iter_bytes():
                            got += chunk
                            if got.count(b"\xff\xd8") >= 1:  # one JPEG
                                break
                        viewers.append(r.headers["x-fewstep-replica"])
                if len(viewers) == 3:
                    s.stop()
    assert viewers == [holder] * 3
    # a session id naming no live replica: routed by load, answered 404 by whoever gets it
    r = httpx.get(srv.url + "/v1/stream/nosuchreplica.AAAAAAAAAAAAAAAAAAAAAA.mjpeg", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"


def test_one_request_id_per_response(ray_defaults):
    """The client's X-Request-Id (or Ray's own) comes back once, on answers and on refusals alike."""
    for method, path, body in (("GET", "/health", None), ("POST", "/v1/images/generations", {"prompt": 5})):
        for given in ("abc123", None):
            r = httpx.request(method, ray_defaults.url + path, json=body, timeout=30,
                              headers={"X-Request-Id": given} if given else {})
            ids = [v for k, v in r.headers.raw if k.lower() == b"x-request-id"]
            assert len(ids) == 1, (path, r.headers.raw)
            assert given is None or ids[0] == given.encode()


def test_realtime_socket_through_the_proxy(ray_defaults):
    import json

    from websockets.sync.client import connect

    with connect(ray_defaults.url.replace("http", "ws") + "/v1/realtime", open_timeout=30) as ws:
        for i in range(3):
            ws.send(json.dumps({"prompt": "a red circle", "seed": i, "request_id": str(i)}))
            msg = json.loads(ws.recv(timeout=60))
            assert msg["request_id"] == str(i) and msg.get("type") != "error", msg


def open_stream_on(srv, replica: str):
    """A stream socket whose session lives on ``replica`` (new sockets go by load: open until one lands there)."""
    import json

    from websockets.sync.client import connect

    for _ in range(20):
        ws = connect(srv.url.replace("http", "ws") + "/v1/stream", open_timeout=30)
        ws.send(json.dumps({"type": "start", "prompt": "a red circle moving right", "fps": 2}))
        while True:
            msg = ws.recv(timeout=60)
            if isinstance(msg, str):
                break
        started = json.loads(msg)
        assert started["type"] == "started", started
        if started["session_id"].split(".")[0] == replica:
            return ws
        ws.close()
    raise AssertionError(f"no stream landed on {replica} in 20 tries")


def test_replica_killed_mid_load(ray_defaults):
    """One replica is killed (ray.kill on its actor) while 4 clients keep sending image requests and a stream runs on
    it. Every request ends completed (an image request lost with its replica is sent once more, at the proxy) or
    failed cleanly (503, Retry-After, code replica_lost); none is lost (no answer, a reset, a hang). The stream gets
    an error message saying to reconnect. Ray starts a new replica; the figure printed is the time until two replicas
    answer again."""
    import json

    import ray
    from websockets.exceptions import ConnectionClosed

    srv = ray_defaults
    replicas = sorted(srv.replica_ids())
    victim = replicas[0]
    ws = open_stream_on(srv, victim)
    stop = threading.Event()
    outcomes = {"completed": 0, "failed_cleanly": 0, "lost": 0}
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = httpx.post(srv.url + "/v1/images/generations",
                               json={"prompt": "a red circle", "seed": 1000 * k + i}, timeout=60)
                clean = r.status_code == 503 and r.headers.get("retry-after") and \
                    r.json()["error"]["code"] == "replica_lost"
                kind = "completed" if r.status_code == 200 else "failed_cleanly" if clean else "lost"
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            except httpx.HTTPError:
                kind = "lost"
            with lock:
                outcomes[kind] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    actor = ray.get_actor(f"SERVE_REPLICA::fewstep#FewstepReplica#{victim}", namespace="serve")
    t_kill = time.perf_counter()
    ray.kill(actor)
    stream_end = None
    try:
        while True:  # frames until the error message, then the close
            msg = ws.recv(timeout=30)
            if isinstance(msg, str) and json.loads(msg)["type"] == "error":
                stream_end = json.loads(msg)
    except ConnectionClosed:
        pass
    close_code = ws.close_code
    ws.close()
    back = None
    while time.perf_counter() - t_kill < 120:
        ids = srv.replica_ids(want=2, timeout=5)
        if len(ids) == 2 and victim not in ids:
            back = time.perf_counter() - t_kill
            break
    stop.set()
    for t in threads:
        t.join(90)
    print(f"\nreplica {victim} killed under 4 clients: {outcomes}, statuses {statuses}; two replicas serve again "
          f"after {back and round(back, 1)} s")
    print(f"the stream on it ended with {stream_end} and close code {close_code}")
    assert stream_end is not None and stream_end["code"] == "replica_lost" and "reconnect" in stream_end["message"]
    assert close_code == 1012
    assert back is not None, "no second replica came back within 120 s"
    assert outcomes["lost"] == 0, outcomes
    assert outcomes["completed"] > 0
    # and both serve: a burst reaches the new replica too
    res = [httpx.post(srv.url + "/v1/images/generations", json={"prompt": "ok", "seed": i}, timeout=60)
           for i in range(4)]
    assert all(r.status_code == 200 for r in res)


def test_redeploy_drains_the_old_replicas(ray_defaults):
    """A redeploy (serve.run of a new version: Ray's rolling update) while 4 clients send image requests and a stream
    runs on an old replica. Every request ends completed or refused cleanly (503 with Retry-After), none is lost;
    the stream ends with 'stopped' (reason shutdown) and close 1001 as soon as Ray begins stopping its replica (not
    when Ray kills it: that would be the proxy's replica_lost error and 1012); afterwards new replicas serve.
    (Last in this module: it replaces the module's replicas.)"""
    import json

    from websockets.exceptions import ConnectionClosed

    srv = ray_defaults
    old = srv.replica_ids()
    assert len(old) == 2, old
    ws = open_stream_on(srv, sorted(old)[0])
    stream_msgs: list[dict] = []
    close_code: list = []

    def watch_stream():
        try:
            while True:
                msg = ws.recv(timeout=240)
                if isinstance(msg, str):
                    stream_msgs.append(json.loads(msg))
        except ConnectionClosed:
            pass
        except TimeoutError:
            stream_msgs.append({"type": "test_timeout"})
        close_code.append(ws.close_code)

    stop = threading.Event()
    outcomes = {"completed": 0, "failed_cleanly": 0, "lost": 0}
    statuses: dict[int, int] = {}
    lost: list[str] = []
    lock = threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = httpx.post(srv.url + "/v1/images/generations",
                               json={"prompt": "a red circle", "seed": 1000 * k + i}, timeout=120)
                clean = r.status_code == 503 and r.headers.get("retry-after") and "error" in r.json()
                kind = "completed" if r.status_code == 200 else "failed_cleanly" if clean else "lost"
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if kind == "lost":
                        lost.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                kind = "lost"
                with lock:
                    lost.append(repr(e))
            with lock:
                outcomes[kind] += 1

    watcher = threading.Thread(target=watch_stream)
    watcher.start()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    t0 = time.perf_counter()
    deploy = srv.redeploy({"server": {"engine": {"device": "cpu", "threads": 1}}, "replicas": 2})
    try:
        deploy.wait(300)
    finally:
        if deploy.poll() is None:
            deploy.kill()
    rolled = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(150)
    watcher.join(60)
    print(f"\nredeploy under 4 clients: {outcomes}, statuses {statuses}; the new version ran after {rolled:.1f} s")
    print(f"the stream on an old replica got {[m for m in stream_msgs if m.get('type') != 'stats']} and close code "
          f"{close_code}")
    assert deploy.returncode == 0, "serve.run of the new version failed (see fewstep-redeploy-*.log)"
    assert outcomes["lost"] == 0, (outcomes, lost)
    assert outcomes["completed"] > 0
    ended = [m for m in stream_msgs if m.get("type") in ("stopped", "error", "test_timeout")]
    assert ended and ended[0]["type"] == "stopped" and ended[0]["reason"] == "shutdown", stream_msgs
    assert close_code == [1001]
    new = srv.replica_ids(want=2, timeout=60)
    assert len(new) == 2 and not new & old, (old, new)
    res = [httpx.post(srv.url + "/v1/images/generations", json={"prompt": "ok", "seed": i}, timeout=60)
           for i in range(4)]
    assert all(r.status_code == 200 and r.headers["x-fewstep-replica"] in new for r in res)
