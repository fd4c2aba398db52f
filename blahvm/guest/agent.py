#!/usr/bin/env python3
"""blahvm guest agent: runs a batch job's payload inside the job's guest, on behalf of the host.

Stdlib only and Python 3.6+: this one file is copied alone into guest images as
``/usr/lib/blahvm/agent.py``. It is also the single source of the wire framing, which
``blahvm.guest.protocol`` re-exports for the host side.

Usage (see docs/agent.md):
  agent.py --port org.blahvm.agent.0       serve the virtio-serial port of that name (waits for it)
  agent.py --port 'org.blahvm.agent.*'     serve every port whose name matches, as they appear
  agent.py --device /dev/vport0p1          serve an already known character device
  agent.py --listen /tmp/agent.sock        serve a UNIX socket (development and tests on a host)
  agent.py --control-listen /tmp/ctl.sock  serve a UNIX socket as the control port (tests on a host)
Each option may be repeated; every port is served by its own thread, one host connection at a time.
With --port, the control port org.blahvm.control is always served too: over it, and only over it,
root on the host tells the agent whose job the guest runs (bind). Until then no payload runs, and
then only as that identity (or as root where the host allowed it).
"""

import argparse
import errno
import fcntl
import fnmatch
import json
import os
import queue
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid

AGENT_VERSION = "1.0"
PROTOCOL_VERSION = 1

# -- framing -----------------------------------------------------------------------------------
# A frame is a 6-byte header (magic, kind, payload length, big-endian) and the payload.
# CONTROL payloads are one UTF-8 JSON object with a string "type"; data payloads are raw bytes,
# and an empty data payload means end of that stream.

MAGIC = 0xB7
HEADER = struct.Struct(">BBI")
MAX_PAYLOAD = 1 << 20
DATA_CHUNK = 64 * 1024  # what one data frame carries at most when we send

CONTROL = 0
STDIN = 1
STDOUT = 2
STDERR = 3
KIND_NAMES = {CONTROL: "control", STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr"}

STDIN_WINDOW = 1 << 20  # stdin bytes the host may send ahead of what the payload has read


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid frame or message."""


def encode_control(message):
    """One control frame carrying ``message`` (a dict with a string "type")."""
    payload = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(
            "%s message is %d bytes, more than a frame holds (%d)"
            % (message.get("type"), len(payload), MAX_PAYLOAD)
        )
    return HEADER.pack(MAGIC, CONTROL, len(payload)) + payload


def encode_data(kind, data):
    """Data frames for ``data`` on stream ``kind``, split to fit; empty ``data`` is end of stream."""
    if kind not in (STDIN, STDOUT, STDERR):
        raise ValueError("not a data stream: %r" % (kind,))
    if not data:
        return HEADER.pack(MAGIC, kind, 0)
    parts = []
    for start in range(0, len(data), DATA_CHUNK):
        chunk = data[start : start + DATA_CHUNK]
        parts.append(HEADER.pack(MAGIC, kind, len(chunk)))
        parts.append(bytes(chunk))
    return b"".join(parts)


def decode_control(payload):
    """The message in a control frame's payload, or ProtocolError."""
    try:
        message = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError("control frame is not valid JSON: %s" % (str(error)[:200],))
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("control frame is not a JSON object with a string 'type'")
    return message


class FrameDecoder(object):
    """Cuts a byte stream into frames: ``feed(bytes)`` returns the complete ``(kind, payload)``s.

    Control payloads come out decoded (a dict), data payloads as bytes. Anything malformed
    raises ProtocolError, and the decoder stays failed: a stream has no resynchronisation.
    """

    def __init__(self, max_payload=MAX_PAYLOAD):
        self._buffer = bytearray()
        self._max_payload = max_payload
        self._failed = None

    def feed(self, data):
        if self._failed is not None:
            raise ProtocolError(self._failed)
        self._buffer += data
        frames = []
        try:
            while len(self._buffer) >= HEADER.size:
                magic, kind, length = HEADER.unpack_from(self._buffer)
                if magic != MAGIC:
                    raise ProtocolError("bad frame magic 0x%02x (expected 0x%02x)" % (magic, MAGIC))
                if kind not in KIND_NAMES:
                    raise ProtocolError("unknown frame kind %d" % kind)
                if length > self._max_payload:
                    raise ProtocolError(
                        "%s frame of %d bytes exceeds the limit of %d"
                        % (KIND_NAMES[kind], length, self._max_payload)
                    )
                end = HEADER.size + length
                if len(self._buffer) < end:
                    break
                payload = bytes(self._buffer[HEADER.size : end])
                del self._buffer[:end]
                if kind == CONTROL:
                    if not payload:
                        raise ProtocolError("empty control frame")
                    frames.append((kind, decode_control(payload)))
                else:
                    frames.append((kind, payload))
        except ProtocolError as error:
            self._failed = str(error)
            raise
        return frames

    @property
    def pending(self):
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)

    @property
    def unparsed(self):
        """What is held back: after a ProtocolError, the input from the bad frame on."""
        return bytes(self._buffer)


