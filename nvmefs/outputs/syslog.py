"""`-o syslog[=SOCKET]`: every logged entry to the local syslog socket as one RFC 5424 message.

Theory of operation: the output is one more reader of the ring, like an open file. The ring's
append callback does O(1) work: it wakes the sender task if that task is idle, nothing more
(nothing is rendered or copied on append). The sender keeps `last`, the sequence number of the
last entry it has dealt with, and reads what follows through its ring cursor (BATCH at a time): the
ring itself is the queue, so the backlog is bounded by the ring's capacity and costs no memory
of its own. An entry the ring overwrites (or `clear` removes) before the sender reads it,
because the syslog daemon was slow, full or gone, is counted in `dropped` from that moment on,
though the sender, parked on a full socket, learns of it (as the cursor's missed count) only
at its next read: `dropped` adds the entries the ring no longer holds past the cursor, the
newest entry the sender has read. The next time the socket accepts a message, one message "nvmefs: N
entries not sent to syslog" goes out first, at the place of the gap. So, for the entries after
the ring's oldest at `attach`, at every moment

    entries == sent + dropped + skipped + pending

where `skipped` counts the replayed entries passed over (below) and `pending` the entries after
`last` still to send: those the sender holds, read but not yet sent, and those the ring holds
past the cursor.

The socket is a connected, non-blocking AF_UNIX datagram socket. A full socket (EAGAIN: the
daemon is not reading) parks the sender in `wait_writable`, never the trio loop; the entries wait
in the ring meanwhile. A socket that went away (ECONNREFUSED, ENOENT...: the daemon restarted
or stopped) is closed and connected again with a backoff of RETRY_MIN doubling to RETRY_MAX
seconds; the entry being sent is retried on the new socket. No socket error leaves run().
"Sent" means the kernel took the datagram: what a daemon had not yet read when it stopped is
lost unseen, as for every syslog(3) caller.

Entries replayed from the journal (marked `replayed`) are not sent, only counted in `skipped`:
the daemon that recorded them sent them. The journal restores them before our `attach` (it is
opened first) and appends a notice saying so, which is this run's and is sent: so `attach`
starts at the ring's oldest entry and the flag, not the order, decides. (A replayed entry the
ring overwrote before the sender read it can no longer be told apart: it counts as dropped.)

The message (RFC 5424 section 6), for an entry of wall time `wall_ns`:

    <PRI>1 TIMESTAMP HOSTNAME nvmefs PID MSGID [nvmefs@32473 seq="N" ...] INFO

PRI is facility daemon (3) * 8 + the severity of SEVERITY; TIMESTAMP is the entry's wall time
in UTC with microseconds; MSGID is the entry's kind ("nvme", "start", "host-error"...); the
structured data's SD-ID uses 32473, the private enterprise number RFC 5612 reserves for
documentation: a site that wants its own registers one and nothing else changes; INFO is the
entry's info text, as in the ring's text file but all in printable ASCII (render.info's ascii
form: the one escaping rule of the text outputs, with every character outside ASCII escaped
too). Every part is printable ASCII and capped, so a message is at most MESSAGE_MAX bytes,
whole, with no newline to split it: under rsyslog's default maxMessageSize (8 KiB) and far
under a datagram's limit. PARAM-VALUEs are that ASCII form with '"', '\\' and ']' escaped as
RFC 5424 section 6.3.3 asks.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from nvmefs.errors import UsageError
from nvmefs.linux.safefiles import SafeDir, UnsafePath
from nvmefs.nvme.status import SCT_MEDIA
from nvmefs.options import Parsed
from nvmefs.recorder import Recorder
from nvmefs.store import events
from nvmefs.store.events import NvmeEvent
from nvmefs.store.render import INFO_MAX, cap, escape, info
from nvmefs.store.ring import Cursor, DebugRing, Entry

log = logging.getLogger("nvmefs")

# RFC 5424 section 6.2.1: numerical facility and severity codes.
FACILITY_DAEMON = 3
EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)

# What an entry is, for its severity (see `entry_class`): an NVMe completion is classed by its
# status, a host event by its kind.
MEDIA_ERROR = "media-error"  # an NVMe status of SCT 2, media and data integrity errors
NVME_ERROR = "nvme-error"  # any other status that is not success
NVME_OK = "nvme-ok"  # a successful completion (log=all)
NOT_SENT = "not-sent"  # our own message: entries that never reached syslog

# The severity of each class of entry: the table is the whole rule.
SEVERITY: dict[str, int] = {
    MEDIA_ERROR: ERR,
    NVME_ERROR: WARNING,
    NVME_OK: INFO,
    events.HOST_ERROR: WARNING,
    events.TIMEOUT: WARNING,
    events.ABORT: WARNING,
    events.RESET: WARNING,
    events.LOST: WARNING,
    events.KERNEL_LOG: WARNING,
    events.START: NOTICE,
    events.NOTICE: NOTICE,
    NOT_SENT: WARNING,
}
# A kind of entry this table does not name yet: shown rather than hidden.
DEFAULT_SEVERITY = WARNING

APP_NAME = "nvmefs"
# The private enterprise number RFC 5612 reserves for documentation: an SD-ID that is not
# registered with IANA must have the form name@PEN (RFC 5424 section 6.3.2).
PEN = 32473
SD_ID = f"nvmefs@{PEN}"
NILVALUE = "-"

# Caps that bound a message (their sum is below): an SD-NAME and a MSGID are at most
# 32 characters (RFC 5424 section 6), a HOSTNAME 255.
NAME_MAX = 32
HOSTNAME_MAX = 255
VALUE_MAX = 64  # a param value, before escaping (status names are up to 51 characters)
PARAMS_MAX = 17  # params of one message (an NVMe entry has at most 17)
TEXT_MAX = INFO_MAX  # the MSG: the info text's own cap, escaped to ASCII before the cap
# Header <= 7 + 27 + 255 + 6 + 10 + 32 + 5 spaces = 342; structured data <= 14 + 17 * (1 + 32
# + 3 + 2 * 64) = 2802; MSG <= 1 + 255.
MESSAGE_MAX = 4096

# Entries read from the ring per step: the loop yields between steps.
BATCH = 256
# Reconnecting: the first wait, and the longest, in seconds.
RETRY_MIN = 0.1
RETRY_MAX = 5.0
# A full socket is tried again at least this often (seconds), should no wake-up come.
RECHECK = 5.0


class SyslogError(UsageError):
    """A syslog socket that cannot be used: one line, before the daemon starts."""


# -- the message ---------------------------------------------------------------------------------


def printable(text: str) -> str:
    """`text` as printable ASCII: the text outputs' one escaping rule (render.escape), with
    every character outside printable ASCII escaped (\\xNN, \\uNNNN, \\UNNNNNNNN) and the
    backslash as \\\\, so the escapes can be undone exactly."""
    return escape(text, ascii_only=True)


def sd_name(text: str) -> str:
    """`text` as an SD-NAME or MSGID: printable ASCII but '=', space, ']' and '"', at most 32
    characters; the NILVALUE '-' when nothing is left."""
    name = "".join(ch for ch in printable(text) if ch not in '= ]"')[:NAME_MAX]
    return name or NILVALUE


def sd_value(value: Any) -> str:
    """`value` as a PARAM-VALUE: printable ASCII, capped at VALUE_MAX characters, then '"', '\\'
    and ']' escaped with a backslash (RFC 5424 section 6.3.3). Capped first and never inside
    an escape, so no escape is cut in half; a receiver that undoes RFC 5424's escapes has the
    value in the text outputs' form."""
    if type(value) is int:  # most params: nothing to check
        return str(value)
    text = cap(printable(str(value)), VALUE_MAX)
    if '"' in text or "\\" in text or "]" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return text


