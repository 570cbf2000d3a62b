"""Target weights stored in fewer bits. `--dtype fp8`: every linear layer's weight as FP8 (e4m3) with one scale per
output channel (CUDA kernels). `--dtype int8` / `int4`: weight-only integer weights for the CPU, through PyTorch's own
packed kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`: the ones torchao's CPU layouts call); a decode
step on the CPU is memory-bound, and these read about a quarter / a sixth of float32's bytes (scales included). The
kernels take their activations in bfloat16 (with float32 ones they fall back to a path 6x (int8) to 18x (int4)
slower than float32 itself, measured on one AVX-512 CPU), so a quantized layer rounds its input to bfloat16, as
llama.cpp rounds activations to 8 bits for its Q4_1 dot products, and returns float32."""
import torch
import torch.nn.functional as F
from torch import nn

from npc_engine.fusion import fold_norms_
from npc_engine.model import Linear, Transformer

INT4_GROUP = 32  # GGUF Q4_1's block: a Q4_1 weight without an adapter gets its codes back exactly
RESCORED = 64  # a packed target's output head: the candidates whose logits are recomputed in float32
RESCORED_ROWS = 512  # ... in forwards of at most this many rows (decode and verify steps, a prefill's last tokens)
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


class PackedLinear(nn.Module):
    """y = x Wᵀ (+ x Aᵀ Bᵀ) + b with W packed (a subclass's `packed_mm`), run on bfloat16 activations; A, B: a LoRA
    adapter's pair for this layer (set by adapters.merge_adapter), kept in float32 beside the packed weight because
    rounding a merged weight snaps the adapter's small delta back onto the base's grid (measured: the voice eval
    fell from 0.82 to 0.21 grounded facts with the adapter merged before int4)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.bias = layer.bias
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("lora_a", None)
        self.register_buffer("lora_b", None)  # scaled by the adapter's alpha / r

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.packed_mm(flat.to(ACTIVATIONS)).to(x.dtype)
        if self.lora_a is not None:
            y = y + (flat @ self.lora_a.T) @ self.lora_b.T
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(PackedLinear):
    """W as int8, one symmetric scale per output channel."""

    def __init__(self, layer: nn.Linear):
        super().__init__(layer)
        w = layer.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(ACTIVATIONS))

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scales)


class Int4Linear(PackedLinear):
    """W as 4-bit codes q in groups of `group` along the input: w = (q - 8)·scale + zero, where a group's scale and
    zero come from its min and max (GGUF Q4_1's scheme, with zero = min + 8·scale; the codes of a Q4_1 weight are
    the file's, its scale and zero are rounded to bfloat16 where the file has float16)."""

    def __init__(self, layer: nn.Linear, group: int = INT4_GROUP):
        super().__init__(layer)
        n, k = layer.out_features, layer.in_features
        w = layer.weight.detach().float().view(n, k // group, group)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = ((high - low) / 15).clamp(min=1e-12)
        codes = ((w - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(codes, 1))
        # [k / group, n, 2]: the kernel's layout of (scale, zero)
        zeros = low + 8 * scales
        self.register_buffer("scales_and_zeros", torch.stack([scales.T, zeros.T], dim=-1).contiguous().to(ACTIVATIONS))
        self.group = group

    @staticmethod
    def fits(layer: nn.Linear, group: int = INT4_GROUP) -> bool:
        """The kernel wants whole groups along the input and output rows in multiples of 16."""
        return layer.in_features % group == 0 and layer.out_features % 16 == 0

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.weight_int4, self.group, self.scales_and_zeros)


class RescoredHead(Linear):
    """A packed target's output head: every logit from an int8 copy of the weight (a quarter of float32's bytes; the
    float32 head of SmolLM2's 49,152 x 576 tied embedding took 11.4 ms of a 78 ms int4 step on an AVX2 CPU), then the
    `top` largest recomputed from the float32 rows. The greedy token and the likely tokens' logits are float32's (the
    int8 error, about 1e-2 of a logit, would have to lift the true argmax out of the top 64), and only the tail, which
    sampling reaches with a probability of about e^-10, keeps the int8 values. The float32 weight stays the same tensor
    (tied to the embedding; a reduced-vocabulary feature head reads its rows). Forwards of more than RESCORED_ROWS rows
    (all-position logits) take the float32 head: the recomputation gathers `top` rows of the weight per row."""

    def __init__(self, layer: nn.Linear, top: int = RESCORED):
        super().__init__(layer.in_features, layer.out_features, bias=False, device="meta")
        self.weight, self.bias, self.top = layer.weight, layer.bias, min(top, layer.out_features)
        self.repack()

    def repack(self) -> None:
        """The int8 copy of the current weight (after an adapter changed it)."""
        self.packed = Int8Linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if flat.shape[0] > RESCORED_ROWS:
            return F.linear(x, self.weight, self.bias)
        logits = self.packed.packed_mm(flat.to(ACTIVATIONS)).float()
        if self.bias is not None:
            logits = logits + self.bias
        top = logits.topk(self.top, dim=-1).indices  # [N, top]
        # a product and a sum rather than a batched matmul: each row's logits do not depend on the rows beside it
        exact = (self.weight[top] * flat[:, None, :]).sum(-1)
        if self.bias is not None:
            exact = exact + self.bias[top]
        return logits.scatter(-1, top, exact).view(*x.shape[:-1], self.out_features)


def check_weight_bits(bits: str, device: str | torch.device) -> None:
    """Raises ValueError for weight bits this build or device cannot run (before any weight is loaded)."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits {bits!r}: choose one of {', '.join(WEIGHT_BITS)}")
    if torch.device(device).type != "cpu":
        raise ValueError(f"--dtype {bits} is for the CPU (PyTorch's packed CPU kernels); on a GPU use fp8")
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        raise ValueError(f"--dtype {bits} needs PyTorch 2.6 or later (this is {torch.__version__})")


def quantize_weights_(model: Transformer, bits: str) -> Transformer:
    """Swaps each nn.Linear of the decoder layers for an Int8Linear or Int4Linear in place (a layer the int4 kernel
    cannot take gets int8) and the output head for a RescoredHead. Embeddings and norms stay float32, and so do the
    likely tokens' logits (a bfloat16 output would tie near-equal tokens). Apply an adapter after this
    (adapters.merge_adapter keeps its pairs beside the packed weights)."""
    check_weight_bits(bits, next(model.parameters()).device)
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        raise ValueError("quantize_weights_: the model's weights are packed already")
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                use_int4 = bits == "int4" and Int4Linear.fits(child)
                setattr(module, name, Int4Linear(child) if use_int4 else Int8Linear(child))
    model.lm_head = RescoredHead(model.lm_head)
    return model