# -- byte channels -----------------------------------------------------------------------------


class Disconnected(Exception):
    """The host went away."""


def _wait_fd(fd, events):
    """Block until ``fd`` is ready for ``events``; the returned mask may also carry HUP/ERR."""
    poller = select.poll()
    poller.register(fd, events)
    while True:
        ready = poller.poll()
        if ready:
            return ready[0][1]


GONE_ERRNOS = (errno.ENOTCONN, errno.ENODEV, errno.EIO)  # what a port or socket says once its peer left


def write_some(write, view):
    """How much ``write(view)`` took (0 if it would block); Disconnected if the peer is gone."""
    try:
        return write(view)
    except BlockingIOError:
        return 0
    except (BrokenPipeError, ConnectionResetError):
        raise Disconnected()
    except OSError as error:
        if error.errno in GONE_ERRNOS:
            raise Disconnected()
        raise


def write_all(fd, data):
    """Write all of ``data`` to a (possibly non-blocking) fd; Disconnected if the peer is gone."""
    view = memoryview(data)
    while view:
        written = write_some(lambda chunk: os.write(fd, chunk), view)
        if written:
            view = view[written:]
            continue
        mask = _wait_fd(fd, select.POLLOUT)
        if not mask & select.POLLOUT and mask & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            raise Disconnected()


# How long a virtio port may show no host before the agent believes its host has left.
#
# The guest learns that the host connected or disconnected from control messages, and those travel
# on another virtqueue than the data and are handled later (in a kernel work item, while data is
# taken in the interrupt). So when one host hangs up and the next connects at once, the next
# host's open can be read while the port still shows the first host's departure (POLLHUP, reads
# of 0, writes that would block), and the port only shows the new host a moment later. Taken at
# its word, that stale departure ended the session the open had just started, and the hello was
# never sent: the open was lost. So a departure only counts once it has lasted this long; a host
# that did leave is replaced by one that starts with its own open, which ends the session anyway.
HOST_GONE_SECONDS = 2.0
HOST_POLL_SECONDS = 0.02  # a virtio port cannot block until a host connects: how often to look


class Channel(object):
    """A connected, non-blocking byte stream to the host: an accepted socket or a virtio port.

    ``reconnects``: a virtio port, which outlives its hosts (one after another), rather than a
    socket, whose end is final. ``_read``, ``_write`` and ``_poll`` are the only calls that touch
    the fd.
    """

    def __init__(self, fd, name, reconnects=False):
        self.fd = fd
        self.name = name
        self.reconnects = reconnects
        self.send_lock = threading.Lock()

    def _read(self, size):
        return os.read(self.fd, size)

    def _write(self, data):
        return os.write(self.fd, data)

    def _poll(self, events, timeout=None):
        """The fd's event mask (HUP/ERR come unasked); 0 if ``timeout`` seconds pass first."""
        poller = select.poll()
        poller.register(self.fd, events)
        while True:
            ready = poller.poll(None if timeout is None else int(timeout * 1000))
            if ready:
                return ready[0][1]
            if timeout is not None:
                return 0

    def send(self, frame, unless=None, patience="grace"):
        """Send whole frames (never interleaved between threads), unless ``unless()`` says not to.

        While a virtio port shows no host, wait for one up to ``patience`` seconds (None: until one
        comes; by default HOST_GONE_SECONDS), then raise Disconnected: the departure may be stale.
        """
        with self.send_lock:
            if unless is None or not unless():
                self._write_all(frame, patience)

    def _write_all(self, data, patience):
        if patience == "grace":
            patience = HOST_GONE_SECONDS
        view = memoryview(data)
        away_since = None
        while view:
            written = write_some(self._write, view)
            if written:
                view = view[written:]
                away_since = None
                continue
            mask = self._poll(select.POLLOUT)
            if mask & select.POLLOUT:
                continue
            if mask & (select.POLLERR | select.POLLNVAL) or not self.reconnects:
                raise Disconnected()
            # no host on the port (POLLHUP): maybe only for a moment
            now = time.monotonic()
            away_since = now if away_since is None else away_since
            if patience is not None and now - away_since >= patience:
                raise Disconnected()
            time.sleep(HOST_POLL_SECONDS)

    def recv(self, size=256 * 1024):
        """Bytes from the host, or b'' while no host is connected (for a socket: for good)."""
        while True:
            try:
                return self._read(size)
            except BlockingIOError:
                self._poll(select.POLLIN)
            except (ConnectionResetError, BrokenPipeError):
                return b""
            except OSError as error:
                if error.errno in GONE_ERRNOS:
                    return b""
                raise

    def wait_for_host(self, timeout=None):
        """True once a host is connected, False if none is within ``timeout`` s (None: no limit).

        A virtio port without a host polls as HUP (and reads as EOF). A socket never gets its
        host back. What a host left unread stays: the Port skips it while it looks for an open.
        """
        if not self.reconnects:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self._poll(select.POLLIN | select.POLLOUT, 0) & select.POLLHUP:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(HOST_POLL_SECONDS)


