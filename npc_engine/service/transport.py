"""The service's one ROUTER socket: bind (loopback or CURVE), read and send protocol messages, and
keep hostile peers from hurting anyone else.

Routing ids. libzmq 4.3's ROUTER names a peer that sends no routing id of its own `0x00` + a 32-bit
counter (router.cpp, identify_peer: `put_uint32 (buf + 1, _next_integral_routing_id++)`) without
checking that the name is free, and then asserts that it was (socket_base.cpp,
routing_socket_base_t::add_out_pipe: `zmq_assert (ok)`): a peer that picked the next automatic
id itself (ZMQ_ROUTING_ID on its DEALER) makes the next ordinary connection abort the process. The
counter starts at `rand()`, which nothing seeds, so it started at 0x6B8B4567 in every process. The
defence, in three parts:
1. `bind` seeds libc's `rand()` from os.urandom before the socket exists, so the counter's start is
   a secret 32-bit number: an id chosen to collide with a future automatic id is a blind guess, at
   odds of (connections held, at most max_connections) / 2^32 per new connection. libzmq offers no
   hook to refuse a chosen name before it takes its place (the ZAP request carries the server's own
   identity, ZMQ_ROUTER_NOTIFY is a draft API), so this part is a secret, not a check.
2. A peer that names itself (its handshake's `Identity` property is not empty) is never served: its
   first message gets its connection shut down and is dropped. (libzmq cuts that property at the
   first NUL byte, so a name of the automatic form 0x00 + 4 bytes passes as automatic: it is served
   like any client, and could only hurt by matching part 1's secret or part 3's connection.) So no
   running request belongs to a name anyone could guess.
3. A connection's requests are bound to it, not to its routing id alone: when ZeroMQ reports the
   connection closed (socket monitor, by file descriptor; the `disconnected` event is emitted before
   libzmq frees the name), its requests are cancelled without a reply before the next step's replies
   go out; a later peer using the same routing id (which needs guessing it) finds none of them.

Memory. ZMQ_MAXMSGSIZE limits each frame, and libzmq holds a multi-frame message whole until its
last frame arrives (ypipe never flushes an incomplete message), so no read by the service can stop
a message of a million frames from filling memory. A watchdog thread compares, every
WATCH_INTERVAL_S, the bytes the kernel received on each connection (TCP_INFO) with the bytes the
service read from it, and shuts the connection down when more than `max_unread_bytes` are pending;
libzmq then drops the partial message. Queued replies are bounded by ZMQ_SNDHWM per client.
"""
import ctypes
import logging
import os
import socket
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from bridge import protocol
from npc_engine.service.config import ServiceConfig, ServiceError, check_bind

log = logging.getLogger("npc_engine.service")

WATCH_INTERVAL_S = 0.005
FRAME_OVERHEAD = 9  # bytes of a ZMTP frame header at most: what a frame costs on the wire beyond its body
TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info (since 4.1)
DROPPED_MEMORY = 100_000  # dropped routing ids remembered, so none of them is ever sent to again


@dataclass
class Incoming:
    client: bytes  # the routing id the ROUTER assigned to the connection
    frames: list[bytes]  # the frames after the routing id
    user: str  # the CURVE public key (Z85) of the client; "" without CURVE
    read_at: float  # time.monotonic() when the service read it: a say's times count from here (PROTOCOL.md section 6)


@dataclass
class Connection:
    fd: int
    clients: set[bytes] = field(default_factory=set)
    read_bytes: int = 0  # what the service has read from it, with frame headers counted at their largest
    closing: bool = False


def seed_libzmq_rand() -> None:
    try:
        libc = ctypes.CDLL(None)  # the C library libzmq calls rand() from (POSIX)
    except (OSError, TypeError):
        log.warning("cannot seed the C library's rand(): ZeroMQ's automatic routing ids stay predictable")
        return
    libc.srand(ctypes.c_uint(int.from_bytes(os.urandom(4), "little")))


