"""Target weights stored in fewer bits. `--dtype fp8`: every linear layer's weight as FP8 (e4m3) with one scale per
output channel (CUDA kernels). `--dtype int8` / `int4`: weight-only integer weights for the CPU, through PyTorch's own
packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`: the ones torchao's CPU layouts call); a decode
step on the CPU is memory-bound, and these read a quarter / an eighth of float32's bytes. The kernels take their
activations in bfloat16 (with float32 ones they fall back to a path 3-10x slower than float32 itself, measured on
AVX-512), so a quantized layer rounds its input to bfloat16, as llama.cpp rounds activations to 8 bits for its Q4_1
dot products, and returns float32."""
import torch
from torch import nn

from npc_engine.fusion import fold_norms_
from npc_engine.model import Transformer

INT4_GROUP = 32  # GGUF Q4_1's block: a Q4_1 weight without an adapter is stored again exactly
WEIGHT_BITS = ("int8", "int4")
ACTIVATIONS = torch.bfloat16


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


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W as int8, one symmetric scale per output channel."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        w = layer.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(ACTIVATIONS))
        self.bias = layer.bias
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(ACTIVATIONS), self.weight_int8, self.scales)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x Wᵀ + b with W as 4-bit codes q in groups of `group` along the input: w = (q - 8)·scale + zero, where a
    group's scale and zero come from its min and max (GGUF Q4_1's scheme, with zero = min + 8·scale)."""

    def __init__(self, layer: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        n, k = layer.out_features, layer.in_features
        w = layer.weight.detach().float().view(n, k // group, group)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = ((w - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        # [k / group, n, 2]: the kernel's layout of (scale, zero)
        zeros = low + 8 * scales
        self.register_buffer("scales_and_zeros",
                             torch.stack([scales.T, zeros.T], dim=-1).contiguous().to(ACTIVATIONS))
        self.bias = layer.bias
        self.group, self.in_features, self.out_features = group, k, n

    @staticmethod
    def fits(layer: nn.Linear, group: int = INT4_GROUP) -> bool:
        """The kernel wants whole groups along the input and output rows in multiples of 16."""
        return layer.in_features % group == 0 and layer.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(ACTIVATIONS), self.weight_int4,
                                              self.group, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_weights_(model: Transformer, bits: str) -> Transformer:
    """Swaps each nn.Linear for an Int8Linear or Int4Linear in place (CPU only; a layer the int4 kernel cannot take gets
    int8). Embeddings and norms stay float. A feature head's reduced vocabulary reads float rows of the output head
    (FeatureHead.draft_rows): a tied head has them in the embedding, an untied one stays float."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits {bits!r}: choose one of {', '.join(WEIGHT_BITS)}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError(f"--dtype {bits} is for the CPU (PyTorch's packed CPU kernels); on a GPU use fp8")
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if child is model.lm_head and not model.args.tie_word_embeddings:
                continue
            if type(child) is nn.Linear:
                use_int4 = bits == "int4" and Int4Linear.fits(child)
                setattr(module, name, Int4Linear(child) if use_int4 else Int8Linear(child))
    return model