# -- logging -------------------------------------------------------------------------------------

_log_lock = threading.Lock()


def log(where, message):
    """One line on stderr: in a guest that is the serial console."""
    line = "blahvm-agent[%s]: %s\n" % (where, message)
    with _log_lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


# -- whose job this guest runs ---------------------------------------------------------------------
# Root on the host decides the payload's identity and tells the agent over the control port, whose
# host end only root can reach. Whoever holds an agent port's socket is the job's user, so an exec
# request cannot choose who it runs as: it may only repeat the bound identity (or ask for root where
# the host allowed it). The first bind wins for the guest's life; a later, different one is refused.

CONTROL_PORT = "org.blahvm.control"
CONTROL_REQUESTS = ("bind", "refresh", "mount")  # served on the control port alone


ACCOUNT_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\Z")
HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _optional(message, key, pattern):
    value = message.get(key)
    if value is not None and not (isinstance(value, str) and pattern.match(value)):
        raise RequestError("%s %r is not a plain name" % (key, value))
    return value


class Identity(object):
    """uid, gid and supplementary groups of the job's payload, whether it may ask for root, and
    (optional) the names of its user and group and the guest's hostname."""

    def __init__(self, uid, gid, groups, root, names=(None, None), hostname=None):
        self.uid, self.gid, self.groups, self.root = uid, gid, tuple(sorted(set(groups))), root
        self.user, self.group = names  # of the user and its primary group
        self.hostname = hostname

    @classmethod
    def from_message(cls, message):
        uid = _id(message.get("uid"), "uid")
        gid = _id(message.get("gid"), "gid")
        groups = message.get("groups")
        if uid is None or gid is None:
            raise RequestError("a bind names both uid and gid")
        if not isinstance(groups, list):
            raise RequestError("groups must be a list of integers")
        root = message.get("root", False)
        if not isinstance(root, bool):
            raise RequestError("root must be true or false")
        names = (_optional(message, "user", ACCOUNT_NAME), _optional(message, "group", ACCOUNT_NAME))
        return cls(uid, gid, [_id(g, "groups[]") for g in groups if g is not None] + [gid], root, names,
                   _optional(message, "hostname", HOSTNAME))

    def as_message(self):
        message = {"uid": self.uid, "gid": self.gid, "groups": list(self.groups), "root": self.root}
        for key in ("user", "group", "hostname"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message

    def __eq__(self, other):
        return isinstance(other, Identity) and self.as_message() == other.as_message()

    def __ne__(self, other):
        return not self == other

    def describe(self):
        return "%d:%d%s" % (self.uid, self.gid, " (root allowed)" if self.root else "")


class Binding(object):
    """The identity this guest's payloads run as, set once by root over the control port."""

    def __init__(self):
        self._lock = threading.Lock()
        self._identity = None

    def bind(self, identity):
        """None once ``identity`` is bound (again); the reason if another one already is."""
        with self._lock:
            if self._identity is None:
                self._identity = identity
                settle(identity)
            if self._identity != identity:
                return "this guest is already bound to %s" % self._identity.describe()
            return None

    def get(self):
        with self._lock:
            return self._identity


BINDING = Binding()


def settle(identity):
    """Make the guest the job's: its hostname, and its user and group known by name (so that
    ``id -un`` and getpwuid work) where the image has no entries for their ids."""
    if identity.hostname is not None:
        try:
            socket.sethostname(identity.hostname)
        except OSError as error:
            log("bind", "cannot set the hostname: %s" % error)
    _add_entry("/etc/group", identity.group, identity.gid, "%s:x:%d:\n")
    _add_entry("/etc/passwd", identity.user, identity.uid, "%s:x:%d:" + str(identity.gid) + ":blahvm job:/tmp:/bin/sh\n")


def _add_entry(path, name, number, line):
    """Append ``name``'s line unless the file already has that name or number."""
    if name is None:
        return
    try:
        with open(path) as handle:
            taken = [entry.split(":")[:3] for entry in handle.read().splitlines()]
        if any(fields[0] == name or (len(fields) > 2 and fields[2] == str(number)) for fields in taken):
            return
        with open(path, "a") as handle:
            handle.write(line % (name, number))
    except OSError as error:
        log("bind", "cannot add %s to %s: %s" % (name, path, error))


# The host hands a restored guest its clock and fresh entropy (it would otherwise share both with
# every other guest restored from the same saved state). RNDADDENTROPY credits the bytes to the
# input pool, RNDRESEEDCRNG makes the kernel's generator use them at once.
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
MIN_ENTROPY_BYTES = 32


def refresh(message):
    """Set the clock to the host's ``time`` and mix ``entropy`` (hex) into the kernel's RNG."""
    when = message.get("time")
    if isinstance(when, bool) or not isinstance(when, (int, float)) or not 0 < when < 2 ** 40:
        raise RequestError("time must be seconds since the epoch")
    try:
        entropy = bytes.fromhex(message.get("entropy"))
    except (TypeError, ValueError):
        raise RequestError("entropy must be hex")
    if not MIN_ENTROPY_BYTES <= len(entropy) <= 4096:
        raise RequestError("entropy must be %d to 4096 bytes" % MIN_ENTROPY_BYTES)
    try:
        time.clock_settime(time.CLOCK_REALTIME, float(when))
        with open("/dev/urandom", "wb") as urandom:
            fcntl.ioctl(urandom, RNDADDENTROPY, struct.pack("ii", 8 * len(entropy), len(entropy)) + entropy)
            fcntl.ioctl(urandom, RNDRESEEDCRNG)
    except OSError as error:
        raise RequestError("cannot refresh the guest: %s" % error)


# A guest restored from a saved state gets the job's directory hot-plugged after the restore (a
# virtiofs device cannot be saved), so root on the host asks for the mount that stage two of a boot
# does: the same path rules as blahvm.image.guest_init.check_workdir, the same nosuid,nodev.
SHARE_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,35}\Z")
MAX_WORKDIR_BYTES = 768
MOUNT_OPTIONS = "nosuid,nodev"
MOUNT_WAIT_SECONDS = 30.0  # for the hot-plugged device to be probed (ACPI, then virtio)