def timestamp(wall_ns: int) -> str:
    """Wall-clock nanoseconds as an RFC 3339 TIMESTAMP in UTC with microseconds."""
    sec, ns = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"


def hostname(name: str | None = None) -> str:
    """This host's name as a HOSTNAME field (printable ASCII, no space, at most 255)."""
    name = socket.gethostname() if name is None else name
    return "".join(ch for ch in printable(name) if ch != " ")[:HOSTNAME_MAX] or NILVALUE


def entry_class(event: Any) -> str:
    """The key of SEVERITY for an entry's event."""
    if isinstance(event, NvmeEvent):
        st = event.status
        if st.ok:
            return NVME_OK
        return MEDIA_ERROR if st.sct == SCT_MEDIA else NVME_ERROR
    return str(event.kind)


def severity(event: Any) -> int:
    """An entry's RFC 5424 severity code, from SEVERITY."""
    return SEVERITY.get(entry_class(event), DEFAULT_SEVERITY)


def message(
    sev: int,
    wall_ns: int,
    host: str,
    pid: int,
    msgid: str,
    params: Iterable[tuple[str, Any]],
    text: str,
) -> bytes:
    """One RFC 5424 message of facility daemon, printable ASCII of at most MESSAGE_MAX bytes.
    Params whose value is None are left out; at most PARAMS_MAX are kept. `text`, the MSG, is
    an entry's info text in its ASCII form (render.info(..., ascii_only=True)), or any text made
    here."""
    if not (0 < len(host) <= HOSTNAME_MAX and host.isascii() and host.isprintable()) or (
        " " in host
    ):
        host = hostname(host)  # callers pass hostname()'s result: this is seldom needed
    sd = [SD_ID]
    for name, value in params:
        if value is None:
            continue
        if len(sd) > PARAMS_MAX:
            break
        if not (name.isidentifier() and name.isascii() and len(name) <= NAME_MAX):
            name = sd_name(name)  # the params nvmefs makes need no change
        sd.append(f'{name}="{sd_value(value)}"')
    # The info text is escaped and capped already (render.info(..., ascii_only=True)); what is not
    # printable ASCII is escaped here too, so that a caller's raw text cannot split the
    # message (its backslashes are then escaped once more), and the cap keeps the bound.
    if not (text.isascii() and text.isprintable()):
        text = printable(text)
    msg = cap(text, TEXT_MAX)
    pri = FACILITY_DAEMON * 8 + sev
    return (
        f"<{pri}>1 {timestamp(wall_ns)} {host} {APP_NAME} {pid} {sd_name(msgid)} "
        f"[{' '.join(sd)}] {msg}"
    ).encode("ascii")


