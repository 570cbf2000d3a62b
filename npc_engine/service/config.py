"""The service's settings and the check that it may bind where it is asked to."""
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from bridge import protocol


class ServiceError(Exception):
    """The service cannot start as configured."""


@dataclass
class ServiceConfig:
    bind: str = protocol.DEFAULT_ADDR
    limits: protocol.Limits = field(default_factory=protocol.Limits)
    max_calls: int = 4096  # unfinished `say` requests over all clients
    frame_max_bytes: int = 1 << 20  # ZMQ_MAXMSGSIZE, per frame: ZeroMQ closes a connection that sends a bigger one
    max_unread_bytes: int = 64 << 20  # received on one connection and not yet read by the service: over it, closed
    send_hwm: int = 10_000  # messages queued for one client before it counts as not reading and is dropped
    recv_hwm: int = 1000  # complete messages queued from one client before ZeroMQ stops reading its connection
    max_connections: int = 128
    heartbeat_ms: int = 1000  # ZMTP heartbeat: a peer silent for heartbeat_timeout_ms is disconnected
    heartbeat_timeout_ms: int = 3000
    history_turns: int = 64  # per conversation (npc_engine.conversation.StateLimits)
    history_bytes: int = 16 << 10  # UTF-8 bytes of a conversation's turns
    history_total_bytes: int = 64 << 20  # over all conversations, memories included
    max_sessions: int = 10_000  # conversations kept; the least recently written leave first
    state_dir: str | None = None  # `serve --state`: conversations kept in SQLite there, else in memory only
    reload_interval_s: float = 0.5
    max_reads_per_step: int = 256
    max_prefill_tokens: int = 512  # prompt tokens admitted into the engine per step (at least one request)
    shutdown_grace_s: float = 0.5  # after SIGTERM, messages are still read (and says refused) this long
    curve_secret_file: str | None = None  # zmq.auth certificate with the service's secret key
    curve_clients_dir: str | None = None  # public certificates of the clients allowed in


def is_local_endpoint(addr: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address."""
    if addr.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+|\*)", addr)
    if not m:
        return False
    host = m.group(1).strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or "*": may face the network


def check_bind(config: ServiceConfig) -> None:
    import zmq

    curve = (config.curve_secret_file, config.curve_clients_dir)
    if (curve[0] is None) != (curve[1] is None):
        raise ServiceError("CURVE needs both a secret key file (--curve-secret) and a client key folder "
                           "(--curve-clients)")
    if curve[0] is None and not is_local_endpoint(config.bind):
        raise ServiceError(f"refusing to bind {config.bind} without CURVE: it is not a loopback address. "
                           "Give --curve-secret and --curve-clients (see bridge/PROTOCOL.md, 'Security').")
    if curve[0] is not None:
        if not zmq.has("curve"):
            raise ServiceError("this libzmq was built without CURVE support")
        if not Path(curve[0]).is_file():
            raise ServiceError(f"CURVE secret key file not found: {curve[0]}")
        if not Path(curve[1]).is_dir():
            raise ServiceError(f"CURVE client key folder not found: {curve[1]}")
