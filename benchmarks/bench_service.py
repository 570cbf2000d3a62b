"""The service over ZeroMQ on loopback: its own overhead, and whole lines for many NPCs at once.

1. Overhead, model excluded: the service runs with tests/fakes.py's `ScriptedEngine`, which hands
   every active request its next token from a fixed script without any model, so what is timed is
   sockets, msgpack, validation, persona prompt building and tokenization, scheduling and
   detokenization. Sequential round trips: `ping` -> `pong`, and a 1-token `say` -> `done`.
2. End to end with the real engine: N concurrent `say` requests (N in --concurrency), each from its
   own DEALER socket, to the shipped personas in turn, fresh sessions. Per request the client
   measures the time to its first `token` message (TTFT, the first text a game can show; for a
   persona with banned topics the guard holds back a few characters) and to `done` (line time);
   the service's own TTFT (first generated token) is reported too. tokens/s = all tokens of a
   round / the round's wall time. One warm-up round per N, then --rounds rounds.

The service runs in a child process, so client and service do not share a GIL.

    python benchmarks/bench_service.py --device cpu --model models/npc-target
    python benchmarks/bench_service.py --device cpu --random-shape small   # before a trained model exists
    python benchmarks/bench_service.py --device cuda --model models/npc-target --max-batch 64
"""
import argparse
import json
import multiprocessing
import signal
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import SHAPES, header  # noqa: E402
from bridge import protocol  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PLAYER_LINE = "What news from the north road?"


def serve(model: str, draft: str, device: str, max_batch: int, scripted: bool, conn) -> None:
    """Child process: run the service until SIGTERM; send its endpoint through `conn`."""
    from npc_engine.engine import Engine
    from npc_engine.persona import PersonaStore
    from npc_engine.service import Service, ServiceConfig
    from npc_engine.tokenizer import Tokenizer
    from tests.fakes import ScriptedEngine

    if scripted:
        engine = ScriptedEngine(Tokenizer.from_dir(model), max_batch=max_batch, max_seq=1024)
    else:
        engine = Engine.load(model, draft, device, max_batch=max_batch)
    service = Service(engine, PersonaStore(REPO / "personas"), ServiceConfig(bind="tcp://127.0.0.1:*"))
    conn.send(service.bind())
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    service.run()


class ServiceProcess:
    def __init__(self, model, draft, device, max_batch, scripted):
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(str(model), draft, device, max_batch, scripted, child))
        self.proc.start()
        if not parent.poll(600):
            raise RuntimeError("the service did not start")
        self.endpoint = parent.recv()

    def close(self):
        self.proc.terminate()
        self.proc.join(30)


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def recv(sock: zmq.Socket) -> dict:
    return msgpack.unpackb(sock.recv_multipart()[1], raw=False)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def overhead(endpoint: str, npc: str, requests: int) -> dict:
    sock = dealer(endpoint)
    recv_after = lambda msg: (sock.send_multipart(protocol.encode(msg)), recv(sock))[1]  # noqa: E731
    recv_after({"type": "ping", "id": "warm"})
    ping, say = [], []
    for i in range(requests):
        t0 = time.perf_counter()
        recv_after({"type": "ping", "id": str(i)})
        ping.append(time.perf_counter() - t0)
    for i in range(requests):
        t0 = time.perf_counter()
        sock.send_multipart(protocol.encode({"type": "say", "id": str(i), "npc": npc, "session": f"o{i}",
                                             "text": PLAYER_LINE, "max_tokens": 1}))
        while recv(sock)["type"] != "done":
            pass
        say.append(time.perf_counter() - t0)
    sock.close()
    us = lambda xs, q: percentile(xs, q) * 1e6  # noqa: E731
    return {"ping_p50_us": us(ping, 50), "ping_p99_us": us(ping, 99), "say_p50_us": us(say, 50),
            "say_p99_us": us(say, 99), "requests": requests}


def round_of(endpoint: str, npcs: list[str], n: int, tag: str, max_tokens: int) -> dict:
    socks = [dealer(endpoint) for _ in range(n)]
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    time.sleep(0.2)  # let every socket finish connecting before the clock starts
    sent, first, done = {}, {}, {}
    start = time.perf_counter()
    for i, sock in enumerate(socks):
        sent[i] = time.perf_counter()
        sock.send_multipart(protocol.encode({"type": "say", "id": str(i), "npc": npcs[i % len(npcs)],
                                             "session": f"{tag}-{i}", "text": PLAYER_LINE, "max_tokens": max_tokens}))
    index = {sock: i for i, sock in enumerate(socks)}
    while len(done) < n:
        for sock, _ in poller.poll(60_000):
            msg = recv(sock)
            now, i = time.perf_counter(), index[sock]
            if msg["type"] == "token":
                first.setdefault(i, now)
            elif msg["type"] == "done":
                done[i] = (now, msg)
            else:
                raise RuntimeError(f"request failed: {msg}")
    wall = time.perf_counter() - start
    for sock in socks:
        sock.close()
    return {"ttft": [first.get(i, done[i][0]) - sent[i] for i in range(n)],
            "line": [done[i][0] - sent[i] for i in range(n)],
            "service_ttft": [done[i][1]["stats"]["ttft_ms"] / 1e3 for i in range(n) if done[i][1]["stats"]["ttft_ms"]],
            "tokens": sum(d[1]["tokens"] for d in done.values()), "lines": n, "wall": wall}