def entry_params(seq: int, event: Any) -> list[tuple[str, Any]]:
    """The structured data of an entry: its sequence number, then what the event knows."""
    params: list[tuple[str, Any]] = [("seq", seq)]
    if isinstance(event, NvmeEvent):
        st = event.status
        params += [
            ("status", f"0x{st.status:x}"),
            ("name", st.name),
            ("ctrl", event.ctrl),
            ("disk", event.disk),
            ("nsid", event.nsid),
            ("qid", event.qid),
            ("cid", event.cid),
            ("opcode", None if event.opcode is None else f"0x{event.opcode:02x}"),
            ("admin", 1 if event.admin else None),
            ("op", event.op),
            ("slba", event.slba),
            ("nlb", event.nlb),
            ("retries", event.retries),
            # A folded entry (a storm's like failures): how many more it stands for, and
            # their LBAs; neither for an entry of its own.
            ("repeats", event.repeats or None),
            ("lba_range", None if event.lba_range is None else "{}..{}".format(*event.lba_range)),
            ("blk_status", st.blk_status),
        ]
    else:
        params += [(k, v) for k, v in getattr(event, "fields", {}).items() if k != "seq"]
    return params


def entry_message(entry: Entry, host: str, pid: int) -> bytes:
    """A ring entry as its RFC 5424 message."""
    seq, _mono_ns, wall_ns, event = entry
    text = info(event, ascii_only=True)
    return message(severity(event), wall_ns, host, pid, event.kind, entry_params(seq, event), text)


def not_sent_message(n: int, wall_ns: int, host: str, pid: int) -> bytes:
    """The message that stands for `n` entries that never reached syslog."""
    noun = "entry" if n == 1 else "entries"
    return message(
        SEVERITY[NOT_SENT],
        wall_ns,
        host,
        pid,
        NOT_SENT,
        [("not_sent", n)],
        f"nvmefs: {n} {noun} not sent to syslog",
    )


# -- the socket ----------------------------------------------------------------------------------

# Send errors that mean the socket is gone or unusable: reconnect. EAGAIN (full) is waited
# for, EMSGSIZE (cannot happen under MESSAGE_MAX) skips the one message; anything else is taken
# as "gone" too, as a new socket is the only cure there is.
SKIP_MESSAGE = frozenset({errno.EMSGSIZE})


def connect(path: str) -> socket.socket:
    """A non-blocking, close-on-exec datagram socket connected to `path`, found as the daemon's
    files are (nvmefs/linux/safefiles.py): through its directory, checked (only root may make
    names there), and a link only if root's; at start and at every reconnect, so a name another
    user could take never gets the daemon's entries. OSError (EACCES for an unsafe path)."""
    try:
        where, name = SafeDir.for_file(path)
    except UnsafePath as e:
        raise PermissionError(errno.EACCES, str(e)) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.setblocking(False)
        sock.connect(f"/proc/self/fd/{where.fd}/{name}")
    except BaseException:
        sock.close()
        raise
    finally:
        where.close()
    return sock


