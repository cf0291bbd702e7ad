"""The transports of the metrics: `-o prom=PATH` (a textfile) and `-o metrics_listen=ADDR:PORT`.

Theory of operation
- `Exporter` is the output behind the two options. `open()` checks everything before the daemon
  forks (the prom directory is there, safe and takes a new file; the listening socket is bound,
  so a port in use is one line and exit 2); `run()` writes the prom file at start and every
  prom_interval seconds (a new file under an unpredictable name in the same directory, then
  rename: node_exporter never reads half a file, and no link another user planted is
  followed: see nvmefs/linux/safefiles.py) and serves HTTP; `close()` closes the socket.
- The prom file is removed when run() ends (the daemon stopped cleanly): metrics that vanish
  say "nvmefs is not running" (absent() alerts), where a file left behind would go on exporting
  the last values as if they were live. A daemon that was killed leaves it; its age shows in
  node_exporter's node_textfile_mtime_seconds. close() never removes it: the parent closes its
  copy of the output after the fork while the daemon goes on writing.
- The HTTP server is a trio accept loop on the socket open() bound, with no threads. It answers
  GET and HEAD of /metrics (any query string ignored) and 404 for any other path, one request per
  connection (Connection: close). A scrape is answered at once whatever number of idle, slow or
  hostile clients are connected, and they cost bounded memory, descriptors and tasks:
  - The loop always accepts: a connection never waits in the kernel's accept backlog behind
    others the daemon holds.
  - A connection is first *waiting* (for its request head), then *answering* (the response is
    sent, then the client's close awaited: see _linger). Each phase holds at most MAX_WAITING
    and MAX_ANSWERING connections; a connection entering a full phase drops the oldest one in
    it, which has had the longest chance. A scraper sends its request as soon as it connects
    and reads the answer at once, so it is never the oldest for long.
  - A request head must be whole within HEAD_TIMEOUT_S seconds of the accept (however slowly
    it trickles in) and within MAX_HEAD bytes (else 431); the answer, within ANSWER_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time

import trio

from nvmefs.errors import UsageError
from nvmefs.linux.safefiles import SafeDir, UnsafePath
from nvmefs.options import Parsed
from nvmefs.outputs.metrics import Metrics
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import HostEvent
from nvmefs.store.ring import DebugRing

log = logging.getLogger("nvmefs.metrics")

# The HTTP server's bounds (see the module docstring).
MAX_HEAD = 8192
HEAD_TIMEOUT_S = 2.5
ANSWER_TIMEOUT_S = 10.0
MAX_WAITING = 32
MAX_ANSWERING = 16
# The kernel's queue of connections not yet accepted (capped at net.core.somaxconn): the loop
# accepts at once, so it only absorbs a burst of connects, whose overflow would be dropped and
# retried by the client a second later.
BACKLOG = 1024
# After the response, what the client still sends is read (and thrown away) for this long before
# the socket closes: closing with unread data resets the connection, which can destroy the
# response in flight.
LINGER_S = 1.0
LINGER_BYTES = 64 << 10
# The pause after accept() failed for want of descriptors or memory, before trying again.
ACCEPT_RETRY_S = 0.1
# An HTTP answer is rendered at most once per this many seconds per format asked for (a flood of
# requests must not take the event loop from the engine), and for at most this many formats.
CACHE_S = 1.0
CACHE_FORMATS = 4
# What a client that went away, or was dropped, makes the answer fail with.
GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
# A request that fails on a bug of ours is logged at most once per this many seconds.
FAILURE_LOG_S = 60.0
# The mode of the prom file: node_exporter runs as its own user and must be able to read it.
PROM_MODE = 0o644


# -- the output ---------------------------------------------------------------------------------


def _shown_listen(host: str, port: int) -> str:
    """ADDR:PORT as the option is written: [v6]:PORT, and :PORT for every address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _prom_dir(path: str) -> SafeDir:
    """The checked directory of the prom file; OSError (an UnsafePath is one: EACCES) if it
    cannot be had or is not safe."""
    try:
        return SafeDir.open(os.path.dirname(path) or ".")
    except UnsafePath as e:
        raise PermissionError(errno.EACCES, str(e)) from None


