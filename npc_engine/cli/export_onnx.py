"""`npc-engine export-onnx`: a model folder to ONNX with explicit KV-cache inputs and outputs."""
import argparse

from npc_engine.cli.common import feature_layers


def add_parser(sub) -> None:
    p = sub.add_parser("export-onnx", help="export a model folder to ONNX with explicit KV-cache inputs and outputs")
    p.add_argument("--model", required=True, help="Hugging Face layout model folder or .gguf file (target or draft)")
    p.add_argument("-o", "--output", required=True,
                   help="folder to write model.onnx, manifest.json and the tokenizer to")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter folder: merged into the weights, but "
                   "kept in float beside --weights int4 ones")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, 14..20")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"], help="weight and KV-cache dtype")
    p.add_argument("--weights", default="float", choices=["float", "int8", "int4"],
                   help="weight-only quantization of the matrix weights for the CPU (MatMulNBits; default: none)")
    p.add_argument("--layout", default="portable", choices=["portable", "ort"],
                   help="portable: the decoder-with-past graph of Hugging Face Optimum (any ONNX runtime, e.g. Unity "
                        "Sentis, Unreal NNE); ort: ONNX Runtime's GroupQueryAttention with the cache updated in "
                        "place, the fast CPU path of the engine's onnx backend")
    p.add_argument("--draft-weights", action="store_true",
                   help="with --layout ort: also write the embedding, final norm and output head, unquantized, so a "
                        "feature head can draft for the export (--draft HEAD_DIR)")
    p.add_argument("--feature-layers", type=feature_layers, default=(),
                   help="with --layout ort: the layers whose outputs hidden_states holds side by side, those a "
                        "feature head was trained on (its config.json's feature_layers; default: the last alone)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from npc_engine.onnx_export import cmd_export_onnx

    return cmd_export_onnx(args)
