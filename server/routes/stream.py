"""WS /v1/stream (typed JSON control + binary frames), GET /v1/stream/{id}.mjpeg, GET /v1/stream.mjpeg and
GET /v1/stream/schema. Validate, hand over to the engine, move bytes: encoding runs in the engine's pool.

Message types and the binary frame header: server/stream_protocol.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from fewstep.engines.core import AsyncStream, EngineError
from fewstep.engines.errors import ENGINE_STOPPED
from fewstep.engines.init_image import InputImageError, decode_image, fit_image
from fewstep.engines.stream import StreamStart

from ..protocol import error_responses
from ..stream_protocol import (
    CLIENT_MESSAGE,
    ErrorMessage,
    InitMessage,
    StartedMessage,
    StartMessage,
    StatsMessage,
    StopMessage,
    StoppedMessage,
    UpdatedMessage,
    UpdateMessage,
    pack_frame,
    parse_size,
    schema,
    unpack_input_frame,
    validation_message,
)

router = APIRouter()
log = logging.getLogger("fewstep.server")


def decode_frame(payload: bytes, max_pixels: int, height: int, width: int):
    """An input frame's image -> [height, width, 3] uint8 (center-cropped and resized). Runs in the engine's pool."""
    return fit_image(decode_image(payload, max_pixels), height, width)


class Delivery:
    """Per-viewer delivery clock: time to first frame, inter-frame time, frames sent; feeds /metrics and stats."""

    def __init__(self, metrics, model: str, opened_at: float):
        self.metrics, self.model, self.opened_at = metrics, model, opened_at
        self.sent = 0
        self.ttff_ms: float | None = None
        self._last: float | None = None
        self._window = (time.perf_counter(), 0)  # (start, frames) of the current stats interval

    def chunk_sent(self, frames: int) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.ttff_ms = (now - self.opened_at) * 1e3
            self.metrics.on_first_frame(self.model, now - self.opened_at)
        else:
            self.metrics.on_chunk_sent(self.model, frames, now - self._last)
        self._last = now
        self.sent += frames

    def interval(self) -> tuple[float, float | None]:
        """(fps, mean ms per frame) since the previous call."""
        now = time.perf_counter()
        t0, n0 = self._window
        self._window = (now, self.sent)
        frames, dt = self.sent - n0, max(now - t0, 1e-9)
        return frames / dt, (dt * 1e3 / frames if frames else None)


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator when the response ends, including when the client
    disconnects mid-stream (the generator's ``finally`` then ends the session at once, not at garbage collection)."""

    # status_code spelled out: FastAPI reads the response class's default status from its __init__ signature when it
    # builds the OpenAPI schema (GET /openapi.json failed with UnboundLocalError without it)
    def __init__(self, content, status_code: int = 200, headers=None, media_type=None, background=None, *,
                 on_close=None):
        super().__init__(content, status_code, headers, media_type, background)
        self.on_close = on_close  # runs even when the body never started (the client left before the headers)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                self.on_close()


def _engine(state):
    if state.core is None:
        raise EngineError(state.load_error or "the model is still loading; poll GET /ready", 503, None, "not_ready")
    return state.core


def socket_id(ws: WebSocket) -> str:
    """The socket's request id (``X-Request-Id``, the client's or the guard's), quoted in error messages so that a
    client can point at the server log's details without the details (exception text) ever reaching it."""
    return getattr(ws.state, "request_id", None) or uuid.uuid4().hex


def internal_error(rid: str, what: str = "internal error") -> str:
    return f"{what} (request id {rid}); the details are in the server log"


