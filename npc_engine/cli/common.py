"""Options and checks shared by the commands that load a model."""
import argparse
from typing import TYPE_CHECKING

from npc_engine.paths import TINY_MODEL

if TYPE_CHECKING:  # the commands import torch only when they run
    from npc_engine.engine.trees import TreeShape

DEFAULT_MODEL = str(TINY_MODEL)  # of generate and bench; serve, chat and the demo speak with the default voice
MODEL_HELP = "model folder (Hugging Face layout, or made by export-onnx) or a .gguf file (converted once, cached)"
VOICE_HELP = (f"{MODEL_HELP} (default: SmolLM2-135M-Instruct with the persona adapter, once `make model` fetched it; "
              f"else {DEFAULT_MODEL})")


class HelpFormatter(argparse.HelpFormatter):
    """Ends each option's help with its default, unless there is none or the help already explains it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if not action.option_strings or default is None or default is False or default == argparse.SUPPRESS \
                or default in ([], {}) or "default" in text:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help, and its subcommands' help, shows defaults."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


DTYPE_HELP = ("float32, float16, bfloat16 (default: bfloat16 on cuda, float32 on cpu); fp8: e4m3 target weights "
              "(cuda); int8 or int4: the target's decoder weights packed (cpu, 4-bit in groups of 32 like GGUF Q4_1, "
              "an adapter kept beside them)")

def add_model_args(p: argparse.ArgumentParser, model_default: str | None = DEFAULT_MODEL,
                   model_help: str = MODEL_HELP) -> None:
    p.add_argument("--model", default=model_default, help=model_help)
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder in PEFT's format (adapter_config.json + adapter_model.safetensors), "
                        "merged into the model's weights at load")
    p.add_argument("--draft", default="auto",
                   help="draft model folder, feature-head folder, 'ngram', 'none' or 'auto' (default: auto, the "
                        "model's shipped drafter)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    p.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                   help="torch, onnx (model folders made by export-onnx) or auto (default: onnx when --model holds "
                        "an export)")
    p.add_argument("--onnx-provider", default=None, choices=["cpu", "cuda", "auto"],
                   help="ONNX Runtime provider (default: --device; auto: CUDA when usable, else CPU)")
    p.add_argument("--compile", action="store_true",
                   help="CPU: torch.compile each decoder layer (faster steps; about 10 s of compiling on the first "
                        "requests; needs a C++ compiler)")
    p.add_argument("--draft-tree", default=None, type=parse_draft_tree, metavar="WIDTH,NODES",
                   help="with a feature-head --draft: greedy steps verify a draft tree, each level expanding its "
                        "WIDTH best nodes, NODES verified (e.g. 4,16; CPU: with --dtype bfloat16, where verifying 16 "
                        "rows costs what 1 does)")


def parse_draft_tree(text: str) -> "TreeShape":
    from npc_engine.engine.trees import TreeShape

    try:
        return TreeShape.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def voice_args(model: str | None, adapter: str | None) -> tuple[str, str | None]:
    """(model, adapter) from --model/--adapter; without --model, the default voice (paths.default_voice)."""
    if model is not None:
        return model, adapter
    from npc_engine.paths import default_voice

    base, default_adapter = default_voice()
    return str(base), adapter or (default_adapter and str(default_adapter))


def parse_k(value: str) -> int | None:
    if value == "auto":
        return None
    k = int(value)
    if not 0 <= k <= 16:
        raise argparse.ArgumentTypeError("--k must be 0..16 or 'auto'")
    return k


def check_device(device: str) -> None:
    """Raise a one-line ValueError for `--device cuda` where torch cannot use CUDA."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"--device cuda: {reason} (torch {torch.__version__}); use --device cpu")


def feature_layers(text: str) -> tuple[int, ...]:
    """--feature-layers: comma-separated target layer indices, or "last" (the last layer's output alone: ())."""
    if text.strip() == "last":
        return ()
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 5,12,20,29, or last; "
                                         f"got {text!r}") from None