def _open_prom_dir(path: str) -> SafeDir:
    """The checked directory of the prom file at `path` (see nvmefs/linux/safefiles.py);
    UsageError in one line unless a prom file can be written there (as run() writes it)."""
    where = os.path.dirname(path) or "."
    d = SafeDir.open_for(f"prom={path}", where)
    try:
        st = d.lstat(os.path.basename(path))
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"prom={path}: is a directory")
        # What run() does, so a read-only filesystem or an ACL is found now, not later.
        try:
            fd, tmp = d.create_temp(f".{os.path.basename(path)}.", ".tmp", os.O_WRONLY, 0o600)
        except OSError as e:
            raise UsageError(f"prom={path}: cannot write in {where}: {e.strerror}") from None
        os.close(fd)
        d.unlink(tmp)
    except BaseException:
        d.close()
        raise
    return d


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port ("" every address, IPv6 too where there is IPv6);
    UsageError in one line if it cannot be had."""
    shown = _shown_listen(host, port)
    try:
        if not host:
            if socket.has_dualstack_ipv6():
                return socket.create_server(
                    ("", port), family=socket.AF_INET6, dualstack_ipv6=True, backlog=BACKLOG
                )
            return socket.create_server(("", port), backlog=BACKLOG)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        return socket.create_server(address[:2], family=family, backlog=BACKLOG)
    except socket.gaierror as e:
        raise UsageError(f"metrics_listen={shown}: cannot resolve {host}: {e.strerror}") from None
    except OSError as e:
        # create_server's strerror says the address again, in Python's syntax: not ours.
        why = os.strerror(e.errno) if e.errno else str(e)
        raise UsageError(f"metrics_listen={shown}: cannot listen: {why}") from None


class Exporter:
    """The prom file and the HTTP listener the options asked for (one of them at least).

    Invariant: `listener` is the socket open() bound, until close(); `_written` is the
    (device, inode) of the last prom file this process wrote and has not removed, so that run()
    removes only its own file.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        prom: str | None = None,
        interval: float = 15.0,
        listener: socket.socket | None = None,
    ) -> None:
        self.metrics = metrics
        self.prom = prom
        self.interval = interval
        self.listener = listener
        self._written: tuple[int, int] | None = None
        self._failing = False  # the last write of the prom file failed
        self._cache: dict[str, tuple[float, bytes, str]] = {}  # Accept -> (made, body, type)
        self.failed_requests = 0  # requests that failed on a bug of ours (logged)
        self._failure_logged = -FAILURE_LOG_S

    @classmethod
    def open(cls, opts: Parsed, metrics: Metrics | None = None) -> Exporter | None:
        """The exporter of `-o prom=` and `-o metrics_listen=`, checked and bound; None when
        neither was given. `metrics` is the daemon's (a new one when None)."""
        prom: str | None = opts["prom"]
        listen: tuple[str, int] | None = opts["metrics_listen"]
        if prom is None and listen is None:
            return None
        if prom is not None:
            _open_prom_dir(prom).close()
        listener = _bind(*listen) if listen is not None else None
        return cls(
            metrics or Metrics(), prom=prom, interval=opts["prom_interval"], listener=listener
        )

    def attach(self, ring: DebugRing) -> None:
        self.metrics.attach(ring)

    def close(self) -> None:
        """Close the listening socket (idempotent). The prom file stays: see run()."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    async def run(self, recorder: Recorder) -> None:
        """Write the prom file now and every `interval` seconds, and serve HTTP, until
        cancelled; then remove the prom file this process wrote last."""
        try:
            async with trio.open_nursery() as nursery:
                if self.listener is not None:
                    nursery.start_soon(self.serve, recorder)
                if self.prom is not None:
                    nursery.start_soon(self._write_every_interval, recorder)
        finally:
            self.remove_prom()

    # -- the prom file -------------------------------------------------------------------------

    async def _write_every_interval(self, recorder: Recorder) -> None:
        while True:
            self.write_prom(recorder)
            await trio.sleep(self.interval)

    def write_prom(self, recorder: Recorder) -> bool:
        """Replace the prom file with the metrics now, atomically; False (logged, and noted in
        the ring when it starts failing) if it cannot be written."""
        assert self.prom is not None
        try:
            # The directory is looked up and checked at every write: it may have been removed
            # and made again (or made unsafe) since the last.
            with contextlib.closing(_prom_dir(self.prom)) as where:
                self._written = write_atomically(
                    where, os.path.basename(self.prom), self.metrics.exposition(recorder)
                )
        except OSError as e:
            if not self._failing:
                self._failing = True
                message = f"prom={self.prom}: cannot write: {e.strerror or e}"
                log.warning("%s", message)
                recorder.ring.append(HostEvent(events.HOST_ERROR, message))
            return False
        if self._failing:
            self._failing = False
            log.info("prom=%s: written again", self.prom)
        return True

    def remove_prom(self) -> None:
        """Remove the prom file if it is still the one this process wrote last."""
        if self.prom is None or self._written is None:
            return
        with contextlib.suppress(OSError), contextlib.closing(_prom_dir(self.prom)) as where:
            where.unlink_if_ours(os.path.basename(self.prom), self._written)
        self._written = None

    # -- HTTP ----------------------------------------------------------------------------------

    async def serve(self, recorder: Recorder) -> None:
        """Accept connections on the listener until cancelled, each served by a task of its own
        within the bounds of the module docstring."""
        assert self.listener is not None
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.listener))
        waiting, answering = Phase(MAX_WAITING), Phase(MAX_ANSWERING)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:  # out of descriptors or memory: not the listener's fault
                    log.warning("metrics: accept failed: %s", e.strerror or e)
                    await trio.sleep(ACCEPT_RETRY_S)
                    continue
                # Entered here, not in the task: the oldest waiting connection is dropped
                # before the next accept, so a flood of accepts cannot outrun the bound.
                scope = waiting.enter(trio.current_time() + HEAD_TIMEOUT_S)
                nursery.start_soon(self._connection, stream, scope, waiting, answering, recorder)

    async def _connection(
        self,
        stream: trio.SocketStream,
        scope: trio.CancelScope,
        waiting: Phase,
        answering: Phase,
        recorder: Recorder,
    ) -> None:
        """Read one request and answer it. A client that went away, or was dropped, is owed
        no answer; a bug answering one client is counted and logged, never ends the daemon."""
        try:
            with contextlib.suppress(*GONE):
                head: bytes | None = None
                try:
                    with scope:
                        head = await _read_head(stream)
                finally:
                    waiting.leave(scope)
                if head is None:
                    return  # dropped, too slow, or closed before a whole request
                scope = answering.enter(trio.current_time() + ANSWER_TIMEOUT_S)
                try:
                    with scope:
                        await self._exchange(stream, head, recorder)
                finally:
                    answering.leave(scope)
        except Exception:
            self.failed_requests += 1
            now = time.monotonic()
            if now - self._failure_logged >= FAILURE_LOG_S:
                self._failure_logged = now
                log.exception("metrics_listen: a request failed (%d so far)", self.failed_requests)
        finally:
            await trio.aclose_forcefully(stream)

    def _encoded(self, recorder: Recorder, accept: str) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for, made at most once per CACHE_S per
        format: a flood of requests costs a render a second, not one each."""
        now = time.monotonic()
        cached = self._cache.get(accept)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1], cached[2]
        body, content_type = self.metrics.encode(recorder, accept)
        if len(self._cache) >= CACHE_FORMATS:  # the header is the client's: keep a few
            self._cache.clear()
        self._cache[accept] = (now, body, content_type)
        return body, content_type

    async def _exchange(self, stream: trio.SocketStream, head: bytes, recorder: Recorder) -> None:
        """Answer the request `head` (as _read_head returned it), then linger."""
        if not _ended(head):
            await _respond(stream, 431, "request head over 8 KiB\n")
        elif (request := parse_head(head)) is None:
            await _respond(stream, 400, "not an HTTP/1.x request\n")
        elif request.method not in ("GET", "HEAD"):
            await _respond(stream, 405, "only GET and HEAD\n", [("Allow", "GET, HEAD")])
        elif request.path != "/metrics":
            await _respond(stream, 404, "not found: the metrics are at /metrics\n",
                           head_only=request.method == "HEAD")  # fmt: skip
        else:
            body, content_type = self._encoded(recorder, request.headers.get("accept", ""))
            await _respond(stream, 200, body, [("Content-Type", content_type)],
                           head_only=request.method == "HEAD")  # fmt: skip
        await _linger(stream)


