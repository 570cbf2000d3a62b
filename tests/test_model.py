"""Our model against `transformers` on the same random checkpoints (float32)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import kernels
from npc_engine import model as model_module
from npc_engine.drafters import NoDrafter
from npc_engine.engine import Engine
from npc_engine.fusion import fuse_projections_
from npc_engine.loading import load_model
from npc_engine.model import KVCache
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer

VARIANTS = ["llama_gqa", "llama3_rope", "qwen2_bias", "llama_tied"]


def hf_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def counting(calls: dict, name: str, impl):
    def counted(*args):
        calls[name] += 1
        return impl(*args)
    return counted


@pytest.mark.parametrize("fused", [False, True, "rope-after-qkv"], ids=["torch", "fused-kernels", "rope-after-qkv"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_decode_logits_match_transformers(make_checkpoint, variant, fused, monkeypatch):
    path = make_checkpoint(variant)
    ours, ref = load_model(path), hf_model(path)
    if fused:  # on CPU the kernels run their PyTorch references: this checks the fused wiring
        fuse_projections_(ours).fused = True
    if fused == "rope-after-qkv":  # one-row steps of wide models: q/k/v, then RoPE + cache write
        monkeypatch.setattr(model_module, "QKV_ROPE_MAX_DIM", 0)
    calls = {"qkv_rope_write": 0, "rope_kv_write": 0}
    for name in calls:  # the fused forward imports them from kernels when it runs
        monkeypatch.setattr(kernels, name, counting(calls, name, getattr(kernels, name)))
    tokens = torch.randint(0, ours.args.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        assert (ours(tokens) - expected).abs().max() <= 1e-4
        cache = KVCache(ours.args, 4, 128, "cpu", torch.float32)
        slots = torch.tensor([3, 1])
        prompt = 20
        logits = [ours(tokens[:, :prompt], torch.arange(prompt).expand(2, -1), cache, slots, 64)]
        for t in range(prompt, 30):  # one decode step at a time against the cache
            logits.append(ours(tokens[:, t:t + 1], torch.full((2, 1), t), cache, slots, 64))
        assert (torch.cat(logits, 1) - expected).abs().max() <= 1e-4
        # logits at one position per row (a prefill's last prompt token), the rows' positions differing
        index = torch.tensor([29, 4])
        picked = ours(tokens, torch.arange(30).expand(2, -1), cache, slots, 64, logits=index)
        assert picked.shape == (2, ours.args.vocab_size)
        assert (picked - expected[torch.arange(2), index]).abs().max() <= 1e-4
        # batch 1: one-row decode steps (norms inside the linear kernels; RoPE in the q/k/v kernel up to a width)
        calls.update(qkv_rope_write=0, rope_kv_write=0)
        slot = torch.tensor([2])
        logits = [ours(tokens[:1, :prompt], torch.arange(prompt)[None], cache, slot, 64)]
        for t in range(prompt, 30):
            logits.append(ours(tokens[:1, t:t + 1], torch.full((1, 1), t), cache, slot, 64))
        assert (torch.cat(logits, 1) - expected[:1]).abs().max() <= 1e-4
    steps = (30 - prompt) * ours.args.n_layers
    assert calls == {False: {"qkv_rope_write": 0, "rope_kv_write": 0},
                     True: {"qkv_rope_write": steps, "rope_kv_write": ours.args.n_layers},
                     "rope-after-qkv": {"qkv_rope_write": 0, "rope_kv_write": steps + ours.args.n_layers}}[fused]


def test_chunked_prefill_equals_one_shot(tiny_model_dir):
    model = load_model(tiny_model_dir)
    tokens = torch.randint(0, model.args.vocab_size, (1, 45), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        one_shot_cache = KVCache(model.args, 1, 128, "cpu", torch.float32)
        one_shot = model(tokens, torch.arange(45)[None], one_shot_cache, torch.tensor([0]), 128)
        chunked_cache = KVCache(model.args, 1, 128, "cpu", torch.float32)
        chunks = [model(tokens[:, a:a + 16], torch.arange(a, min(a + 16, 45))[None], chunked_cache, torch.tensor([0]),
                        128) for a in range(0, 45, 16)]
    assert (torch.cat(chunks, 1) - one_shot).abs().max() <= 1e-5
    assert (chunked_cache.k[:, :, :, :45] - one_shot_cache.k[:, :, :, :45]).abs().max() <= 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["torch", "fused-kernels"])
def test_prefix_reference_reads_positions_below_it_from_the_prefix_slot(tiny_model_dir, fused):
    """Two rows continue one prefix held in a prefix slot, next to a row without one: all get the logits of
    their whole sequence, and the shared rows' own slots are never read below the prefix length (NaN there)."""
    model = load_model(tiny_model_dir)
    if fused:
        fuse_projections_(model).fused = True
    P, n = 13, 24
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, model.args.vocab_size, (3, n), generator=g)
    tokens[1, :P] = tokens[0, :P]
    with torch.no_grad():
        expected = model(tokens)
        cache = KVCache(model.args, 5, 64, "cpu", torch.float32)
        cache.k[:, :2, :, :P] = cache.v[:, :2, :, :P] = float("nan")
        model(tokens[:1, :P], torch.arange(P)[None], cache, torch.tensor([4]), 64, logits=False)  # the prefix slot
        model(tokens[2:, :P], torch.arange(P)[None], cache, torch.tensor([2]), 64, logits=False)  # the unshared row
        prefix = torch.tensor([[4, P], [4, P], [0, 0]])
        got = model(tokens[:, P:], torch.arange(P, n).expand(3, -1), cache, torch.tensor([0, 1, 2]), 64, prefix=prefix)
    assert (got - expected[:, P:]).abs().max() <= 1e-4
    assert cache.k[:, :2, :, :P].isnan().all() and not cache.k[:, :3, :, P:n].isnan().any()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_32_tokens_identical_to_transformers_generate(make_checkpoint, variant):
    path = make_checkpoint(variant)
    engine = Engine(load_model(path), NoDrafter(), Tokenizer.from_dir(path))
    prompt = engine.tokenizer.encode("<|persona|>I forge swords.<|eot|><|player|>What do you do?<|eot|><|npc|>")
    ours = list(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=32)))
    if engine.last_stats and len(ours) < 32:
        ours.append(engine.tokenizer.eot_id)  # the engine stopped on end-of-turn, which it does not emit
    with torch.no_grad():
        out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                      eos_token_id=engine.tokenizer.stop_ids, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def test_fp8_weights_stay_close_and_replace_fused_projections(tiny_model_dir):
    """--dtype fp8 swaps every linear layer, also after the q/k/v and gate/up fusion; relative L2
    error of the logits <= 0.1 (e4m3 keeps a 3-bit mantissa)."""
    from kernels.fp8 import Fp8Linear
    from npc_engine.quantize import quantize_fp8_

    ref = load_model(tiny_model_dir)
    model = quantize_fp8_(fuse_projections_(load_model(tiny_model_dir)))
    assert all(layer.self_attn.qkv is None and layer.mlp.gate_up is None for layer in model.model.layers)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Fp8Linear) and isinstance(model.lm_head, Fp8Linear)
    fuse_projections_(model).fused = True  # FP8 weights fuse with their scales
    attn = model.model.layers[0].self_attn
    weight, _, scale = attn.qkv
    assert weight.dtype == torch.float8_e4m3fn and scale.shape == (weight.shape[0],)
    assert attn.k_proj.weight_fp8.data_ptr() == weight[attn.q_proj.out_features:].data_ptr()
    tokens = torch.randint(0, ref.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache(model.args, 2, 64, "cpu", torch.float32)
    with torch.no_grad():
        expected = ref(tokens)
        got = model(tokens, torch.arange(20).expand(2, -1), cache, torch.tensor([0, 1]), 64)
    assert ((got - expected).norm() / expected.norm()).item() <= 0.1


def test_engine_loads_fp8_target(tiny_model_dir):
    """dtype="fp8" stores the target's linear layers as e4m3 and still generates; the ONNX backend refuses it."""
    from kernels.fp8 import Fp8Linear
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams

    engine = Engine.load(tiny_model_dir, draft="none", dtype="fp8", max_batch=2, max_seq=128)
    assert isinstance(engine.target.lm_head, Fp8Linear) and engine.dtype == torch.float32
    tokens = list(engine.generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=6)))
    assert 1 <= len(tokens) <= 6
    with pytest.raises(ValueError, match="fp8 needs the torch backend"):
        Engine.load(tiny_model_dir, dtype="fp8", backend="onnx")


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("layers", [(), (0, 1)])
def test_feature_store_holds_the_last_hidden_states(tiny_model_dir, fused, layers):
    """With a feature store, each cached forward (several rows and one) stores the final norm's input at
    (slot, position), in the eager and the fused forward (the kernels' references on CPU); with feature_layers,
    those layers' outputs side by side, as layer_features gives them for training."""
    model = load_model(tiny_model_dir)
    tokens = torch.randint(0, model.args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        last, expected = model.layer_features(tokens, positions, layers)
        assert torch.equal(last, model.hidden_states(tokens, positions))
        assert expected.shape[-1] == max(1, len(layers)) * model.args.dim
        assert not layers or not torch.allclose(expected[..., :model.args.dim], last)
        if fused:
            fuse_projections_(model)
            model.fused = True
        cache = KVCache(model.args, 3, 64, "cpu", torch.float32)
        model.feature_layers = layers
        model.feature_store = torch.zeros(3, 64, expected.shape[-1])
        slots = torch.tensor([2, 0])
        model(tokens[:, :7], positions[:, :7], cache, slots, 64)
        model(tokens[:1, 7:], positions[:1, 7:], cache, slots[:1], 64)
    assert torch.allclose(model.feature_store[2, :8], expected[0], atol=1e-4)
    assert torch.allclose(model.feature_store[0, :7], expected[1, :7], atol=1e-4)
    assert model.feature_store[1].abs().max() == 0 and model.feature_store[0, 7:].abs().max() == 0
