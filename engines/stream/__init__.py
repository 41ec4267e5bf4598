"""Video streams: sessions (session.py), the moving-buffer policy and the fair session scheduler
(scheduler.py), the video model runner (pipeline.py) and fragmented-MP4 muxing (fmp4.py)."""

from .pipeline import StreamPipeline
from .scheduler import Emission, MovingBufferPolicy, StreamScheduler
from .session import FRAME_FORMATS, Outbox, StreamChunk, StreamSession, StreamStart

__all__ = ["StreamPipeline", "Emission", "MovingBufferPolicy", "StreamScheduler", "FRAME_FORMATS", "Outbox",
           "StreamChunk", "StreamSession", "StreamStart"]