class Phase:
    """The connections in one phase of their life (waiting for their request, or being
    answered), at most `limit` of them: entering a full phase drops the oldest connection in it.

    Invariant: `_scopes` holds the cancel scope of every connection in the phase, oldest first
    (a dict keeps insertion order), and never more than `limit`; a scope removed from it by
    enter() has been cancelled.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._scopes: dict[trio.CancelScope, None] = {}

    def enter(self, deadline: float) -> trio.CancelScope:
        """The scope of a connection entering the phase, cancelled at `deadline` (trio time)
        or when a newer connection needs its place; the oldest is cancelled if it is full."""
        while len(self._scopes) >= self.limit:
            oldest = next(iter(self._scopes))
            del self._scopes[oldest]
            oldest.cancel()
        scope = trio.CancelScope(deadline=deadline)
        self._scopes[scope] = None
        return scope

    def leave(self, scope: trio.CancelScope) -> None:
        """The connection of `scope` is out of the phase (whether it was dropped or not)."""
        self._scopes.pop(scope, None)


def _ended(head: bytes | bytearray) -> bool:
    """Whether `head` holds the blank line that ends a request head."""
    return b"\r\n\r\n" in head or b"\n\n" in head


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request head, up to its blank line (what follows it in the same read too); the
    first MAX_HEAD bytes if there is no blank line in them; None if the client closed first."""
    head = bytearray()
    while not _ended(head) and len(head) < MAX_HEAD:
        chunk = await stream.receive_some(MAX_HEAD - len(head))
        if not chunk:
            return None  # closed before a whole request: nothing to answer
        head += chunk
    return bytes(head)


