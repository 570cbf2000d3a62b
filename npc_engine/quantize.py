"""`--dtype fp8`: every linear layer's weight stored as FP8 (e4m3) with one scale per output channel."""
from torch import nn

from npc_engine.fusion import fold_norms_
from npc_engine.model import Transformer


def quantize_fp8_(model: Transformer) -> Transformer:
    """Swaps each nn.Linear (attention, MLP, lm_head) for kernels.Fp8Linear in place; embeddings and norms stay (the
    decoder layers' norm weights folded into the projections first, as the fused forward wants them)."""
    from kernels.fp8 import Fp8Linear

    fold_norms_(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Fp8Linear.from_linear(child))
    for layer in model.model.layers:  # fused bf16 projections would bypass the FP8 layers
        layer.self_attn.qkv = layer.mlp.gate_up = None
    return model