def check_socket(path: str) -> socket.socket:
    """Connect to the syslog socket at `path`; SyslogError, one line, if that cannot be."""
    where = printable(path)
    try:
        found, name = SafeDir.for_file(path)
    except UnsafePath as e:
        raise SyslogError(f"option syslog: {printable(str(e))}") from None
    except FileNotFoundError:
        raise SyslogError(
            f"option syslog: no syslog socket at {where} (its directory does not exist)"
        ) from None
    except OSError as e:
        raise SyslogError(f"option syslog: cannot reach {where}: {e.strerror}") from None
    try:
        st = found.lstat(name)
        if st is None:
            raise FileNotFoundError
    except FileNotFoundError:
        raise SyslogError(
            f"option syslog: no syslog socket at {where} (is a syslog daemon running?)"
        ) from None
    except OSError as e:
        raise SyslogError(f"option syslog: cannot reach {where}: {e.strerror}") from None
    finally:
        found.close()
    if not stat.S_ISSOCK(st.st_mode):
        raise SyslogError(f"option syslog: {where} is not a socket")
    try:
        return connect(path)
    except OSError as e:
        if e.errno == errno.ECONNREFUSED:
            raise SyslogError(
                f"option syslog: nothing listens on {where} (is a syslog daemon running?)"
            ) from None
        if e.errno == errno.EPROTOTYPE:
            raise SyslogError(f"option syslog: {where} is not a datagram socket") from None
        raise SyslogError(f"option syslog: cannot connect to {where}: {e.strerror}") from None


# -- the output ----------------------------------------------------------------------------------


