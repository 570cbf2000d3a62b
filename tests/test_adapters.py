"""PEFT LoRA adapters merged at load: logits equal peft's merged model on a random small Llama and random LoRA."""
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from npc_engine.loading import CheckpointError, load_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(path, hidden=64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def lora(model, path, **config):
    torch.manual_seed(1)
    cfg = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.1, **config)
    wrapped = peft.get_peft_model(model, cfg)
    wrapped.save_pretrained(path)
    return wrapped.merge_and_unload().eval()


@pytest.mark.parametrize("config", [dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=4, use_rslora=True),
                                    dict(r=4, lora_alpha=16, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})],
                         ids=["plain", "rslora", "patterns"])
def test_merged_logits_equal_peft(tmp_path, config):
    base = tiny_llama(tmp_path / "base")
    merged = lora(base, tmp_path / "adapter", **config)
    ours = load_model(tmp_path / "base", dtype="float32", adapter=tmp_path / "adapter")
    plain = load_model(tmp_path / "base", dtype="float32")
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = merged(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
        assert (plain(ids) - expected).abs().max() > 1e-2  # the adapter does change the model


def test_adapter_for_another_shape(tmp_path):
    lora(tiny_llama(tmp_path / "base", hidden=64), tmp_path / "adapter", r=4, lora_alpha=8)
    tiny_llama(tmp_path / "other", hidden=32)
    shape = r"adapter for another shape: model\.layers\.\d\.\S+ is \d+ -> \d+, the adapter's lora_A"
    with pytest.raises(CheckpointError, match=shape):
        load_model(tmp_path / "other", adapter=tmp_path / "adapter")


def test_adapter_errors(tmp_path):
    lora(tiny_llama(tmp_path / "base"), tmp_path / "adapter", r=4, lora_alpha=8)
    with pytest.raises(CheckpointError, match="needs adapter_config.json and adapter_model.safetensors"):
        load_model(tmp_path / "base", adapter=tmp_path / "base")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA not supported"):
        load_model(tmp_path / "base", adapter=tmp_path / "adapter")


def test_adapter_flag_on_generate(tmp_path, capsys):
    from npc_engine.cli import main

    base = tiny_llama(tmp_path / "base")
    merged = lora(base, tmp_path / "adapter", r=4, lora_alpha=8)
    merged.save_pretrained(tmp_path / "merged")
    write_tokenizer(tmp_path / "merged")
    outputs = []
    for model, adapter in ((tmp_path / "base", tmp_path / "adapter"), (tmp_path / "merged", None)):
        argv = ["generate", "--model", str(model), "--prompt", "w5 w7", "--greedy", "--max-tokens", "8", "--ids",
                "--draft", "none"]
        assert main(argv + (["--adapter", str(adapter)] if adapter else [])) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_truncated_adapter_keeps_the_full_rank_model_and_is_the_best_low_rank_delta(tmp_path):
    from npc_engine.adapters import read_adapter, truncate_adapter

    base = tiny_llama(tmp_path / "base")
    merged = lora(base, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True)
    truncate_adapter(tmp_path / "adapter", tmp_path / "same", rank=4)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same = load_model(tmp_path / "base", dtype="float32", adapter=tmp_path / "same")
        torch.testing.assert_close(same(ids), merged(ids).logits, atol=1e-4, rtol=1e-4)
    truncate_adapter(tmp_path / "adapter", tmp_path / "small", rank=1)
    _, full = read_adapter(tmp_path / "adapter")
    _, small = read_adapter(tmp_path / "small")
    a, b = full["model.layers.0.self_attn.q_proj"]
    delta = 8 / 4**0.5 * b @ a  # rsLoRA: alpha / sqrt(r)
    s = torch.linalg.svdvals(delta)
    a1, b1 = small["model.layers.0.self_attn.q_proj"]
    assert a1.shape[0] == 1 and json.loads((tmp_path / "small" / "adapter_config.json").read_text())["r"] == 1
    torch.testing.assert_close(torch.linalg.matrix_norm(delta - b1 @ a1), s[1:].norm(), atol=1e-4, rtol=1e-4)


def test_export_onnx_merges_the_adapter(tmp_path):
    """`export-onnx --adapter` (the `ort` layout, GroupQueryAttention): the export's prefill logits equal peft's merged
    model's, and the manifest names the adapter."""
    from npc_engine.model import KVCache
    from npc_engine.onnx_backend import OnnxModel
    from npc_engine.onnx_export import export_onnx

    base = tiny_llama(tmp_path / "base")
    merged = lora(base, tmp_path / "adapter", r=4, lora_alpha=8)
    export_onnx(tmp_path / "base", tmp_path / "onnx", progress=False, layout="ort", adapter=tmp_path / "adapter")
    assert json.loads((tmp_path / "onnx" / "manifest.json").read_text())["adapter"] == str(tmp_path / "adapter")
    ort_model = OnnxModel(tmp_path / "onnx")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    got = ort_model(ids, torch.arange(10)[None], KVCache(ort_model.args, 1, 32, "cpu", torch.float32),
                    torch.tensor([0]), 32)
    with torch.no_grad():
        torch.testing.assert_close(got, merged(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["ort", "portable"])
def test_quantized_export_keeps_the_adapter_beside_its_weights(tmp_path, layout):
    """`export-onnx --adapter --weights int4`: the base's projections become MatMulNBits while the LoRA pairs stay
    float MatMuls beside them (a merged weight rounded to the grid would lose the adapter's small delta); the logits
    stay near peft's merged model. int8 merges (its grid holds the delta)."""
    import onnx

    from npc_engine.model import KVCache
    from npc_engine.onnx_backend import OnnxModel
    from npc_engine.onnx_export import export_onnx

    base = tiny_llama(tmp_path / "base")
    merged = lora(base, tmp_path / "adapter", r=4, lora_alpha=8)
    out = tmp_path / "onnx"
    export_onnx(tmp_path / "base", out, progress=False, layout=layout, weights="int4", adapter=tmp_path / "adapter")
    int8 = tmp_path / "onnx8"
    export_onnx(tmp_path / "base", int8, progress=False, layout=layout, weights="int8", adapter=tmp_path / "adapter")
    assert not [n for n in onnx.load(str(int8 / "model.onnx")).graph.node if "/lora_" in n.name]
    nodes = onnx.load(str(out / "model.onnx")).graph.node
    per_layer = 4 if layout == "ort" else 7  # ort: q/k/v and gate/up are one matrix (and one LoRA pair) each
    assert sum(n.op_type == "MatMulNBits" for n in nodes) == per_layer * 2 + 1
    assert sum(n.op_type == "MatMul" and "/lora_" in n.name for n in nodes) == 2 * per_layer * 2
    ort_model = OnnxModel(out)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    got = ort_model(ids, torch.arange(10)[None], KVCache(ort_model.args, 1, 32, "cpu", torch.float32),
                    torch.tensor([0]), 32)
    with torch.no_grad():
        expected = merged(ids).logits
        adapter_effect = (expected - load_model(tmp_path / "base", dtype="float32")(ids)).abs().mean()
    assert (got - expected).abs().mean() < 0.1 * adapter_effect  # int4 rounding, small next to what the adapter does
