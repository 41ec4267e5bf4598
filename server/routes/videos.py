"""POST /v1/videos: a finite clip of N frames as fragmented MP4 (H.264), streamed with chunked transfer encoding.

The clip is a stream session with ``max_frames=N`` and ``on_full="pause"``: the engine never runs more than
``stream.outbox_chunks`` chunks ahead of the client and never drops a frame of it. Every chunk is muxed (in the
engine's encode pool) and written as soon as it is made; the first bytes leave after the first chunk, long before
the last frame exists. A client that disconnects ends the session at the next write.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from fewstep.engines.core import EngineError
from fewstep.engines.stream import StreamStart

from ..protocol import error_responses
from ..stream_protocol import VideoRequest, parse_size
from .stream import ClosingStreamingResponse, Delivery, _engine

router = APIRouter()
log = logging.getLogger("fewstep.server")


@router.post("/v1/videos", response_class=ClosingStreamingResponse, responses={
    200: {"description": "Fragmented MP4 (H.264), sent chunk by chunk as the frames are made",
          "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 401, 403, 404, 413, 429, 503)})
async def videos(body: VideoRequest, request: Request) -> ClosingStreamingResponse:
    state = request.app.state.fewstep
    core = _engine(state)
    w, h = parse_size(body.size)
    state.check_limits(prompt=body.prompt, width=w, height=h)
    max_frames = state.config.engine.stream.max_video_frames
    if body.num_frames > max_frames:
        raise EngineError(f"num_frames must be from 1 to {max_frames} on this server", 400, "num_frames",
                          "invalid_num_frames")
    if body.fps is not None:  # the rate written into the file: a sane time base, checked before any work
        core.check_fps(body.fps, allow_unpaced=False)
    # fps=0: a file is not paced, the engine makes it as fast as it can (the client's reading paces it)
    stream = await state.engine.open_stream(StreamStart(prompt=body.prompt, model=body.model, height=h, width=w,
                                                  seed=body.seed, fps=0, max_frames=body.num_frames,
                                                  on_full="pause", format="raw"))
    s = stream.session
    fps = body.fps or core.pipelines[s.model].fps
    chunk_frames = core.pipelines[s.model].frames_per_chunk

    async def body_iter():
        from fewstep.engines.stream.fmp4 import FMP4Muxer

        delivery = Delivery(state.metrics, s.model, s.opened_at)
        muxer = None
        started[0] = True
        try:
            muxer = await stream.run_in_pool(FMP4Muxer, s.width, s.height, fps, chunk_frames)
            while True:
                chunk = await stream.next_chunk()
                if chunk is None:
                    break
                data = await stream.run_in_pool(muxer.add, chunk.frames, chunk.first_index)
                if data:
                    yield data
                delivery.chunk_sent(chunk.num_frames)
            if stream.outbox.reason.startswith("error"):
                ended[0] = True
                log.error("video %s failed: %s", s.id, stream.outbox.reason)
                return  # the truncated file tells the client; the status line has already gone out
            tail = await stream.run_in_pool(muxer.close)
            muxer = None
            ended[0] = True
            if tail:
                yield tail
        finally:
            cancelled()
            stream.close("disconnected")
            if muxer is not None:
                core.encode_submit(muxer.close)

    started, ended, counted = [False], [False], [False]

    def cancelled() -> None:
        """The client left before the clip ended: its session stops at once, counted as a cancellation."""
        if not ended[0] and not counted[0]:
            counted[0] = True
            state.metrics.on_cancelled(s.model, "disconnect", "running" if started[0] else "queued")

    def on_close() -> None:
        cancelled()
        stream.close("disconnected")

    headers = {"X-Fewstep-Seed": str(s.seed), "X-Fewstep-Frames": str(body.num_frames), "Cache-Control": "no-store"}
    return ClosingStreamingResponse(body_iter(), media_type="video/mp4", headers=headers, on_close=on_close)
