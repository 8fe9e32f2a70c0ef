"""A loopback HTTP/1.1 proxy that puts seeded faults in front of a storage endpoint (moto).

Each request is read whole (head + Content-Length or chunked body), then the proxy decides what to
do with it: pass it on, reset the connection before forwarding (the request never happened), forward
it and drop the answer (it happened, the client does not know), or answer 500/503 itself. The
decision for the k-th request with a given method and path is drawn from `seed`, so a run sees the
same faults whatever order its threads send requests in. `down()` makes the endpoint refuse every
request (an outage) until `up()`. Stopped by `stop()`; it owns no other process.
"""

from __future__ import annotations

import random
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

PASS, RESET, DROP_RESPONSE, ERROR_500, ERROR_503 = "pass", "reset", "drop_response", "error_500", "error_503"
FAULTS = (RESET, DROP_RESPONSE, ERROR_500, ERROR_503)
_SLOWDOWN = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>"
             b"<Message>Please reduce your request rate.</Message></Error>")
_INTERNAL = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>"
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")


@dataclass
class FaultPlan:
    """Probabilities of each fault per request (the rest pass)."""

    reset: float = 0.0
    drop_response: float = 0.0
    error_500: float = 0.0
    error_503: float = 0.0
    methods: tuple[str, ...] = ("GET", "PUT", "POST", "HEAD", "DELETE")  # requests that may be faulted

    def draw(self, rng: random.Random) -> str:
        x = rng.random()
        for name, p in ((RESET, self.reset), (DROP_RESPONSE, self.drop_response),
                        (ERROR_500, self.error_500), (ERROR_503, self.error_503)):
            if x < p:
                return name
            x -= p
        return PASS


@dataclass
class FaultProxy:
    backend_port: int
    seed: int = 0
    plan: FaultPlan = field(default_factory=FaultPlan)
    on_request: Callable[[int, str, str], None] | None = None  # (n, method, path), before the decision
    port: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    _seen: Counter[str] = field(default_factory=Counter)
    _down: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socket.socket | None = None
    _conns: set[socket.socket] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="fault-proxy").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._cut_all()

    def down(self) -> None:
        """Refuse every request (reset) until `up()`; open connections are cut now."""
        self._down = True
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _close(c)

    def up(self) -> None:
        self._down = False

    @property
    def injected(self) -> int:
        return sum(self.counts[f] for f in FAULTS) + self.counts["refused_while_down"]

    def _accept(self) -> None:
        while self._server is not None:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            self.counts["requests"] += 1
            n = self.counts["requests"]
            key = f"{method} {path.split('?')[0]}"
            k = self._seen[key]
            self._seen[key] += 1
        if self.on_request is not None:
            self.on_request(n, method, path)
        if self._down:
            with self._lock:
                self.counts["refused_while_down"] += 1
            return RESET
        if method not in self.plan.methods:
            return PASS
        action = self.plan.draw(random.Random(f"{self.seed}/{key}/{k}"))
        with self._lock:
            self.counts[action] += 1
        return action

    def _serve(self, client: socket.socket) -> None:
        backend: socket.socket | None = None
        reader = _Reader(client)
        try:
            while True:
                request = reader.message()
                if request is None:
                    return
                head, raw = request
                method, path = head[0], head[1]
                action = self._decide(method, path)
                if action == RESET:
                    return
                if action in (ERROR_500, ERROR_503):
                    body = _INTERNAL if action == ERROR_500 else _SLOWDOWN
                    status = b"500 Internal Server Error" if action == ERROR_500 else b"503 Slow Down"
                    client.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\n"
                                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                                   + (b"" if method == "HEAD" else body))
                    continue
                if backend is None:
                    try:
                        backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=30)
                    except OSError:  # the server behind us is down: the client sees a reset
                        self.counts["backend_unreachable"] += 1
                        return
                backend.sendall(raw)
                response = _Reader(backend).message(response_to=method)
                if response is None:
                    self.counts["backend_closed"] += 1
                    return
                if action == DROP_RESPONSE:
                    return
                client.sendall(response[1])
        except OSError:
            return
        finally:
            _close(client)
            if backend is not None:
                _close(backend)
            with self._lock:
                self._conns.discard(client)


class _Reader:
    """Reads whole HTTP/1.1 messages (head and body) from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf = sock, b""

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 16)
        if not data:
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        i = self.buf.index(b"\r\n") + 2
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def message(self, response_to: str | None = None) -> tuple[list[str], bytes] | None:
        """(first line split, raw bytes) of the next message; None when the peer closed."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        lines = head.decode("latin-1").split("\r\n")
        first = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if response_to is not None and (response_to == "HEAD" or first[1][:1] == "1" or first[1] in ("204", "304")):
            return first, head
        if response_to is None and headers.get("expect", "").lower() == "100-continue":
            # botocore waits for this before sending a PUT body; we answer it and forward without it
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = "\r\n".join(ln for ln in lines if not ln.lower().startswith("expect:")).encode("latin-1")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size_line = self._line()
                if size_line is None:
                    return None
                body += size_line
                n = int(size_line.split(b";")[0].strip(), 16)
                if n == 0:  # last chunk: trailers (aws-chunked checksums) up to an empty line
                    while (line := self._line()) not in (None, b"\r\n"):
                        body += line  # type: ignore[operator]
                    return None if line is None else (first, head + body + line)
                chunk = self._take(n + 2)
                if chunk is None:
                    return None
                body += chunk
        n = int(headers.get("content-length", "0"))
        body = self._take(n) if n else b""
        if body is None:
            return None
        return first, head + body


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
