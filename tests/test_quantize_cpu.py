"""--dtype int8 / int4: weight-only target weights on the CPU (npc_engine.quantize)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from npc_engine.adapters import merge_adapter
from npc_engine.drafters import HeadDrafter, ModelDrafter, NgramDrafter, NoDrafter
from npc_engine.engine import Engine
from npc_engine.engine.load import load_parts
from npc_engine.loading import load_model
from npc_engine.quantize import INT4_GROUP, Int4Linear, Int8Linear, PackedLinear, RescoredHead, quantize_weights_
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer
from test_speculative import EMBEDDED, PROMPTS, random_head, run_batch


def q4_1_grid(w: torch.Tensor) -> torch.Tensor:
    """`w` rounded as GGUF Q4_1 stores it: groups of 32 along the input, w = min + q·(max - min)/15."""
    g = w.view(w.shape[0], -1, INT4_GROUP)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = ((high - low) / 15).clamp(min=1e-12)
    return (low + ((g - low) / step).round().clamp(0, 15) * step).view_as(w)


def int8_grid(w: torch.Tensor) -> torch.Tensor:
    scales = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return (w / scales).round().clamp(-127, 127) * scales


def on_grid(model: nn.Module, bits: str) -> nn.Module:
    """A float copy of `model` whose decoder-layer weights are what `quantize_weights_(model, bits)` stores."""
    model = copy.deepcopy(model)
    for layer in model.model.layers.modules():
        if isinstance(layer, nn.Linear):
            w = layer.weight.data.float()
            layer.weight.data = q4_1_grid(w) if bits == "int4" and Int4Linear.fits(layer) else int8_grid(w)
    return model


def test_int4_stores_a_q4_1_weight_exactly():
    """Up to the bfloat16 rounding of the layer's input and output (the kernels' activations)."""
    torch.manual_seed(0)
    layer = nn.Linear(96, 48, bias=True)
    x = torch.randn(5, 96)
    off_grid_error = (Int4Linear(layer)(x) - layer(x.bfloat16().float())).abs().max()
    layer.weight.data = q4_1_grid(layer.weight.data)
    expected = layer(x.bfloat16().float())
    tolerance = expected.abs().max() * 2 ** -7
    assert (Int4Linear(layer)(x) - expected).abs().max() <= tolerance < off_grid_error


def test_int8_error_stays_within_half_a_step_per_weight():
    torch.manual_seed(1)
    layer = nn.Linear(64, 32, bias=False)
    x = torch.randn(4, 64).bfloat16().float()
    bound = x.abs() @ (layer.weight.abs().amax(1, keepdim=True) / 127 / 2).expand(-1, 64).T
    expected = layer(x)
    err = (Int8Linear(layer)(x) - expected).abs()
    assert (err <= bound + expected.abs() * 2 ** -8).all() and err.max() > 0


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) at each position."""
    log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_logits_match_the_float_model_of_the_stored_weights(bits):
    """On the embedded pair: the packed kernels compute what float32 computes on the stored (rounded) weights, up to
    their bfloat16 activations (measured: KL 0.0004 int8, 0.0007 int4 per position), and the rounding itself costs
    int8 little (measured: KL 0.007, one top-1 flip in 24 positions); int4 on this 9.5 M model costs much more
    (KL 0.46), on SmolLM2 see benchmarks/README.md."""
    model = load_model(EMBEDDED / "npc-target")
    tok = Tokenizer.from_dir(EMBEDDED / "npc-target")
    ids = torch.tensor([tok.encode(PROMPTS[0] + "I forge blades")])
    quantized = quantize_weights_(copy.deepcopy(model), bits)
    assert not any(isinstance(m, nn.Linear) for m in quantized.model.layers.modules())
    with torch.no_grad():
        got, rounded, exact = quantized(ids), on_grid(model, bits)(ids), model(ids)
    assert kl(rounded, got).max() < 0.005
    if bits == "int8":
        assert kl(exact, got).max() < 0.02
        assert (got.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


def quantized_engine(target_dir, draft_dir, bits: str, drafter_kind: str) -> Engine:
    target = quantize_weights_(load_model(target_dir), bits)
    drafters = {
        "none": lambda: NoDrafter(),
        "ngram": lambda: NgramDrafter(target.args.vocab_size, "cpu"),
        "model": lambda: ModelDrafter(load_model(draft_dir), 9, 1024, "cpu", torch.float32),
        "head_reduced": lambda: HeadDrafter(random_head(target, draft_ids=torch.arange(0, target.args.vocab_size, 3)),
                                            target, 9, 1024, "cpu", torch.float32),
    }
    return Engine(target, drafters[drafter_kind](), Tokenizer.from_dir(target_dir), max_batch=8, fixed_k=4)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_greedy_output_is_identical_with_every_drafter_on_a_quantized_target(tiny_pair_dirs, bits):
    target_dir, draft_dir = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=16)
    plain = run_batch(quantized_engine(target_dir, draft_dir, bits, "none"), PROMPTS, params)
    for kind in ("ngram", "model", "head_reduced"):
        for batch in (1, 8):
            engine = quantized_engine(target_dir, draft_dir, bits, kind)
            got = []
            for start in range(0, len(PROMPTS), batch):
                got += run_batch(engine, PROMPTS[start:start + batch], params)
            assert got == plain, (kind, batch)


