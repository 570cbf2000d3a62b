"""Weights rearranged for the fused forward (`Transformer.forward_fused`): each decoder layer's RMSNorm weights
folded into the projections after them, and q/k/v and gate/up as one matrix each. A feature head's layer fuses the
same way (`FeatureHead.fused`)."""
import torch
from torch import nn

from npc_engine.model import Transformer, linear_params


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """A Transformer's decoder layers, or a feature head's one layer."""
    return list(model.model.layers) if isinstance(model, Transformer) else [model.layer]


def fold_norms_(model: nn.Module) -> nn.Module:
    """Multiplies each decoder layer's RMSNorm weight into the columns of the projections it feeds (q, k, v; gate,
    up) and sets it to 1: the same function (up to rounding), and the fused forward normalizes inside the linear
    kernel. A no-op on folded norms. The final norm stays (the output head may be the tied embedding)."""
    from kernels.fp8 import Fp8Linear

    for layer in decoder_layers(model):
        for norm, projections in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
            if bool((norm.weight == 1).all()):
                continue
            if any(isinstance(m, Fp8Linear) for m in projections):
                raise ValueError("fold_norms_: fold the norms before quantizing (quantize_fp8_ does)")
            for m in projections:
                m.weight.data = (m.weight.data.float() * norm.weight.data.float()).to(m.weight.dtype)
            norm.weight.data = torch.ones_like(norm.weight.data)
    return model


def fuse_projections_(model: nn.Module) -> nn.Module:
    """Folds the norms (fold_norms_), then one matrix for q, k, v and one for gate, up (bf16 or FP8 with their
    per-channel scales), so a step reads each in one kernel. The separate layers become views of the fused storage:
    no extra memory, and state_dict() keeps the Hugging Face names (with the folded values: the same function)."""
    from kernels.fp8 import Fp8Linear

    def fuse(layers: list[nn.Module]):
        params = [linear_params(m) for m in layers]
        weight = torch.cat([w.data for w, _, _ in params])
        bias = torch.cat([b.data for _, b, _ in params]) if params[0][1] is not None else None
        scale = torch.cat([s for _, _, s in params]) if params[0][2] is not None else None
        start = 0
        for m in layers:
            n = m.out_features
            if isinstance(m, Fp8Linear):
                m.weight_fp8, m.scale = weight[start:start + n], scale[start:start + n]
            else:
                m.weight.data = weight[start:start + n]
            if bias is not None:
                m.bias.data = bias[start:start + n]
            start += n
        return weight, bias, scale

    fold_norms_(model)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up = fuse([mlp.gate_proj, mlp.up_proj])
    return model