def shut_down_fd(fd: int) -> None:
    """End a TCP (or IPC) connection under libzmq's feet: it sees the peer gone and cleans up. The fd
    stays libzmq's (detach: not closed here)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def tcp_bytes_received(fd: int) -> int | None:
    """Bytes the kernel received on a TCP connection (Linux); None elsewhere."""
    if not hasattr(socket, "TCP_INFO"):
        return None
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None  # not TCP (ipc://): bounded by the local user only
    finally:
        sock.detach()
    return struct.unpack_from("<Q", info, TCPI_BYTES_RECEIVED)[0] if len(info) >= TCPI_BYTES_RECEIVED + 8 else None


class Transport:
    def __init__(self, config: ServiceConfig):
        self.config = config
        self.context = zmq.Context()
        self.socket: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.poller: zmq.Poller | None = None
        self.endpoint: str | None = None
        self.authenticator = None
        self.connections: dict[int, Connection] = {}  # by file descriptor
        self.client_fd: dict[bytes, int] = {}
        self.gone: set[bytes] = set()  # clients whose connection ended or who were dropped; see take_gone
        self.dropped: OrderedDict[bytes, None] = OrderedDict()
        self.refused = 0  # connections shut down: over max_connections, self-named, or too much unread
        self.watchdog: threading.Thread | None = None
        self.watching = threading.Event()

    def bind(self) -> str:
        config = self.config
        check_bind(config)
        seed_libzmq_rand()  # see the module docstring, part 1
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished client raises instead of dropping
        sock.setsockopt(zmq.MAXMSGSIZE, config.frame_max_bytes)
        sock.setsockopt(zmq.SNDHWM, config.send_hwm)
        sock.setsockopt(zmq.RCVHWM, config.recv_hwm)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, config.heartbeat_ms)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, config.heartbeat_timeout_ms)
        if "[" in config.bind:
            sock.setsockopt(zmq.IPV6, 1)
        if config.curve_secret_file:
            from zmq.auth.thread import ThreadAuthenticator

            self.authenticator = ThreadAuthenticator(self.context)
            self.authenticator.start()
            self.authenticator.configure_curve(domain="*", location=config.curve_clients_dir)
            public, secret = zmq.auth.load_certificate(config.curve_secret_file)
            if secret is None:
                sock.close(linger=0)
                raise ServiceError(f"{config.curve_secret_file} holds no secret key")
            sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
        try:
            sock.bind(config.bind)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ServiceError(f"cannot bind {config.bind}: {e}") from None
        self.monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.watching.set()
        self.watchdog = threading.Thread(target=self.watch, name="npc-engine-watchdog", daemon=True)
        self.watchdog.start()
        return self.endpoint

    def close(self) -> None:
        self.watching.clear()
        if self.watchdog is not None:
            self.watchdog.join()
            self.watchdog = None
        if self.socket is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.socket.close()
            self.socket = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None
        self.context.term()

    # ---- connections --------------------------------------------------------------------------

    def check_connections(self) -> None:
        """Take in the socket monitor's news: connections opened (refused over the cap) and closed
        (their clients are gone)."""
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            fd = event["value"]
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.connections[fd] = Connection(fd)
                if len(self.connections) > self.config.max_connections:
                    self.refuse(fd, f"over the limit of {self.config.max_connections} connections")
            elif (conn := self.connections.pop(fd, None)) is not None:
                for client in conn.clients:
                    self.gone.add(client)
                    self.client_fd.pop(client, None)

    def refuse(self, fd: int, why: str) -> None:
        conn = self.connections.get(fd)
        if conn is not None and conn.closing:
            return
        if conn is not None:
            conn.closing = True
        self.refused += 1
        log.warning("closing connection (fd %d): %s", fd, why)
        shut_down_fd(fd)

    def watch(self) -> None:
        """Watchdog thread: shuts down connections with too many bytes received and not yet read."""
        while self.watching.is_set():
            for fd, conn in list(self.connections.items()):
                received = tcp_bytes_received(fd)
                unread = 0 if received is None else received - conn.read_bytes
                if unread > self.config.max_unread_bytes and not conn.closing:
                    self.refuse(fd, f"{unread} bytes sent and not read: over max_unread_bytes")
            time.sleep(WATCH_INTERVAL_S)

    def take_gone(self) -> set[bytes]:
        self.check_connections()
        gone, self.gone = self.gone, set()
        return gone

    # ---- reading and sending ----------------------------------------------------------------------

    def poll(self, timeout_ms: int) -> bool:
        """Wait for a message; a connection opening or closing ends the wait too (the watchdog must know a
        connection while its first message, however long, is still arriving)."""
        ready = dict(self.poller.poll(timeout_ms))
        if self.monitor in ready:
            self.check_connections()
        return self.socket in ready

    def recv(self) -> Incoming | None:
        """The next message from a client the service serves; None when none is waiting."""
        while True:
            try:
                parts = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            client, last = parts[0].bytes, parts[-1]
            fd = last.get(zmq.SRCFD)
            # libzmq reported the connection's `accepted` (and the `disconnected` of an earlier one on the
            # same fd number) before it delivered this message: take those in before naming its connection.
            self.check_connections()
            conn = self.connections.setdefault(fd, Connection(fd))
            conn.read_bytes += sum(len(p) + FRAME_OVERHEAD for p in parts)
            if self.own_name(last):
                self.refuse(fd, f"the client chose its own routing id {client[:16].hex()}")
                continue
            if client in self.dropped or conn.closing:
                continue
            conn.clients.add(client)
            self.client_fd[client] = fd
            return Incoming(client, [p.bytes for p in parts[1:]], self.user_of(last), time.monotonic())

    @staticmethod
    def own_name(frame: zmq.Frame) -> bool:
        try:
            return bool(frame.get("Identity"))
        except UnicodeDecodeError:
            return True  # bytes that are no UTF-8: a name, and a hostile one
        except zmq.ZMQError:
            return False

    def user_of(self, frame: zmq.Frame) -> str:
        if not self.config.curve_secret_file:
            return ""
        try:
            return frame.get("User-Id")
        except zmq.ZMQError:
            return ""

    def send(self, client: bytes, msg: dict) -> None:
        if client in self.dropped:
            return
        try:
            self.socket.send_multipart([client, *protocol.encode(msg)], zmq.NOBLOCK)
        except zmq.Again:
            self.drop(client, f"stopped reading ({self.config.send_hwm} messages queued)")
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            self.gone.add(client)  # disconnected: nobody is left to answer

    def drop(self, client: bytes, why: str) -> None:
        """Never send to `client` again; its requests end (take_gone) and its connection is closed."""
        self.dropped[client] = None
        while len(self.dropped) > DROPPED_MEMORY:
            self.dropped.popitem(last=False)
        self.gone.add(client)
        fd = self.client_fd.get(client)
        log.warning("dropping client %s: %s; its requests are cancelled", client.hex(), why)
        if fd is not None:
            self.refuse(fd, "its client was dropped")
