"""The engine's refusals, in one module that imports nothing of ours, so the core, the image scheduler and the
stream scheduler all raise them without importing one another (core <-> stream.scheduler was a cycle).

Every refusal is an ``EngineError`` whose ``status`` is the HTTP status the server answers with; the helpers below
build the ones raised from more than one place, so their wording and codes stay the same everywhere."""

from __future__ import annotations


class EngineError(Exception):
    """A request the engine refuses; ``status`` is the HTTP status the server should answer with, ``retry_after``
    (seconds) its Retry-After header where the refusal is temporary."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after = status, param, code, retry_after


def model_not_found(model: str, served) -> EngineError:
    return EngineError(f"model {model!r} is not served here; available: {sorted(served)}", 404, "model",
                       "model_not_found")


def overloaded(what: str, retry_after: float | None = None) -> EngineError:
    """503: the queue or the stream slots are full. ``what`` says what is full, and the message ends with when to
    retry (seconds, where known)."""
    when = f"retry in {retry_after:g} s" if retry_after is not None else "retry later"
    return EngineError(f"server is at capacity ({what}); {when}", 503, None, "overloaded", retry_after=retry_after)


def cancelled(reason: str) -> EngineError:
    """499: the request was aborted (its client disconnected, or the server shut down)."""
    return EngineError(f"request cancelled ({reason})", 499, None, "cancelled")


# Why a stream ends when its engine is gone (the engine process died): a transport tells its client to reconnect (to
# a restarted server) instead of reporting a failed stream.
ENGINE_STOPPED = "error: engine stopped"
