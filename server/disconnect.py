"""Cancel work whose HTTP client went away: race the work against the ASGI ``http.disconnect`` message.

The request body has been read by the time a route runs, so the next ``receive()`` returns only when the client
disconnects (uvicorn answers ``http.disconnect``). Cancelling the work's task reaches ``AsyncEngine.generate``,
which aborts the request in the engine: queued, it never runs; running, its result is discarded.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before its response was ready."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``await work``, or cancel it and raise ClientDisconnected as soon as the client disconnects."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done() and not watch.done():  # we were cancelled ourselves
            task.cancel()
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    raise ClientDisconnected
