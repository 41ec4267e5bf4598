"""httptools with a bound on the request head, for ``fewstep serve``.

uvicorn bounds the request line + headers only under h11 (``h11_max_incomplete_event_size``, which
``http.max_header_bytes`` sets); its httptools protocol has no such setting, and a test against uvicorn 0.55 +
httptools 0.9 accepted an 8 MiB header. This subclass enforces the same limit, so the faster parser does not
quietly drop a security limit: a head that grows past it across reads is refused before more is buffered, and a
complete head over it is refused before the app sees it (both: 400, connection closed, as under h11).

Used when httptools imports (``uvicorn[standard]``); otherwise ``fewstep serve`` runs h11.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    _in_head = True  # between the end of a message (or the connection's start) and the end of the next head
    _head_bytes = 0  # bytes received while in a head (a read that ends the head counts whole: an upper bound)

    def _limit(self) -> int | None:
        return self.config.h11_max_incomplete_event_size

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        limit = self._limit()
        if self._in_head and limit is not None and self._head_bytes > limit and not self.transport.is_closing():
            self.logger.warning("request head over %d bytes refused", limit)
            self.send_400_response("Request head too large.")

    def on_headers_complete(self) -> None:
        limit = self._limit()
        size = len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)  # "name: value\r\n"
        if limit is not None and size > limit:
            # httptools turns this into HttpParserError, which uvicorn answers with 400 and a closed connection
            raise ValueError(f"request head of {size} bytes is over the {limit}-byte limit")
        self._in_head, self._head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # keep-alive: the next request's head starts