class SyslogOutput:
    """The syslog output: sends every entry of this run (all but the replayed) to the socket,
    in order.

    Counters, for metrics: `sent` entries delivered, `dropped` entries that never will be (they
    left the ring first, or the socket refused the message), `errors` failed sends and
    connects (EAGAIN excluded: it is waited for, not failed), `reconnects` sockets made after
    the first; and `skipped`, replayed entries passed over. `sock` is the connected socket,
    None while reconnecting. See the module docstring for the invariant that ties the counters
    to the ring: `last` <= the cursor's place, and every entry up to `last` was sent, dropped
    or skipped.
    """

    def __init__(self, path: str, sock: socket.socket | None = None) -> None:
        self.path = path
        self.sent = 0
        self.skipped = 0
        self.errors = 0
        self.reconnects = 0
        self.sock = sock
        self._ring: DebugRing | None = None
        self._last = 0  # the last entry dealt with: sent, dropped or skipped
        # Where the sender stands in the ring: the entries after _last up to its place are
        # in hand (read, not yet sent).
        self._cursor: Cursor | None = None
        self._dropped = 0  # dropped entries the sender has learnt of (see `dropped`)
        self._unreported = 0  # dropped entries the syslog has not been told about yet
        self._host = hostname()
        self._pid = os.getpid()
        self._waiter: trio.Event | None = None  # set while the sender is idle
        self._unsubscribe: Callable[[], None] | None = None
        self._delay = RETRY_MIN
        self._closed = False

    @property
    def overtaken(self) -> int:
        """Entries the ring no longer holds that the sender has not read: lost already, though
        the sender learns of them only at its next read (it may be parked on a full socket)."""
        return 0 if self._cursor is None else self._cursor.overtaken

    @property
    def dropped(self) -> int:
        """Entries that never will be sent, counted the moment the ring lets them go: those the
        sender has learnt of, and those overtaken since it last read."""
        return self._dropped + self.overtaken

    @property
    def pending(self) -> int:
        """Entries still to send (or to skip): read and held by the sender, or in the ring."""
        ring = self._ring
        return 0 if ring is None else ring.last_seq - self._last - self.overtaken

    @classmethod
    def open(cls, opts: Parsed) -> SyslogOutput | None:
        """The output `-o syslog` asks for, its socket connected; None without the option."""
        path = opts["syslog"]
        if path is None:
            return None
        # Absolute: the path is connected to again after the syslog daemon restarts.
        path = os.path.abspath(path)
        return cls(path, check_socket(path))

    def attach(self, ring: DebugRing) -> None:
        """Send the ring's entries of this run, those it holds and those to come (in the
        daemon: its pid is the PROCID)."""
        self._ring = ring
        self._last = ring.first_seq - 1
        self._cursor = Cursor(ring, self._last)
        self._pid = os.getpid()
        self._host = hostname()
        self._unsubscribe = ring.subscribe(self._wake)

    def _wake(self) -> None:
        # Called on every append: O(1), and only an idle sender needs waking.
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set()

    async def run(self, recorder: Recorder) -> None:
        """Send entries until cancelled; socket errors are counted, never raised."""
        if self._ring is None:
            self.attach(recorder.ring)
        ring = self._ring
        assert ring is not None
        while True:
            if ring.last_seq == self._last and not self._unreported:
                self._waiter = trio.Event()
                await self._waiter.wait()
            entries = self._take(ring, BATCH)
            if self._unreported:
                n = self._unreported
                # Told once: a report the socket refuses as such is not retried (`dropped`
                # still counts its entries).
                await self._deliver(not_sent_message(n, time.time_ns(), self._host, self._pid))
                self._unreported -= n
            for entry in entries:
                seq, _mono_ns, _wall_ns, event = entry
                # The list holds the entry even if the ring overwrites its slot meanwhile.
                if event.replayed:
                    self.skipped += 1
                elif await self._deliver(entry_message(entry, self._host, self._pid)):
                    self.sent += 1
                else:
                    self._drop(1)
                self._last = seq
            # Between batches: a storm must not keep the engine and the readers waiting.
            await trio.lowlevel.checkpoint()

    def _take(self, ring: DebugRing, limit: int | None = None) -> list[Entry]:
        """Read what follows `last` (at most `limit` entries): what the ring let go of is
        dropped, the entries returned are in hand. The one place the ring is read, so that
        `read` always marks the newest entry read."""
        assert self._cursor is not None and self._cursor.ring is ring
        missed, entries = self._cursor.take(limit)
        if missed:
            self._last += missed
            self._drop(missed)
        return entries

    def _drop(self, n: int) -> None:
        self._dropped += n
        self._unreported += n

    async def _deliver(self, data: bytes) -> bool:
        """Send one message, waiting while the socket is full and reconnecting while it is
        gone; False only for a message the socket refuses as such (it is skipped)."""
        while True:
            sock = self.sock
            if sock is None:
                sock = await self._reconnect()
            try:
                sock.send(data)
            except BlockingIOError:
                # The daemon is not reading: wait, without blocking the loop. The recheck
                # bounds the wait should the socket be replaced without a wake-up.
                with trio.move_on_after(RECHECK):
                    await trio.lowlevel.wait_writable(sock)
                continue
            except OSError as e:
                self.errors += 1
                if e.errno in SKIP_MESSAGE:
                    log.warning("syslog: message refused: %s", e.strerror)
                    return False
                log.warning("syslog: %s: %s; reconnecting", self.path, e.strerror)
                self._disconnect()
                continue
            self._delay = RETRY_MIN  # reset by a delivery, not a connect: a socket that
            return True  # connects and then fails at once still backs off

    async def _reconnect(self) -> socket.socket:
        """A new socket, trying with a growing wait until one connects."""
        while True:
            await trio.sleep(self._delay)
            self._delay = min(self._delay * 2, RETRY_MAX)
            try:
                sock = connect(self.path)
            except OSError:
                self.errors += 1
                continue
            self.reconnects += 1
            self.sock = sock
            return sock

    def _disconnect(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            # Only the sender waits on the socket, and it is the caller here or not running.
            with contextlib.suppress(RuntimeError):  # outside trio: nothing can be waiting
                trio.lowlevel.notify_closing(sock)
            sock.close()

    def flush(self) -> None:
        """Send what is still to send while the socket takes it without waiting (at the end
        of the daemon: the entries of its last moments)."""
        ring, sock = self._ring, self.sock
        if ring is None or sock is None:
            return
        entries = self._take(ring)
        try:
            if self._unreported:
                n = self._unreported
                sock.send(not_sent_message(n, time.time_ns(), self._host, self._pid))
                self._unreported -= n
            for entry in entries:
                seq, _mono_ns, _wall_ns, event = entry
                if event.replayed:
                    self.skipped += 1
                else:
                    sock.send(entry_message(entry, self._host, self._pid))
                    self.sent += 1
                self._last = seq
        except OSError:  # full or gone: what is left stays unsent
            pass

    def close(self) -> None:
        """Flush without waiting, stop listening to the ring and close the socket; idempotent.
        (The parent's copy, never attached, only closes its socket.)"""
        if self._closed:
            return
        self._closed = True
        self.flush()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._disconnect()