def workdir_problem(path):
    """Why the guest cannot mount the job's directory at ``path``, or None (check_workdir's rules)."""
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//") or path == "/" \
            or os.path.normpath(path) != path:
        return "%r is not a normalised absolute path other than /" % (path,)
    if re.search("[\x00-\x1f\x7f]", path):
        return "%r contains control characters" % (path,)
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        return "%r is not valid UTF-8" % (path,)
    if size > MAX_WORKDIR_BYTES:
        return "the path is %d bytes long, more than the %d a guest takes" % (size, MAX_WORKDIR_BYTES)
    return None


def _virtiofs_mounts():
    """(tag, mount point) of every virtiofs mount in this guest."""
    found = []
    try:
        with open("/proc/self/mounts", "rb") as mounts:
            for line in mounts.read().splitlines():
                fields = line.split(b" ")
                if len(fields) > 2 and fields[2] == b"virtiofs":
                    point = re.sub(b"\\\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[1])
                    found.append((fields[0].decode("utf-8", "replace"), point.decode("utf-8", "surrogateescape")))
    except OSError:
        pass
    return found


def mount_share(message, bound):
    """Mount the virtiofs ``tag`` at ``path`` (made if missing), nosuid,nodev, before the bind:
    nothing of the job's has run yet. The same mount again is fine (a re-run prepare)."""
    tag, path = message.get("tag"), message.get("path")
    if not isinstance(tag, str) or not SHARE_TAG.match(tag):
        raise RequestError("tag must be a plain name of at most 36 characters")
    problem = workdir_problem(path)
    if problem is not None:
        raise RequestError(problem)
    done = [point for name, point in _virtiofs_mounts() if name == tag]
    if done:
        if done == [path]:
            return
        raise RequestError("%s is mounted already, at %s" % (tag, done[0]))
    if bound is not None:
        raise RequestError("the job's directory is mounted before the guest is bound, never after")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise RequestError("cannot create %s: %s" % (path, error))
    deadline = time.monotonic() + MOUNT_WAIT_SECONDS
    while True:  # until the hot-plugged device is probed, the tag is unknown (EINVAL)
        process = subprocess.Popen(["mount", "-t", "virtiofs", "-o", MOUNT_OPTIONS, tag, path],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _out, err = process.communicate()
        if process.returncode == 0:
            return
        if time.monotonic() >= deadline:
            raise RequestError("cannot mount %s at %s: %s" % (tag, path, err.decode("utf-8", "replace").strip()[:300]))
        time.sleep(0.05)


def permitted(request, bound):
    """(uid, gid, groups) the request may run as under ``bound``; RequestError if none."""
    if bound is None:
        raise RequestError("this guest has not been told whose job it runs: nothing runs before the host binds it")
    if request.uid is None or request.uid == bound.uid:
        if request.gid not in (None, bound.gid):
            raise RequestError("refusing gid %d: this guest runs its job as gid %d" % (request.gid, bound.gid))
        if request.groups is not None and tuple(sorted(set(request.groups))) != bound.groups:
            raise RequestError("refusing groups %s: this guest's job has groups %s"
                               % (sorted(set(request.groups)), list(bound.groups)))
        return bound.uid, bound.gid, list(bound.groups)
    if request.uid == 0 and bound.root:
        return 0, 0, [0]
    raise RequestError("refusing to run as uid %d: this guest runs the job of uid %d only"
                       % (request.uid, bound.uid))


# -- exec requests -------------------------------------------------------------------------------


class RequestError(Exception):
    """An exec request the agent cannot carry out as given."""


def _text(value, what):
    if not isinstance(value, str):
        raise RequestError("%s must be a string" % what)
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise RequestError("%s contains a NUL byte" % what)
    return raw


def _id(value, what):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 32 - 1:
        raise RequestError("%s must be a non-negative integer" % what)
    return value


class ExecRequest(object):
    """A validated exec request: bytes for argv, env and cwd (non-UTF-8 travels as surrogates)."""

    def __init__(self, message):
        argv = message.get("argv")
        if not isinstance(argv, list) or not argv:
            raise RequestError("argv must be a non-empty list of strings")
        self.argv = [_text(arg, "argv[%d]" % i) for i, arg in enumerate(argv)]
        env = message.get("env")
        if env is None:
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
        if not isinstance(env, dict):
            raise RequestError("env must be an object of strings")
        self.env = {}
        for key, value in env.items():
            raw_key = _text(key, "env name")
            if not raw_key or b"=" in raw_key:
                raise RequestError("env name %r is empty or contains '='" % key)
            self.env[raw_key] = _text(value, "env[%s]" % key)
        cwd = message.get("cwd")
        self.cwd = None if cwd is None else _text(cwd, "cwd")
        # what the request asks to run as; ``permitted`` decides what it runs as
        self.uid = _id(message.get("uid"), "uid")
        self.gid = _id(message.get("gid"), "gid")
        groups = message.get("groups")
        if groups is None:
            self.groups = None
        elif isinstance(groups, list) and None not in groups:
            self.groups = [_id(g, "groups[]") for g in groups]
        else:
            raise RequestError("groups must be a list of integers")
        self.stdin = bool(message.get("stdin", False))
        self.identity = None  # (uid, gid, groups), set once permitted

    def describe(self):
        uid, gid, _ = self.identity
        return "%s as %d:%d" % (self.argv[0].decode("utf-8", "replace"), uid, gid)


def _default_signals():
    """Default dispositions and an empty mask, whatever the agent inherited (a shell cannot trap
    a signal that was ignored when it started)."""
    for signum in range(1, signal.NSIG):
        try:
            signal.signal(signum, signal.SIG_DFL)
        except (OSError, ValueError, RuntimeError):
            pass  # SIGKILL, SIGSTOP, the C library's own
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def _switch_identity(request):
    """The payload's preexec step: default signals, drop to the permitted identity, enter its
    working directory.

    The chdir comes after the switch so the directory is checked with the user's rights.
    A failure is reported on the payload's stderr and ends it with 126, as a shell would.
    """
    uid, gid, groups = request.identity

    def preexec():
        try:
            _default_signals()
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            if request.cwd is not None:
                os.chdir(request.cwd)
        except OSError as error:
            os.write(2, ("blahvm-agent: cannot start the payload: %s\n" % error).encode("utf-8", "replace"))
            os._exit(126)

    return preexec


# -- sessions on a port ----------------------------------------------------------------------------
# A virtio port cannot always tell the agent that its host left: if a new host connects before the
# agent looks, the port just stays connected. So sessions are opened in-band: every host starts with
# an open frame of fixed shape carrying its own nonce, which the hello echoes (so a host never takes
# the answer to an earlier host's open for its own), and an open also ends what the previous host
# left running.

NONCE_LENGTH = 32


def open_frame(nonce):
    """The frame a host starts every connection with; ``nonce`` is 32 lowercase hex digits."""
    if len(nonce) != NONCE_LENGTH or not all(c in "0123456789abcdef" for c in nonce):
        raise ValueError("an open nonce is %d lowercase hex digits" % NONCE_LENGTH)
    return encode_control({"type": "open", "protocol": PROTOCOL_VERSION, "nonce": nonce})


OPEN_PREFIX = open_frame("0" * NONCE_LENGTH)[: -NONCE_LENGTH - 2]
OPEN_SIZE = len(open_frame("0" * NONCE_LENGTH))
LEFTOVER_DRAIN_SECONDS = 2.0  # how long output is still relayed from a finished job's escapees


class Port(object):
    """Serve one connected channel: sessions opened by the host, at most one payload each.

    Outside a session the input is only searched for an open frame (stale or garbled bytes are
    skipped); inside one it is read as frames. This thread never blocks on anything but the
    channel, so signals and the host's departure are always seen.
    """

    def __init__(self, channel, control=False):
        self.channel = channel
        self.control = control  # the control port binds; it runs nothing
        self.where = channel.name
        self.decoder = FrameDecoder()
        self.scanned = b""  # the tail of the input that may begin an open frame
        self.token = None  # the open session, if any
        self.run = None  # its payload, once exec'd

    def serve(self):
        """Serve hosts until the channel's last one has left (a virtio port: forever).

        A host that has left (for HOST_GONE_SECONDS, on a virtio port) ends its session: its
        payload, if any, is killed.
        """
        try:
            while True:
                data = self.channel.recv()
                if data:
                    self._receive(data)
                    continue
                if self.channel.wait_for_host(HOST_GONE_SECONDS):
                    continue  # it was only a moment: the session goes on
                self._host_left()
                if not self.channel.wait_for_host(None):
                    return
                log(self.where, "host connected")
        except Disconnected:
            pass  # a socket's host is gone (a virtio port's sends never give up for good)
        finally:
            self._end_session("host disconnected")

    def _host_left(self):
        """The host is gone for good: end its session, and drop its unfinished frame, if any."""
        leftover = self.decoder.unparsed[1:] if self.token is not None and self.decoder.pending else b""
        self._end_session("host disconnected")
        log(self.where, "host disconnected")
        if leftover:
            # what came after the start of a frame its host never finished may be the next
            # host's open: look for one there
            self.scanned = b""
            self._receive(leftover)

    def _receive(self, data):
        while data:
            if self.token is None:
                data = self._scan_for_open(data)
                continue
            try:
                frames = self.decoder.feed(data)
            except ProtocolError as error:
                data = self.decoder.unparsed[1:]
                self._protocol_error(error)
                continue
            data = b""
            for kind, payload in frames:
                if self.token is None:
                    break  # the session ended on a frame of this batch
                try:
                    self._dispatch(kind, payload)
                except ProtocolError as error:
                    self._protocol_error(error)

    def _scan_for_open(self, data):
        """The input after an open frame, having opened the session; b'' if there is none yet."""
        buffer = self.scanned + data
        while True:
            at = buffer.find(OPEN_PREFIX)
            if at < 0:
                self.scanned = buffer[-(len(OPEN_PREFIX) - 1) :]
                return b""
            if len(buffer) - at < OPEN_SIZE:
                self.scanned = buffer[at:]
                return b""
            try:
                ((_, message),) = FrameDecoder().feed(buffer[at : at + OPEN_SIZE])
                nonce = message["nonce"]
                open_frame(nonce)
            except (ProtocolError, ValueError, KeyError, TypeError):
                buffer = buffer[at + 1 :]  # not a real open after all: look further
                continue
            self.scanned = b""
            self.decoder = FrameDecoder()
            self._open(nonce)
            return buffer[at + OPEN_SIZE :]

    def _open(self, nonce):
        self._end_session("a new host opened the port")
        self.token = uuid.uuid4().hex
        self._send(
            encode_control(
                {
                    "type": "hello",
                    "protocol": PROTOCOL_VERSION,
                    "version": AGENT_VERSION,
                    "hostname": socket.gethostname(),
                    "port": self.where,
                    "session": self.token,
                    "nonce": nonce,
                }
            )
        )

    def _send(self, frame):
        """Answer the host (hello, error): on a virtio port, wait for a host as long as it takes.

        The answer is to bytes a host sent, and that host may not show on the port yet (see
        HOST_GONE_SECONDS); if it has really gone, the next one skips the answer. No payload
        runs meanwhile: this thread starts one only after its answer is sent.
        """
        self.channel.send(frame, patience=None)

    def _end_session(self, reason):
        if self.run is not None:
            self.run.detach(reason)
        self.run = None
        self.token = None

    def _protocol_error(self, error):
        text = "protocol error: %s" % error
        log(self.where, text)
        if self.run is not None:
            self.run.detach("the host's stream is corrupt")
            self.run = None
        try:
            self._send(encode_control({"type": "error", "message": text}))
        except Disconnected:
            pass
        self.token = None

    def _dispatch(self, kind, payload):
        if kind == STDIN:
            if self.run is not None:
                self.run.take_stdin(payload)
            return
        if kind != CONTROL:
            raise ProtocolError("the host sent a %s frame" % KIND_NAMES[kind])
        what = payload["type"]
        if what == "open":
            # a new host: the previous one left without the port showing it
            self._open(payload.get("nonce") if isinstance(payload.get("nonce"), str) else "")
        elif what in ("exec",) + CONTROL_REQUESTS and payload.get("session") != self.token:
            log(self.where, "ignoring a %s request of an earlier session" % what)
        elif what in CONTROL_REQUESTS or (what == "exec" and self.control):
            self._control(payload)
        elif what == "exec":
            if self.run is not None:
                raise ProtocolError("one exec per session")
            self._exec(payload)
        elif what == "signal":
            signum = payload.get("signal")
            if self.run is not None and isinstance(signum, int) and not isinstance(signum, bool):
                if 0 < signum < 65:
                    log(self.where, "forwarding signal %d" % signum)
                    self.run.signal_group(signum)
        else:
            log(self.where, "ignoring a %r message" % what)

    def _control(self, message):
        """bind, refresh or mount on the control port; anything else there, or any of them
        elsewhere, is refused."""
        what = message["type"]
        try:
            if not self.control or what not in CONTROL_REQUESTS:
                raise RequestError("%s requests are not served on %s" % (what, self.where))
            if what == "refresh":
                refresh(message)
                answer = {"type": "refreshed", "time": time.time()}
            elif what == "mount":
                mount_share(message, BINDING.get())
                answer = {"type": "mounted", "tag": message["tag"], "path": message["path"]}
            else:
                identity = Identity.from_message(message)
                problem = BINDING.bind(identity)
                if problem is not None:
                    raise RequestError(problem)
                answer = dict(identity.as_message(), type="bound")
        except RequestError as error:
            text = "bad %s request: %s" % (what, error)
            log(self.where, text)
            self._send(encode_control({"type": "error", "message": text}))
            return
        done = {"bind": lambda: identity.describe(), "refresh": lambda: "clock and entropy",
                "mount": lambda: "%s at %s" % (message["tag"], message["path"])}[what]()
        log(self.where, "%s: %s" % (answer["type"], done))
        self._send(encode_control(answer))

    def _exec(self, message):
        try:
            request = ExecRequest(message)
            request.identity = permitted(request, BINDING.get())
        except RequestError as error:
            text = "bad exec request: %s" % error
            log(self.where, text)
            self._send(encode_control({"type": "error", "message": text}))
            return
        self.run = Run(self.channel, request)
        self.run.start()


class Run(object):
    """One payload: its process group, stdin feed, and output relay.

    Its own threads relay output and feed stdin. Once detached (its host is gone) it sends
    nothing more on the channel, so nothing of it can reach the next host.
    """

    def __init__(self, channel, request):
        self.channel = channel
        self.where = channel.name
        self.request = request
        self.process = None
        self.detached = False
        self._group_lock = threading.Lock()
        self._reaped = False
        self._stdin_queue = queue.Queue()
        self._credit_lock = threading.Lock()
        self._stdin_credit = STDIN_WINDOW  # bounds what the host can make us buffer

    def _send(self, frame):
        """Send unless detached; a host gone is not our error to raise."""
        try:
            self.channel.send(frame, unless=lambda: self.detached)
        except Disconnected:
            pass

    def start(self):
        request = self.request
        try:
            self.process = subprocess.Popen(
                request.argv,
                env=request.env,
                stdin=subprocess.PIPE if request.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own session and process group, to signal and kill
                preexec_fn=_switch_identity(request),
            )
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            self._report_start_failure(error)
            return
        log(self.where, "started pid %d: %s" % (self.process.pid, request.describe()))
        self._send(encode_control({"type": "started", "pid": self.process.pid, "window": STDIN_WINDOW}))
        threads = [self._relay]
        if request.stdin:
            threads.append(self._feed_stdin)
        for target in threads:
            thread = threading.Thread(target=target, name="%s-%s" % (target.__name__, self.where))
            thread.daemon = True
            thread.start()

    def _report_start_failure(self, error):
        self._reaped = True
        code = 127 if isinstance(error, FileNotFoundError) else 126
        reason = getattr(error, "strerror", None) or str(error)
        text = "cannot run %r: %s" % (self.request.argv[0].decode("utf-8", "replace"), reason)
        log(self.where, text)
        self._send(encode_data(STDERR, ("blahvm-agent: %s\n" % text).encode("utf-8")))
        self._send(encode_control({"type": "exit", "code": code, "error": text}))

    def detach(self, reason):
        """The host is gone: send nothing more, and kill the payload if it still runs."""
        with self.channel.send_lock:
            self.detached = True
        if not self._reaped:
            log(self.where, "%s: killing the payload's process group" % reason)
            self.signal_group(signal.SIGKILL)
        self._stdin_queue.put(None)

    def signal_group(self, signum):
        """Signal the payload's process group, unless it is reaped (its id could be reused)."""
        with self._group_lock:
            if self._reaped or self.process is None:
                return
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def take_stdin(self, data):
        with self._credit_lock:
            self._stdin_credit -= len(data)
            if self._stdin_credit < 0:
                raise ProtocolError("the host sent stdin beyond its window")
        if self.process is not None and self.request.stdin and not self.detached:
            self._stdin_queue.put(data if data else None)

    def _feed_stdin(self):
        stdin = self.process.stdin
        broken = False
        while True:
            chunk = self._stdin_queue.get()
            if chunk is None:
                break
            if not broken:
                try:
                    write_all(stdin.fileno(), chunk)
                except (Disconnected, OSError):
                    broken = True  # the payload closed its stdin: the rest is discarded
            with self._credit_lock:
                self._stdin_credit += len(chunk)
            self._send(encode_control({"type": "window", "bytes": len(chunk)}))
        try:
            stdin.close()
        except OSError:
            pass

    def _relay(self):
        status = self._relay_output()
        log(self.where, "pid %d ended: %s" % (self.process.pid, status))
        message = {"type": "exit"}
        message.update(status)
        self._send(encode_control(message))

    def _relay_output(self):
        """Send stdout and stderr as they come until both end; kill leftovers; reap; the status."""
        streams = {self.process.stdout.fileno(): STDOUT, self.process.stderr.fileno(): STDERR}
        for fd in streams:
            os.set_blocking(fd, False)
        leader_done_at = None
        while streams:
            readable, _, _ = select.select(list(streams), [], [], 0.1)
            for fd in readable:
                try:
                    data = os.read(fd, DATA_CHUNK)
                except BlockingIOError:
                    continue
                if not data:
                    del streams[fd]
                    continue
                self._send(encode_data(streams[fd], data))
            if leader_done_at is None and self._leader_exited():
                # the job is over when its leader is: what it left in its group goes too
                leader_done_at = time.monotonic()
                self.signal_group(signal.SIGKILL)
            elif leader_done_at is not None and not readable:
                if time.monotonic() - leader_done_at > LEFTOVER_DRAIN_SECONDS:
                    break  # something outside the group keeps the pipes open: stop waiting
        if leader_done_at is None:
            self._wait_leader()
            self.signal_group(signal.SIGKILL)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()
        with self._group_lock:
            self._reaped = True
            returncode = self.process.wait()
        if returncode < 0:
            return {"signal": -returncode}
        return {"code": returncode}

    def _leader_exited(self):
        """Has the payload's first process ended? Asked without reaping it, so its id stays ours."""
        try:
            result = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return result is not None and result.si_pid != 0

    def _wait_leader(self):
        try:
            os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass


# -- where host connections come from ------------------------------------------------------------

def serve_device(path, name):
    """Serve a virtio(-like) character device forever, one host connection after another."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    log(name, "serving %s" % path)
    channel = Channel(fd, name, reconnects=True)
    channel.wait_for_host(None)
    log(name, "host connected")
    Port(channel, control=(name == CONTROL_PORT)).serve()


def serve_listen(path, control=False):
    """Serve a UNIX socket (mode 0600), one connection at a time, like a virtio port."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        server.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    server.listen(1)
    log(path, "listening")
    while True:
        connection, _ = server.accept()
        connection.setblocking(False)
        try:
            Port(Channel(connection.fileno(), path), control=control).serve()
        finally:
            connection.close()


def serve_control_listen(path):
    serve_listen(path, control=True)


VIRTIO_PORTS = "/sys/class/virtio-ports"


def find_ports(patterns, sysfs=VIRTIO_PORTS):
    """{port name: device path} of the virtio ports whose name matches one of ``patterns``."""
    found = {}
    try:
        entries = os.listdir(sysfs)
    except OSError:
        return found
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "name")) as handle:
                name = handle.read().strip()
        except OSError:
            continue
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            found[name] = _device_node(entry, sysfs)
    return found