class Request:
    """The parts of an HTTP/1.x request head the server looks at. Header names are lower case;
    of a repeated header the last one counts."""

    def __init__(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.headers = headers


def parse_head(head: bytes) -> Request | None:
    """The request line and headers of `head` (up to the blank line); None if it is not an
    HTTP/1.x request."""
    text = head.decode("latin-1").replace("\r\n", "\n").split("\n\n", 1)[0]
    line, *rest = text.split("\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        return None
    headers = {}
    for field in rest:
        name, colon, value = field.partition(":")
        if not colon or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], headers)


REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


async def _respond(
    stream: trio.SocketStream,
    code: int,
    body: bytes | str,
    headers: list[tuple[str, str]] | None = None,
    *,
    head_only: bool = False,
) -> None:
    data = body.encode() if isinstance(body, str) else body
    fields = headers or [("Content-Type", "text/plain; charset=utf-8")]
    fields = [*fields, ("Content-Length", str(len(data))), ("Connection", "close")]
    lines = [f"HTTP/1.1 {code} {REASONS[code]}"] + [f"{k}: {v}" for k, v in fields]
    await stream.send_all("\r\n".join(lines).encode() + b"\r\n\r\n" + (b"" if head_only else data))


async def _linger(stream: trio.SocketStream) -> None:
    """Say we are done sending, and read what the client still sends for a moment (bounded),
    so closing does not reset a connection whose response is still on its way."""
    with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_eof()
        with trio.move_on_after(LINGER_S):
            got = 0
            while got < LINGER_BYTES:
                chunk = await stream.receive_some(LINGER_BYTES - got)
                if not chunk:
                    break
                got += len(chunk)


def write_atomically(where: SafeDir, name: str, data: bytes) -> tuple[int, int]:
    """Replace the file `name` in `where` with `data`, readable by all: a new file under a
    name nobody can foresee in the same directory, renamed over it, so a reader sees the old
    file or the new one, never a part, and no link another user planted is ever followed.
    Returns the new file's (device, inode). The temporary name does not end in .prom, so
    node_exporter never reads it; it is removed if anything fails."""
    fd, tmp = where.create_temp(f".{name}.", ".tmp", os.O_WRONLY, PROM_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, PROM_MODE)  # whatever the umask took away
            f.write(data)
            st = os.fstat(fd)
        where.rename(tmp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            where.unlink(tmp)
        raise
    return st.st_dev, st.st_ino
