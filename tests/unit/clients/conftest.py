"""A tiny real HTTP peer for the client-side tests (not the fewstep server).

It serves ``/v1/images/generations`` (with fewstep's ``timings``) and the same route
under ``/notimings`` (a plain OpenAI-compatible answer), returns a real 8x8 PNG after
a short sleep, and answers with the OpenAI error body when the prompt contains
``error400`` / ``error500``. Every request body and Authorization header is logged
in ``FakeServer.bodies`` / ``FakeServer.auth``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

ERROR_400_MESSAGE = "prompt rejected by the test server (error400)"


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class FakeServer:
    url: str
    error_400_message: str = ERROR_400_MESSAGE
    bodies: list[dict] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)

    def reset(self) -> None:
        self.bodies.clear()
        self.auth.clear()


def _make_app(state: FakeServer) -> FastAPI:
    app = FastAPI()
    png = _png_b64()
    rng = random.Random(0)

    async def generate(request: Request, with_timings: bool):
        t0 = time.perf_counter()
        body = await request.json()
        state.bodies.append(body)
        state.auth.append(request.headers.get("authorization"))
        prompt = str(body.get("prompt", ""))
        await asyncio.sleep(0.005 + 0.01 * rng.random())
        if "error400" in prompt:
            return JSONResponse(
                status_code=400,
                content={
                    "error": {
                        "message": ERROR_400_MESSAGE,
                        "type": "invalid_request_error",
                        "param": "prompt",
                        "code": "prompt_rejected",
                    }
                },
            )
        if "error500" in prompt:
            return JSONResponse(
                status_code=500,
                content={
                    "error": {"message": "boom", "type": "server_error", "param": None, "code": None}
                },
            )
        n = int(body.get("n", 1))
        out: dict = {"created": int(time.time()), "data": [{"b64_json": png} for _ in range(n)]}
        if with_timings:
            total = (time.perf_counter() - t0) * 1e3
            out["timings"] = {
                "queue_ms": 0.1,
                "encode_prompt_ms": 1.0,
                "denoise_ms": max(total - 2.0, 0.0),
                "decode_ms": 0.5,
                "encode_image_ms": 0.4,
                "total_ms": total,
                "batch_size": 1,
            }
        return out

    @app.post("/v1/images/generations")
    async def gen_timings(request: Request):
        return await generate(request, True)

    @app.post("/notimings/v1/images/generations")
    async def gen_plain(request: Request):
        return await generate(request, False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "test"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return {"status": "ready"}

    return app


@pytest.fixture(scope="session")
def fake_server():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    state = FakeServer(url=f"http://127.0.0.1:{port}")
    config = uvicorn.Config(_make_app(state), log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield state
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


@pytest.fixture
def server(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server


@pytest.fixture
def closed_port_url() -> str:
    """A URL on which nothing listens (connection refused)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