def _device_node(entry, sysfs):
    """/dev/vportNpM, created from sysfs's major:minor when no devtmpfs made it."""
    path = os.path.join("/dev", entry)
    if not os.path.exists(path):
        try:
            with open(os.path.join(sysfs, entry, "dev")) as handle:
                major, minor = handle.read().strip().split(":")
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(int(major), int(minor)))
        except (OSError, ValueError) as error:
            log(entry, "cannot create %s: %s" % (path, error))
    return path


def watch_ports(patterns):
    """Serve every virtio port matching ``patterns``, including ports that appear later."""
    log("ports", "waiting for virtio ports named %s" % " or ".join(patterns))
    served = set()
    while True:
        for name, path in sorted(find_ports(patterns).items()):
            if name not in served:
                served.add(name)
                _start(serve_device, path, name)
        time.sleep(0.5)


def _start(target, *args):
    def guarded():
        try:
            target(*args)
        except Exception as error:  # a port that fails must not take the others down
            log(args[-1], "stopped: %s: %s" % (type(error).__name__, error))

    thread = threading.Thread(target=guarded, name="serve-%s" % (args[-1],))
    thread.daemon = True
    thread.start()
    return thread


def main(argv=None):
    parser = argparse.ArgumentParser(prog="agent.py", description="blahvm guest agent")
    parser.add_argument("--port", action="append", default=[], metavar="NAME",
                        help="virtio-serial port name or glob (org.blahvm.agent.*); repeatable")
    parser.add_argument("--device", action="append", default=[], metavar="PATH",
                        help="character device to serve; repeatable")
    parser.add_argument("--listen", action="append", default=[], metavar="PATH",
                        help="UNIX socket to serve (development, tests); repeatable")
    parser.add_argument("--control-listen", action="append", default=[], metavar="PATH",
                        help="UNIX socket to serve as the control port (development, tests); repeatable")
    parser.add_argument("--version", action="version", version="blahvm-agent %s" % AGENT_VERSION)
    options = parser.parse_args(argv)
    if not (options.port or options.device or options.listen):
        parser.error("give at least one --port, --device or --listen")
    threads = []
    for path in options.listen:
        threads.append(_start(serve_listen, path))
    for path in options.control_listen:
        threads.append(_start(serve_control_listen, path))
    for path in options.device:
        threads.append(_start(serve_device, path, path))
    if options.port:  # the control port is served whatever the patterns say
        threads.append(_start(watch_ports, options.port + [CONTROL_PORT]))
    try:
        while any(thread.is_alive() for thread in threads):
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    return 1


if __name__ == "__main__":
    sys.exit(main())
