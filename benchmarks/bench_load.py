"""Loading a GGUF model: the one-time conversion and every later start (`--model FILE.gguf`).

Steps, each timed on its own (median of --repeats, every repeat into a fresh cache folder):
  hash     sha256 of the file (the cache key; computed once per process)
  convert  gguf_import.import_gguf: read, dequantize with `gguf`, write the safetensors folder + tokenizer
  load     loading.load_model + Tokenizer.from_dir on the converted folder (float32 on CPU)
  cold     resolve_model + load in a fresh cache: what the first `--model FILE.gguf` start costs
  warm     resolve_model + load once the cache holds the folder: every later start

    python benchmarks/bench_load.py                       # SmolLM2-135M-Instruct Q4_1 (fetched if absent)
    python benchmarks/bench_load.py --gguf some.gguf --repeats 1
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import header  # noqa: E402
from npc_engine import paths  # noqa: E402
from npc_engine.gguf_import import import_gguf  # noqa: E402
from npc_engine.loading import load_model  # noqa: E402
from npc_engine.tokenizer import Tokenizer  # noqa: E402


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def load(folder) -> None:
    load_model(folder, "cpu", "float32")
    Tokenizer.from_dir(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the base model, fetched if absent)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    gguf = args.gguf or paths.fetch_base_model()
    times: dict[str, list[float]] = {k: [] for k in ("hash", "convert", "load", "cold", "warm")}
    size = 0
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["NPC_ENGINE_CACHE"] = str(Path(tmp) / "cache")
            paths._sha256.cache_clear()
            times["hash"].append(timed(paths.file_hash, gguf))
            out = Path(tmp) / "converted"
            times["convert"].append(timed(import_gguf, gguf, out))
            size = sum(f.stat().st_size for f in out.iterdir())
            times["load"].append(timed(load, out))
            paths._sha256.cache_clear()
            times["cold"].append(timed(lambda: load(paths.resolve_model(gguf))))
            paths._sha256.cache_clear()
            times["warm"].append(timed(lambda: load(paths.resolve_model(gguf))))
    print(header("cpu"))
    print(f"{gguf.name}: {gguf.stat().st_size:,} bytes -> converted folder {size:,} bytes; "
          f"median of {args.repeats} (min-max)")
    for step, values in times.items():
        print(f"{step:8s} {statistics.median(values):7.2f} s  ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