def test_packed_rows_do_not_depend_on_the_batch():
    """Speculative greedy output equals plain decoding only if verifying k + 1 rows computes each row as a one-row
    step does: the packed kernels do, bit for bit, at SmolLM2's layer shapes."""
    torch.manual_seed(2)
    for packed in (Int8Linear, Int4Linear):
        for n_in, n_out in ((576, 1536), (1536, 576), (576, 192)):
            layer = packed(nn.Linear(n_in, n_out, bias=False))
            x = torch.randn(9, n_in)
            assert torch.equal(layer(x), torch.cat([layer(row[None]) for row in x])), (packed, n_in, n_out)


def test_load_parts_packs_the_target_only(tiny_pair_dirs):
    target_dir, draft_dir = tiny_pair_dirs
    target, drafter, _, _ = load_parts(target_dir, draft=str(draft_dir), dtype="int4")
    assert isinstance(target.model.layers[0].self_attn.q_proj, Int4Linear)
    assert not any(isinstance(m, nn.Linear) for m in target.model.layers.modules())
    assert isinstance(target.lm_head, RescoredHead)
    assert target.lm_head.weight.dtype == torch.float32
    assert not any(isinstance(m, PackedLinear) for m in drafter.model.modules())
    with pytest.raises(ValueError, match="packed already"):
        quantize_weights_(target, "int8")


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_an_adapter_on_packed_weights_keeps_its_pairs_beside_them(tmp_path, bits):
    """Merging first and packing after would round the adapter's small delta away (the voice eval lost it)."""
    from test_adapters import lora, tiny_llama

    lora(tiny_llama(tmp_path / "base"), tmp_path / "adapter", r=4, lora_alpha=8)
    target, _, _, _ = load_parts(tmp_path / "base", draft="none", dtype=bits, adapter=tmp_path / "adapter")
    assert all(m.lora_a is not None for m in target.model.layers.modules() if isinstance(m, PackedLinear))
    expected = merge_adapter(on_grid(load_model(tmp_path / "base"), bits), tmp_path / "adapter")
    without = quantize_weights_(load_model(tmp_path / "base"), bits)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, bare = target(ids), expected(ids), without(ids)
    assert kl(want, got).max() < 0.005 < kl(want, bare).max()


def test_weight_bits_are_refused_off_the_cpu_and_on_onnx(tiny_model_dir):
    model = load_model(tiny_model_dir).to("meta")
    with pytest.raises(ValueError, match="for the CPU"):
        quantize_weights_(model, "int4")
    with pytest.raises(ValueError, match="choose one of"):
        quantize_weights_(load_model(tiny_model_dir), "int2")
    with pytest.raises(ValueError, match="torch backend"):
        load_parts(tiny_model_dir, draft="none", dtype="int8", backend="onnx")
    with pytest.raises(ValueError, match="for the CPU"):  # before any weight is loaded onto the GPU
        load_parts(tiny_model_dir, draft="none", dtype="int4", device="cuda")


@pytest.mark.parametrize("bias", [False, True])
def test_the_rescored_head_gives_float32_logits_where_they_matter(bias):
    """The packed target's output head: the logits it recomputes are the float32 head's (so is the argmax; the top
    RESCORED // 2 lie well inside the int8 copy's top RESCORED, which alone may differ at its edge), the tail the int8
    copy's, within int8's rounding bound; each row's logits are the same computed alone or beside others."""
    from npc_engine.quantize import RESCORED, RescoredHead

    torch.manual_seed(3)
    layer = nn.Linear(64, 500, bias=bias)
    if bias:  # a bias that alone lifts some tokens to the top
        layer.bias.data = torch.randn(500) * 3
    head = RescoredHead(layer)
    assert head.weight is layer.weight and isinstance(head, nn.Linear)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        got, exact = head(x), layer(x)
        one_by_one = torch.stack([head(row) for row in x.view(-1, 64)]).view_as(got)
    top = exact.topk(RESCORED // 2, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, top), exact.gather(-1, top), rtol=1e-6, atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1)) and torch.equal(got, one_by_one)
    bound = x.bfloat16().float().abs() @ (layer.weight.abs().amax(1, keepdim=True) / 127 / 2).expand(-1, 64).T
    err = (got - exact).abs()
    assert (err <= bound + exact.abs() * 2 ** -7).all() and err.max() > 1e-4


def test_an_adapter_on_a_packed_targets_output_head_repacks_its_int8_copy(tmp_path):
    import json

    from safetensors.torch import save_file

    from test_adapters import tiny_llama

    tiny_llama(tmp_path / "base")
    (tmp_path / "adapter").mkdir()
    g = torch.Generator().manual_seed(4)
    save_file({"base_model.model.lm_head.lora_A.weight": torch.randn(4, 64, generator=g),
               "base_model.model.lm_head.lora_B.weight": torch.randn(128, 4, generator=g)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                          "lora_alpha": 4}))
    target, _, _, _ = load_parts(tmp_path / "base", draft="none", dtype="int8", adapter=tmp_path / "adapter")
    head = target.lm_head
    assert isinstance(head, RescoredHead) and head.weight is not target.model.embed_tokens.weight  # untied
    before = nn.Linear(64, 128, bias=False)
    before.weight.data = target.model.embed_tokens.weight.data  # the head's weight before the adapter
    codes = head.packed.weight_int8
    assert torch.equal(codes, Int8Linear(head).weight_int8) and not torch.equal(codes, Int8Linear(before).weight_int8)
    x = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        assert torch.equal(head(x).argmax(-1), F.linear(x, head.weight).argmax(-1))
