"""Fragmented MP4 (H.264) written incrementally, for Media Source Extensions and chunked HTTP.

PyAV (the ``av`` package) is imported lazily: it is needed only for the fMP4 options. Its wheels bundle FFmpeg
with libx264 (checked on av 18.1); without an H.264 encoder we fall back to VP9 in MP4, which Chromium and
Firefox accept in MSE too, and the MIME codecs string says which it is.

Output: ``ftyp`` + an empty ``moov`` (the init segment), then one ``moof`` + ``mdat`` fragment per frame
(``movflags=empty_moov+default_base_moof+frag_every_frame``). The muxer writes a frame's fragment when the next
frame arrives (it needs the next timestamp for the sample duration), so a chunk's last frame leaves with the
next chunk, or at ``close()``. The x264 settings are for latency: ``tune=zerolatency`` (no B-frames, no
look-ahead: one packet out per frame in), ``preset=ultrafast``, and a keyframe at every chunk start, so any chunk
can be dropped without breaking the decode of the next. Timestamps are frame indices at the stream's fps, so
dropped frames show as a held frame, not as a time warp.
"""

from __future__ import annotations

import io
import threading
from fractions import Fraction

import numpy as np


def _encoder() -> tuple[str, str]:
    import av

    for name, mime in (("libx264", "avc1"), ("h264", "avc1"), ("libvpx-vp9", "vp09")):
        try:
            av.codec.Codec(name, "w")
            return name, mime
        except ValueError:  # av's UnknownCodecError (a ValueError): the codec is absent from this FFmpeg build
            continue
    raise RuntimeError("PyAV's FFmpeg has neither an H.264 nor a VP9 encoder; fMP4 output is unavailable")


class _Sink(io.RawIOBase):
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, b) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def drain(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


class FMP4Muxer:
    """``add(frames, first_index) -> bytes`` appends frames and returns the bytes the muxer produced so far."""

    def __init__(self, width: int, height: int, fps: float, gop: int = 1, crf: int = 23):
        try:
            import av
        except ImportError as e:  # pragma: no cover - av is a dependency; kept for a clear message
            raise RuntimeError("fMP4 output needs PyAV: pip install av") from e
        if not fps >= 1:  # below 1 fps the rational rate rounds to 0 and the time base 1/rate divides by zero
            raise ValueError(f"fMP4 needs fps >= 1, got {fps}")
        self.codec, self._mime_codec = _encoder()
        self._sink = _Sink()
        self._out = av.open(self._sink, mode="w", format="mp4",
                            options={"movflags": "empty_moov+default_base_moof+frag_every_frame"})
        rate = Fraction(fps).limit_denominator(1001)
        self._stream = self._out.add_stream(self.codec, rate=rate)
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = 1 / rate
        opts = {"g": str(max(1, gop)), "keyint_min": str(max(1, gop))}
        if "264" in self.codec:
            opts.update(tune="zerolatency", preset="ultrafast", crf=str(crf))
        else:
            opts.update(deadline="realtime", **{"cpu-used": "8", "lag-in-frames": "0"})
        self._stream.codec_context.options = opts
        self._head = b""
        self.frames = 0
        self._closed = False
        # add() and close() run in a worker pool; a close after a cancelled request must wait for a running add
        self._lock = threading.Lock()

    @property
    def mime(self) -> str | None:
        """``video/mp4; codecs="avc1.PPCCLL"`` once the init segment exists (after the first ``add``)."""
        i = self._head.find(b"avcC")
        if i >= 0 and len(self._head) >= i + 8:
            p, c, lv = self._head[i + 5], self._head[i + 6], self._head[i + 7]
            return f'video/mp4; codecs="avc1.{p:02X}{c:02X}{lv:02X}"'
        if self._head and self._mime_codec == "vp09":
            return 'video/mp4; codecs="vp09.00.10.08"'
        return None

    def add(self, frames: np.ndarray, first_index: int) -> bytes:
        """frames: [N, H, W, 3] uint8 (RGB); their pts are first_index .. first_index + N - 1."""
        import av

        with self._lock:
            if self._closed:
                raise RuntimeError("FMP4Muxer is closed")
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
                vf.pts = first_index + i
                for pkt in self._stream.encode(vf):
                    self._out.mux(pkt)
                self.frames += 1
            out = self._sink.drain()
            if len(self._head) < 4096:
                self._head += out[: 4096 - len(self._head)]
            return out

    def close(self) -> bytes:
        with self._lock:
            if self._closed:
                return b""
            self._closed = True
            for pkt in self._stream.encode(None):
                self._out.mux(pkt)
            self._out.close()
            return self._sink.drain()
