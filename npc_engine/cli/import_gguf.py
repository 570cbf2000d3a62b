"""`npc-engine import-gguf`: convert a llama.cpp GGUF file into a Hugging Face layout model folder."""
import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("import-gguf", help="convert a GGUF model file into a model folder",
                       description="Convert a GGUF file (architectures llama and qwen2; F32, F16, BF16, Q8_0, Q4_0, "
                                   "Q4_1, Q5_0, Q5_1 and Q2_K-Q6_K tensors, stored dequantized) into a Hugging Face "
                                   "layout folder. `--model FILE.gguf` on any command does this once by itself, "
                                   "into the user cache.")
    p.add_argument("gguf", type=Path, help="the .gguf file")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from npc_engine.gguf_import import import_gguf

    out = import_gguf(args.gguf, args.output)
    print(f"wrote {out}")
    return 0