def end_to_end(endpoint: str, n: int, rounds: int, max_tokens: int) -> dict:
    npcs = sorted(p.stem for p in (REPO / "personas").glob("*.toml"))
    round_of(endpoint, npcs, n, f"warm{n}", max_tokens)
    runs = [round_of(endpoint, npcs, n, f"n{n}r{r}", max_tokens) for r in range(rounds)]
    merged = {k: sum((run[k] for run in runs), []) for k in ("ttft", "line", "service_ttft")}
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall"] for r in runs)
    ms = lambda k, q: percentile(merged[k], q) * 1e3 if merged[k] else float("nan")  # noqa: E731
    return {"concurrency": n, "ttft_p50_ms": ms("ttft", 50), "ttft_p99_ms": ms("ttft", 99),
            "service_ttft_p50_ms": ms("service_ttft", 50), "line_p50_ms": ms("line", 50), "line_p99_ms": ms("line", 99),
            "tokens_per_line": tokens / sum(r["lines"] for r in runs), "tokens_per_s": tokens / wall}


def random_checkpoint(shape: str, out: Path) -> Path:
    """Random weights of a benchmark shape with a byte-level BPE tokenizer trained on the persona files."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    from npc_engine.model import ModelArgs
    from npc_engine.prompt import EOT, SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.read_text() for p in (REPO / "personas").glob("*.toml")], trainer)
    args = ModelArgs(**{**SHAPES[shape], "vocab_size": tok.get_vocab_size()})
    config = LlamaConfig(**{**args.to_hf_config(), "eos_token_id": tok.token_to_id(EOT)})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/npc-target", help="model folder served")
    ap.add_argument("--random-shape", choices=sorted(SHAPES),
                    help="serve random weights of this shape instead of --model")
    ap.add_argument("--draft", default="auto",
                    help="draft model folder, feature-head folder, 'ngram', 'none' or 'auto'")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-batch", type=int, default=16, help="engine slots (requests generated together)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--overhead-requests", type=int, default=2000)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = random_checkpoint(args.random_shape, Path(tmp)) if args.random_shape else Path(args.model)
        described = f"random '{args.random_shape}' weights" if args.random_shape else str(model)
        print(header(args.device), f"| model {described}, draft {args.draft}, max_batch {args.max_batch}", flush=True)

        stub = ServiceProcess(model, args.draft, args.device, args.max_batch, scripted=True)
        try:
            cost = overhead(stub.endpoint, "blacksmith", args.overhead_requests)
        finally:
            stub.close()
        print(f"\n## Service overhead, model excluded (scripted engine), {cost['requests']} sequential round trips")
        print("| round trip | p50 µs | p99 µs |\n|---|---|---|")
        print(f"| ping → pong | {cost['ping_p50_us']:.0f} | {cost['ping_p99_us']:.0f} |")
        print(f"| say (1 token) → done | {cost['say_p50_us']:.0f} | {cost['say_p99_us']:.0f} |", flush=True)

        print(f"\n## End to end, up to {args.max_tokens} tokens a line, {args.rounds} rounds after a warm-up")
        print("| concurrent | TTFT p50 ms | TTFT p99 ms | service TTFT p50 ms | line p50 ms | line p99 ms "
              "| tokens/line | tokens/s |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        real = ServiceProcess(model, args.draft, args.device, args.max_batch, scripted=False)
        rows = []
        try:
            for n in (int(n) for n in args.concurrency.split(",")):
                r = end_to_end(real.endpoint, n, args.rounds, args.max_tokens)
                rows.append(r)
                print(f"| {n} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | {r['service_ttft_p50_ms']:.1f} | "
                      f"{r['line_p50_ms']:.0f} | {r['line_p99_ms']:.0f} | {r['tokens_per_line']:.1f} | "
                      f"{r['tokens_per_s']:.1f} |", flush=True)
        finally:
            real.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"overhead": cost, "end_to_end": rows}, indent=2))


if __name__ == "__main__":
    main()
