"""WS /v1/realtime: real-time image generation in the style of fal's realtime endpoints.

Each text message is one input ``{"prompt", "seed"?, "request_id"?, "size"?, "steps"?, "format"?, "image"?,
"strength"?}`` (``image``, base64 or a data URL: image-to-image at ``strength``); each answer echoes ``request_id``. Newest wins: a connection has at most one input in the engine and one waiting. An input
arriving while another waits replaces it, and the replaced (stale) input is answered at once with
``{"type": "dropped", "request_id", "reason": "superseded"}``; it never reaches the engine. The input already in
the engine finishes and its result is sent (it is the freshest image there is until the next one lands).
Results are JSON with the image base64-encoded; generation and encoding run in the engine, not on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ValidationError

from fewstep.engines.core import EngineError, GenerateRequest

from ..stream_protocol import (ErrorMessage, RealtimeDropped, RealtimeRequest, RealtimeResult, b64_image,
                               parse_size, validation_message)
from .images import read_image
from .stream import internal_error, socket_id

router = APIRouter()
log = logging.getLogger("fewstep.server")


class RealtimeConnection:
    def __init__(self, ws: WebSocket, state):
        self.ws, self.state = ws, state
        self.rid = socket_id(ws)
        self.pending: RealtimeRequest | None = None
        self.worker: asyncio.Task | None = None
        self._send_lock = asyncio.Lock()

    async def send(self, msg: BaseModel) -> None:
        async with self._send_lock:
            await self.ws.send_text(msg.model_dump_json())

    async def serve(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text is None:
                    await self.send(ErrorMessage(message="send inputs as JSON text messages", code="invalid_message"))
                    continue
                try:
                    req = RealtimeRequest.model_validate_json(text)
                except ValidationError as e:
                    message, param = validation_message(e)
                    await self.send(ErrorMessage(message=message, code="invalid_message", param=param))
                    continue
                if req.request_id is None:
                    req.request_id = uuid.uuid4().hex
                if self.pending is not None:  # newest wins: the waiting input is stale
                    await self.send(RealtimeDropped(request_id=self.pending.request_id))
                self.pending = req
                if self.worker is None or self.worker.done():
                    self.worker = asyncio.create_task(self.work())
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if self.worker is not None:
                self.worker.cancel()

    async def work(self) -> None:
        while self.pending is not None:
            req, self.pending = self.pending, None
            try:
                await self.send(await self.answer(req))
            except (WebSocketDisconnect, RuntimeError):  # the socket closed under a send
                return

    async def answer(self, req: RealtimeRequest) -> BaseModel:
        """The message for one input: its image, or an error. A failure of generation itself (torch raises
        RuntimeError) is answered, never mistaken for a closed socket."""
        try:
            out = await self.generate(req)
            image = base64.b64encode(out.images[0]).decode()
            return RealtimeResult(request_id=req.request_id, image=image, format=req.format, seed=out.seeds[0],
                                  timings={k: round(v, 3) for k, v in out.timings.items()})
        except EngineError as e:
            return ErrorMessage(message=str(e), code=e.code, param=e.param, request_id=req.request_id)
        # Last-resort boundary of one input: any failure is answered to the client as an error message for its
        # request, and the socket stays open. The exception's text goes to the log only.
        except Exception:  # noqa: BLE001
            log.exception("realtime socket %s: input %s failed", self.rid, req.request_id)
            return ErrorMessage(message=internal_error(self.rid, "generation failed"), code="internal",
                                request_id=req.request_id)

    async def generate(self, req: RealtimeRequest):
        state = self.state
        if state.engine is None:
            raise EngineError(state.load_error or "the model is still loading; poll GET /ready", 503, None,
                              "not_ready")
        w, h = parse_size(req.size)
        state.check_limits(prompt=req.prompt, negative_prompt=req.negative_prompt, width=w, height=h)
        image = None
        if req.image is not None:
            try:  # base64 of up to max_image_bytes: decoded in the pool, as is the picture
                data = await asyncio.wrap_future(state.core.encode_submit(b64_image, req.image,
                                                                          state.config.limits.max_image_bytes))
            except ValueError as e:
                raise EngineError(str(e), 400, "image", "invalid_image") from None
            image = await read_image(state, data)
        out = await state.engine.generate(GenerateRequest(
            prompt=req.prompt, model=req.model, height=h, width=w, steps=req.steps, guidance_scale=req.guidance_scale,
            negative_prompt=req.negative_prompt, nasa_scale=req.nasa_scale, nag_scale=req.nag_scale,
            nag_tau=req.nag_tau, nag_alpha=req.nag_alpha, seed=req.seed, output_format=req.format,
            image=image, strength=req.strength))
        state.metrics.on_request(out.model, 200)
        return out


@router.websocket("/v1/realtime")
async def realtime_socket(ws: WebSocket) -> None:
    await ws.accept()
    await RealtimeConnection(ws, ws.app.state.fewstep).serve()