class StreamConnection:
    """One WebSocket on /v1/stream: a reader (control messages) and, while a session runs, a pump (frames)."""

    def __init__(self, ws: WebSocket, state):
        self.ws, self.state = ws, state
        self.rid = socket_id(ws)
        self.stream: AsyncStream | None = None
        self.pump: asyncio.Task | None = None
        self.delivery: Delivery | None = None
        self._send_lock = asyncio.Lock()
        self.pending_frame: tuple[int, bytes] | None = None  # "frames" streams: the newest input not yet decoded
        self.decoder: asyncio.Task | None = None

    async def send(self, msg: BaseModel) -> None:
        async with self._send_lock:
            await self.ws.send_text(msg.model_dump_json())

    async def send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def error(self, message: str, code: str | None, param: str | None = None) -> None:
        await self.send(ErrorMessage(message=message, code=code, param=param))

    async def serve(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                text = msg.get("text")
                if text is None:
                    await self.input_frame(msg.get("bytes") or b"")
                    continue
                limit = self.state.config.http.ws_max_bytes  # uvicorn's own limit leaves room for input images
                if len(text) > limit:
                    await self.error(f"control messages are at most {limit} bytes; input frames go as binary "
                                     "messages", "message_too_big")
                    continue
                try:
                    parsed = CLIENT_MESSAGE.validate_json(text)
                except ValidationError as e:
                    message, param = validation_message(e, ("start", "update", "stop"))
                    await self.error(message, "invalid_message", param)
                    continue
                try:
                    await self.handle(parsed)
                except EngineError as e:
                    await self.error(str(e), e.code, e.param)
                except WebSocketDisconnect:
                    raise
                # Last-resort boundary of one client message: a bug answers it with an error, the socket stays usable.
                # The exception's text (paths, tensor shapes, allocator messages) goes to the log only.
                except Exception:  # noqa: BLE001
                    log.exception("stream socket %s: message failed", self.rid)
                    await self.error(internal_error(self.rid), "internal")
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client went away (RuntimeError: receive after a disconnect the server saw first)
        finally:
            await self.finish("disconnected", notify=False)

    async def input_frame(self, data: bytes) -> None:
        """A binary message: an input frame of a ``"frames"`` stream. Checked here (header, size); decoded in the
        engine's pool. Newest wins: a frame arriving while another decodes replaces the one waiting, never queues."""
        if self.stream is None or self.stream.session.input != "frames":
            await self.error('binary messages are input frames: start the stream with "input": "frames" first',
                             "invalid_message")
            return
        try:
            header, payload = unpack_input_frame(data, self.state.config.limits.max_image_bytes)
        except ValueError as e:
            await self.error(str(e), "invalid_frame")
            return
        self.pending_frame = (header["index"], payload)
        if self.decoder is None or self.decoder.done():
            self.decoder = asyncio.create_task(self.decode_frames(self.stream))

    async def decode_frames(self, stream: AsyncStream) -> None:
        s = stream.session
        max_pixels = self.state.config.limits.max_image_pixels
        while self.pending_frame is not None and self.stream is stream:
            (index, payload), self.pending_frame = self.pending_frame, None
            try:
                frame = await stream.run_in_pool(decode_frame, payload, max_pixels, s.height, s.width)
                stream.set_input_frame(frame, index)
            except InputImageError as e:
                await self.error(f"input frame {index}: {e}", "invalid_frame")
            except EngineError:  # the session ended meanwhile
                return

    async def handle(self, msg) -> None:
        if isinstance(msg, StartMessage):
            await self.start(msg)
        elif isinstance(msg, UpdateMessage):
            if self.stream is None:
                raise EngineError("no stream is running; send 'start' first", 400, "type", "not_started")
            if msg.strength is not None:
                if self.stream.session.input != "frames":
                    raise EngineError('strength applies to streams started with "input": "frames"', 400,
                                      "strength", "invalid_strength")
                self.stream.update_strength(msg.strength)
            if msg.prompt is not None or msg.changes_guidance():
                self.state.check_limits(prompt=msg.prompt, negative_prompt=msg.negative_prompt)
                self.stream.update(msg.prompt, msg.negative_prompt, msg.nasa_scale, msg.nag_fields())
            s = self.stream.session
            await self.send(UpdatedMessage(prompt=s.prompt, strength=msg.strength, negative_prompt=s.negative_prompt))
        elif isinstance(msg, StopMessage):
            if self.stream is None:
                raise EngineError("no stream is running", 400, "type", "not_started")
            await self.finish("stopped")

    async def start(self, msg: StartMessage) -> None:
        if self.stream is not None:
            raise EngineError("a stream is already running on this socket; send 'stop' first", 400, "type",
                              "already_started")
        core = _engine(self.state)
        w, h = parse_size(msg.size)
        self.state.check_limits(prompt=msg.prompt, negative_prompt=msg.negative_prompt, width=w, height=h)
        engine_format = "raw" if msg.format == "fmp4" else msg.format
        start = StreamStart(prompt=msg.prompt, model=msg.model, height=h, width=w, seed=msg.seed, fps=msg.fps,
                            format=engine_format, quality=msg.quality, input=msg.input, strength=msg.strength,
                            negative_prompt=msg.negative_prompt, nasa_scale=msg.nasa_scale,
                            nag_scale=msg.nag_scale, nag_tau=msg.nag_tau, nag_alpha=msg.nag_alpha)
        self.stream = await self.state.engine.open_stream(start)
        s = self.stream.session
        pipe = core.pipelines[s.model]
        await self.send(StartedMessage(session_id=s.id, model=s.model, width=s.width, height=s.height, seed=s.seed,
                                       fps=s.fps, chunk_frames=pipe.frames_per_chunk,
                                       first_chunk_frames=(pipe.first_chunk_frames
                                                           if pipe.first_chunk_frames != pipe.frames_per_chunk
                                                           else None),
                                       buffer_chunks=pipe.buffer_chunks,
                                       format=msg.format, mjpeg_url=f"/v1/stream/{s.id}.mjpeg"))
        self.delivery = Delivery(self.state.metrics, s.model, s.opened_at)
        self.pump = asyncio.create_task(self.run_pump(self.stream, self.delivery, msg.format, msg.quality))

    async def run_pump(self, stream: AsyncStream, delivery: Delivery, fmt: str, quality: int) -> None:
        s = stream.session
        interval = self.state.config.engine.stream.stats_interval_s
        next_stats = time.perf_counter() + interval
        muxer = None
        try:
            while True:
                try:
                    chunk = await stream.next_chunk(timeout=max(next_stats - time.perf_counter(), 0.001))
                except (TimeoutError, asyncio.TimeoutError):
                    chunk = False
                if time.perf_counter() >= next_stats:
                    next_stats = time.perf_counter() + interval
                    fps, per_frame = delivery.interval()
                    st = s.stats()
                    await self.send(StatsMessage(
                        frames_generated=st["frames_generated"], frames_sent=delivery.sent,
                        frames_dropped=st["frames_dropped"], fps=round(fps, 3), ttff_ms=delivery.ttff_ms,
                        inter_frame_ms=per_frame, queued_chunks=st["queued_chunks"], batch_size=st["batch_size"],
                        step_ms=st["step_ms"], prompt_version=st["prompt_version"]))
                if chunk is None:
                    break
                if chunk is False:
                    continue
                ts = (chunk.created - s.opened_at) * 1e3
                try:  # encoding runs in the engine's pool; its failure ends the session with an error, not silence
                    if fmt == "fmp4":
                        if muxer is None:
                            from fewstep.engines.stream.fmp4 import FMP4Muxer

                            fps = s.fps or self.state.core.pipelines[s.model].fps
                            muxer = await stream.run_in_pool(FMP4Muxer, s.width, s.height, fps, chunk.num_frames)
                        payloads = [await stream.run_in_pool(muxer.add, chunk.frames, chunk.first_index)]
                    else:
                        payloads = await stream.encoded(chunk, fmt, quality)
                except Exception:  # noqa: BLE001 - any encoder failure (PyAV, PIL) ends the failing session only
                    log.exception("stream socket %s, session %s: frame encoding failed", self.rid, s.id)
                    stream.close("error: frame encoding failed")
                    await self.error(internal_error(self.rid, "stream failed: frame encoding failed"),
                                     "stream_failed")
                    await self.send(StoppedMessage(reason="error: frame encoding failed", frames_sent=delivery.sent,
                                                   frames_dropped=s.frames_dropped))
                    self.stream = None
                    return
                if fmt == "fmp4":
                    if delivery.sent == 0 and muxer.mime:
                        await self.send(InitMessage(mime=muxer.mime))
                    if payloads[0]:
                        await self.send_bytes(pack_frame(payloads[0], "fmp4", chunk.first_index, ts,
                                                         chunk.prompt_version))
                else:
                    for i, payload in enumerate(payloads):
                        await self.send_bytes(pack_frame(payload, fmt, chunk.first_index + i, ts,
                                                         chunk.prompt_version))
                delivery.chunk_sent(chunk.num_frames)
            reason = stream.outbox.reason or "finished"
            if reason == ENGINE_STOPPED:  # the engine process died: this server can serve no stream until restarted
                log.error("stream socket %s, session %s ended: the engine has stopped", self.rid, s.id)
                reason = "error"
                await self.error("the engine has stopped, and this stream with it; reconnect once the server is back "
                                 "(GET /health answers 200)", "engine_stopped")
            elif reason.startswith("error"):
                # the engine's reason holds the exception's text ("error: RuntimeError: ..."): logged, not sent
                log.error("stream socket %s, session %s ended: %s", self.rid, s.id, reason)
                reason = "error"
                await self.error(internal_error(self.rid, "stream failed"), "stream_failed")
            await self.send(StoppedMessage(reason=reason, frames_sent=delivery.sent,
                                           frames_dropped=s.frames_dropped))
            self.stream = None
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the socket closed under us; the reader cleans up
        finally:
            if muxer is not None:
                stream.core.encode_submit(muxer.close)

    async def finish(self, reason: str, notify: bool = True) -> None:
        """Stop the session (if any): leave the engine at once, then tell the client."""
        stream, self.stream = self.stream, None
        pump, self.pump = self.pump, None
        self.pending_frame = None  # the decoder ends once it sees self.stream changed
        if stream is not None:
            stream.close(reason)
        if pump is not None:
            pump.cancel()
            try:
                await pump
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the pump's errors end with it
                pass
        if stream is not None and notify:
            sent = self.delivery.sent if self.delivery else 0
            await self.send(StoppedMessage(reason=reason, frames_sent=sent,
                                           frames_dropped=stream.session.frames_dropped))


@router.websocket("/v1/stream")
async def stream_socket(ws: WebSocket) -> None:
    await ws.accept()
    await StreamConnection(ws, ws.app.state.fewstep).serve()


@router.get("/v1/stream/schema", responses=error_responses(403, 503))
async def stream_schema() -> dict:
    return schema()


BOUNDARY = "fewstepframe"
MJPEG_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
_MJPEG_200 = {"description": f"JPEG frames as multipart/x-mixed-replace (boundary {BOUNDARY}) until the session "
              "ends or the client leaves", "content": {"multipart/x-mixed-replace": {"schema": {"type": "string",
                                                                                          "format": "binary"}}}}


async def _mjpeg_body(state, stream: AsyncStream, quality: int = 85):
    s = stream.session
    delivery = Delivery(state.metrics, s.model, time.perf_counter() if not stream.owner else s.opened_at)
    try:
        while True:
            chunk = await stream.next_chunk()
            if chunk is None:
                break
            parts = []
            for i, jpg in enumerate(await stream.encoded(chunk, "jpeg", quality)):
                parts.append(b"--" + BOUNDARY.encode() + b"\r\nContent-Type: image/jpeg\r\nContent-Length: "
                             + str(len(jpg)).encode() + b"\r\nX-Frame-Index: " + str(chunk.first_index + i).encode()
                             + b"\r\n\r\n" + jpg + b"\r\n")
            yield b"".join(parts)
            delivery.chunk_sent(chunk.num_frames)
    finally:  # the client left (the next write failed) or the session ended
        stream.close("disconnected")


@router.get("/v1/stream/{session_id}.mjpeg", response_class=ClosingStreamingResponse,
            responses={200: _MJPEG_200, **error_responses(400, 401, 403, 404, 429, 503)})
async def mjpeg_of_session(session_id: str, request: Request) -> ClosingStreamingResponse:
    """Watch an open session as multipart/x-mixed-replace (an extra viewer with its own bounded outbox)."""
    state = request.app.state.fewstep
    core = _engine(state)
    if not core.streams:
        raise EngineError(f"model {state.model_name!r} is an image model; streams need a video model", 400,
                          "model", "image_model")
    viewer = await state.engine.watch(session_id)
    if viewer is None:
        raise EngineError("no such stream session", 404, "session_id", "session_not_found")
    return ClosingStreamingResponse(_mjpeg_body(state, viewer), media_type=MJPEG_TYPE,
                                    headers={"Cache-Control": "no-store"}, on_close=viewer.close)


@router.get("/v1/stream.mjpeg", response_class=ClosingStreamingResponse,
            responses={200: _MJPEG_200, **error_responses(400, 401, 403, 404, 429, 503)})
async def mjpeg_new_session(request: Request, prompt: str = Query(..., min_length=1),
                            seed: int | None = Query(None, ge=0, le=2**62), size: str | None = None,
                            fps: float | None = Query(None, ge=0, le=1000)) -> ClosingStreamingResponse:
    """A session of its own for an ``<img src="/v1/stream.mjpeg?prompt=...">`` tag; it ends with the response."""
    state = request.app.state.fewstep
    _engine(state)
    try:
        w, h = parse_size(int(size) if size and size.isdigit() else size)
    except ValueError as e:
        raise EngineError(str(e), 400, "size", "invalid_size") from None
    if w is not None and min(w, h) < 1:  # size=0 must not mean "default"
        raise EngineError(f"size must be positive, got {size!r}", 400, "size", "invalid_size")
    state.check_limits(prompt=prompt, width=w, height=h)
    stream = await state.engine.open_stream(StreamStart(prompt=prompt, height=h, width=w, seed=seed, fps=fps,
                                                  format="jpeg"))
    return ClosingStreamingResponse(_mjpeg_body(state, stream), media_type=MJPEG_TYPE,
                                    headers={"Cache-Control": "no-store", "X-Fewstep-Seed": str(stream.session.seed)},
                                    on_close=stream.close)
