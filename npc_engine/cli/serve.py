"""`npc-engine serve`: run the ZeroMQ service that game clients talk to."""
import argparse
import ipaddress
import os
import re
import socket

from npc_engine.cli.common import VOICE_HELP, add_model_args, check_device, voice_args
from npc_engine.paths import PERSONAS_DIR

DEFAULT_ADDR = "tcp://127.0.0.1:5555"  # bridge.protocol.DEFAULT_ADDR, without importing msgpack for --help


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the ZeroMQ service that game clients talk to")
    add_model_args(p, None, VOICE_HELP)
    p.add_argument("--personas", default=str(PERSONAS_DIR), help="persona folder, hot-reloaded")
    p.add_argument("--bind", default=DEFAULT_ADDR, help="ZeroMQ endpoint; a port of '*' picks a free one")
    p.add_argument("--max-batch", type=int, default=16, help="requests generated together")
    p.add_argument("--max-prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled per step, persona blocks not yet cached included (a longer prompt "
                        "takes several steps, and admission follows deadlines): bounds how far a step can run past "
                        "a deadline")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="CPU threads for the model (default: all cores but one, so socket I/O never starves)")
    p.add_argument("--state", metavar="DIR", help="keep conversation history and memories in DIR/state.sqlite3 "
                   "across restarts (default: in memory only)")
    p.add_argument("--curve-secret", help="zmq.auth secret certificate of the service (enables CURVE)")
    p.add_argument("--curve-clients", help="folder of the public certificates of allowed clients")
    p.set_defaults(func=run)


def check_port_free(endpoint: str) -> None:
    """Refuse a tcp:// endpoint something already listens on now, not after the model has loaded for seconds."""
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:]+):(\d+)", endpoint)
    if not m:
        return  # ipc://, inproc:// or port '*': the service's own bind reports
    host = "" if m.group(1) == "*" else m.group(1).strip("[]")
    try:
        family = socket.AF_INET6 if host and ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        if host != "localhost":
            return  # an interface name: only ZeroMQ resolves those
        family = socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ: a port in TIME_WAIT counts as free
        try:
            probe.bind((host, int(m.group(2))))
        except OSError as e:
            raise ValueError(f"cannot bind {endpoint}: {e.strerror}. Is another service running there? "
                             "Stop it, or pick another port with --bind (a port of '*' picks a free one)") from None


def run(args: argparse.Namespace) -> int:
    check_device(args.device)
    check_port_free(args.bind)
    import logging
    import signal
    import sys
    import time

    import torch

    from npc_engine.engine import Engine
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig, ServiceError, check_bind

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log = logging.getLogger("npc_engine.service")
    config = ServiceConfig(bind=args.bind, curve_secret_file=args.curve_secret, curve_clients_dir=args.curve_clients,
                           max_prefill_tokens=args.max_prefill_tokens, state_dir=args.state)
    try:
        check_bind(config)
        store = PersonaStore(args.personas)
        torch.set_num_threads(args.threads)
        model, adapter = voice_args(args.model, args.adapter)
        engine = Engine.load(model, args.draft, args.device, args.dtype, max_batch=args.max_batch,
                             backend=args.backend, onnx_provider=args.onnx_provider, adapter=adapter,
                             max_prefill_tokens=args.max_prefill_tokens, compiled=args.compile,
                             draft_tree=args.draft_tree)
        if engine.graphed:
            started = time.perf_counter()
            count = engine.capture_graphs(range(1, args.max_batch + 1))
            log.info("captured %d CUDA graphs in %.1f s", count, time.perf_counter() - started)
        service = Service(engine, store, config)
        endpoint = service.bind()
    except (ServiceError, FileNotFoundError, ValueError, OSError) as e:
        print(f"npc-engine serve: {e}", file=sys.stderr)
        return 2
    for file, message in store.errors.items():
        log.error("persona file %s not loaded: %s", file, message)
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    print(f"ready {endpoint}", flush=True)
    service.run()
    return 0
