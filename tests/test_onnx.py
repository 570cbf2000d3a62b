"""ONNX export and the ONNX Runtime backend: logits and KV cache match PyTorch, greedy speculative
output is identical across backends, and bad exports, providers and opsets are refused clearly."""
import json
import shutil
from operator import attrgetter
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

from npc_engine import onnx_export
from npc_engine.cli import main
from npc_engine.drafters import HeadDrafter, ModelDrafter, NgramDrafter
from npc_engine.engine import Engine
from npc_engine.engine.trees import TreeShape
from npc_engine.errors import CheckpointError
from npc_engine.head import load_head
from npc_engine.loading import load_model
from npc_engine.model import KVCache
from npc_engine.onnx_backend import OnnxBackendError, OnnxModel, cuda_usable, load_onnx_model
from npc_engine.onnx_export import ExportError, export_onnx
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer

EMBEDDED = Path(__file__).resolve().parents[1] / "models"
PROMPTS = [
    "<|persona|>I forge swords for the town guard.<|eot|><|player|>What do you do?<|eot|><|npc|>",
    "<|player|>Hi<|eot|><|npc|>",
    "The tavern is warm tonight, traveller. The tavern is warm tonight,",
    "<|persona|>I sing songs of old heroes and dragons. I sing songs.<|eot|><|player|>Sing!<|eot|><|npc|>I sing",
    "Grüße aus der Schmiede — ça va?",
]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """Exports a model folder once per (folder, options)."""
    made = {}

    def make(model_dir: Path, **options) -> Path:
        key = (str(model_dir), json.dumps(options, sort_keys=True))
        if key not in made:
            made[key] = tmp_path_factory.mktemp("onnx")
            export_onnx(model_dir, made[key], progress=False, **options)
        return made[key]

    return make


def run_steps(model, cache: KVCache) -> list[torch.Tensor]:
    """Prefill of two rows of different lengths (the short one padded), a verify of 4 tokens per row,
    then a decode step after a rollback (positions earlier than the verify wrote)."""
    gen = torch.Generator().manual_seed(0)
    vocab, slots = model.args.vocab_size, torch.tensor([2, 0])
    steps = [(torch.randint(0, vocab, (2, 12), generator=gen), torch.arange(12).expand(2, 12), 64),
             (torch.randint(0, vocab, (2, 4), generator=gen), torch.tensor([[7, 8, 9, 10], [12, 13, 14, 15]]), 64),
             (torch.randint(0, vocab, (2, 1), generator=gen), torch.tensor([[9], [14]]), 64),
             (torch.randint(0, vocab, (1, 1), generator=gen), torch.tensor([[70]]), 128)]
    logits = []
    for i, (tokens, pos, kv_len) in enumerate(steps):
        rows = slots[:1] if i == 3 else slots
        if i == 3:  # a long context in one row only
            model(torch.randint(0, vocab, (1, 60), generator=gen), torch.arange(10, 70)[None], cache, rows, 128)
        logits.append(model(tokens, pos, cache, rows, kv_len))
    return logits


@pytest.mark.parametrize("layout", onnx_export.LAYOUTS)
@pytest.mark.parametrize("variant", ["llama_gqa", "qwen2_bias", "llama_tied"])
def test_ort_logits_and_cache_match_torch(make_checkpoint, export, variant, layout):
    """Both layouts; with `--layout ort` the two-row steps (slots 2 and 0) gather and write back, the one-row step
    runs GroupQueryAttention on the cache slot in place, and the hidden states a feature head drafts from fill the
    feature store as the torch model's do."""
    model_dir = make_checkpoint(variant)
    options = {"layout": layout, "draft_weights": True} if layout == "ort" else {"layout": layout}
    torch_model, ort_model = load_model(model_dir), OnnxModel(export(model_dir, **options))
    assert ort_model.layout == layout and ort_model.hidden == (layout == "ort")
    torch_cache = KVCache(torch_model.args, 3, 256, "cpu", torch.float32)
    ort_cache = KVCache(ort_model.args, 3, 256, "cpu", torch.float32)
    if layout == "ort":
        torch_model.feature_store = torch.zeros(3, 256, torch_model.args.dim)
        ort_model.feature_store = torch.zeros(3, 256, torch_model.args.dim)
    for step, (expected, got) in enumerate(zip(run_steps(torch_model, torch_cache), run_steps(ort_model, ort_cache))):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), f"step {step}: {(got - expected).abs().max()}"
    assert torch.allclose(ort_cache.k, torch_cache.k, atol=1e-4, rtol=0)
    assert torch.allclose(ort_cache.v, torch_cache.v, atol=1e-4, rtol=0)
    if layout == "ort":
        assert torch_model.feature_store.abs().sum() > 0
        assert torch.allclose(ort_model.feature_store, torch_model.feature_store, atol=1e-4, rtol=0)
        ort_model.attach_draft_weights()  # the head's view of its target: the torch model's tensors
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(attrgetter(name)(ort_model), torch_model.get_parameter(name)), name


def test_export_writes_a_valid_graph_manifest_and_tokenizer(tiny_model_dir, export):
    out = export(tiny_model_dir)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["opset"] == onnx_export.DEFAULT_OPSET and manifest["dtype"] == "fp32"
    assert manifest["external_data"] is None and not (out / "model.onnx.data").exists()
    assert manifest["inputs"][:4] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert manifest["outputs"][:2] == ["logits", "present.0.key"] and len(manifest["outputs"]) == 1 + 2 * 2
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.1.value"] == ["batch", 2, "total_sequence", 16]
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert Tokenizer.from_dir(out).stop_ids == Tokenizer.from_dir(tiny_model_dir).stop_ids


@pytest.mark.parametrize("options,atol", [({"opset": onnx_export.MIN_OPSET}, 1e-4), ({"dtype": "fp16"}, 5e-3)])
def test_other_opsets_and_fp16_run(tiny_model_dir, export, options, atol):
    out = export(tiny_model_dir, **options)
    ort_model = OnnxModel(out)
    dtype = torch.float16 if options.get("dtype") == "fp16" else torch.float32
    assert ort_model.dtype == dtype
    expected = run_steps(load_model(tiny_model_dir), KVCache(ort_model.args, 3, 256, "cpu", torch.float32))
    got = run_steps(ort_model, KVCache(ort_model.args, 3, 256, "cpu", dtype))
    for e, g in zip(expected, got):
        assert torch.allclose(g.float(), e, atol=atol, rtol=0), (g.float() - e).abs().max()


def test_large_models_keep_weights_in_one_external_file(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    export_onnx(tiny_model_dir, tmp_path, progress=False)
    assert json.loads((tmp_path / "manifest.json").read_text())["external_data"] == "model.onnx.data"
    assert sorted(p.name for p in tmp_path.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the scratch folder is gone
    assert (tmp_path / "model.onnx").stat().st_size < (tmp_path / "model.onnx.data").stat().st_size
    torch_model = load_model(tiny_model_dir)
    expected = run_steps(torch_model, KVCache(torch_model.args, 3, 256, "cpu", torch.float32))
    got = run_steps(OnnxModel(tmp_path), KVCache(torch_model.args, 3, 256, "cpu", torch.float32))
    assert all(torch.allclose(g, e, atol=1e-4, rtol=0) for g, e in zip(got, expected))
    (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(OnnxBackendError, match=r"model\.onnx\.data: missing"):
        OnnxModel(tmp_path)


def run_batch(engine: Engine, prompts: list[str], params: SamplingParams, prefix_len: int = 0) -> list[list[int]]:
    outputs = {}
    for i, text in enumerate(prompts):
        ids = engine.tokenizer.encode(text)
        engine.submit(f"r{i}", ids, params, prefix_len=min(prefix_len, len(ids) - 1))
        outputs[f"r{i}"] = []
    while engine.has_work():
        for ev in engine.step():
            outputs[ev.rid] += ev.token_ids
    return [outputs[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("draft,k,layout", [("model", 4, "portable"), ("model", None, "portable"),
                                             ("ngram", 6, "portable"), ("model", 4, "ort"), ("ngram", 6, "ort"),
                                             ("head", 4, "ort"), ("head", None, "ort"), ("head_layers", 4, "ort")])
def test_greedy_speculative_output_is_identical_across_backends(tiny_pair_dirs, export, draft, k, layout, tmp_path):
    """A feature head drafts on the `ort` export's hidden states: with a fixed K it proposes the very drafts it
    proposes on the torch target (features, tokens and its cache copied with each persona prefix); head_layers: on
    both layers' outputs, from an export with `--feature-layers 0,1`."""
    from npc_engine.head import save_head
    from tests.test_speculative import random_head

    target_dir, draft_dir = tiny_pair_dirs
    target = load_model(target_dir)
    head_dir = tmp_path / "head"
    layers = (0, 1) if draft == "head_layers" else ()
    draft = "head" if layers else draft
    save_head(random_head(target, feature_layers=layers), head_dir, target_name="tiny", dtype=torch.float32)
    drafter = (ModelDrafter(load_model(draft_dir), 5, 512, "cpu", torch.float32) if draft == "model"
               else HeadDrafter(load_head(head_dir, target, "cpu"), target, 5, 512, "cpu", torch.float32)
               if draft == "head" else NgramDrafter(target.args.vocab_size, "cpu"))
    torch_engine = Engine(target, drafter, Tokenizer.from_dir(target_dir), max_batch=4, max_seq=512, fixed_k=k)
    # the draft model's head dimension (8) is one GroupQueryAttention does not take: its export stays portable
    spec = {"model": str(export(draft_dir)), "head": str(head_dir)}.get(draft, draft)
    options = {"draft_weights": True, **({"feature_layers": layers} if layers else {})} if draft == "head" else {}
    onnx_engine = Engine.load(export(target_dir, layout=layout, **options), draft=spec, backend="onnx", max_batch=4,
                              max_seq=512, fixed_k=k)
    assert isinstance(onnx_engine.target, OnnxModel)
    assert draft != "model" or isinstance(onnx_engine.drafter.model, OnnxModel)
    proposed = {engine: [] for engine in (torch_engine, onnx_engine)}
    if draft == "head":
        for engine, drafts in proposed.items():
            engine.drafter.draft = record_drafts(engine.drafter.draft, drafts)
    prefixes_read = []
    if layout == "ort":  # the engine copies each prefix into the row's own slot: no call reads a prefix slot
        call = onnx_engine.target.call_ort
        onnx_engine.target.call_ort = lambda *a: prefixes_read.append(a[-1]) or call(*a)
    params = SamplingParams(temperature=0, max_tokens=16)
    for run in range(2):  # the second run reads the 6-token prefixes' KV in place from their prefix slots
        expected = run_batch(torch_engine, PROMPTS, params, prefix_len=6)
        assert run_batch(onnx_engine, PROMPTS, params, prefix_len=6) == expected, f"run {run}"
    assert onnx_engine.prefix_cache.hits == len(PROMPTS)
    assert layout == "portable" or prefixes_read and all(p is None or not p[:, 1].any() for p in prefixes_read)
    assert run_batch(onnx_engine, PROMPTS, params) == expected  # no shared prefix: the same lines
    assert any(expected)
    if draft == "head" and k:
        assert proposed[onnx_engine][:len(proposed[torch_engine])] == proposed[torch_engine] != []


def record_drafts(draft, into: list):
    def recorded(*args, **kwargs):
        drafts, copied = draft(*args, **kwargs)
        into.append(torch.stack(drafts, 1).tolist())
        return drafts, copied
    return recorded


def test_engine_load_picks_the_backend_from_the_folder(tiny_model_dir, export):
    assert isinstance(Engine.load(export(tiny_model_dir), draft="none").target, OnnxModel)
    assert not isinstance(Engine.load(tiny_model_dir, draft="none").target, OnnxModel)


def test_cli_export_then_generate_with_the_onnx_backend(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export-onnx", "--model", str(tiny_model_dir), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "model.onnx")
    generate = ["generate", "--prompt", "<|player|>Hi<|eot|><|npc|>", "--greedy", "--ids", "--max-tokens", "12",
                "--draft", "ngram"]
    assert main([*generate, "--model", str(tiny_model_dir), "--backend", "torch"]) == 0
    expected = capsys.readouterr().out.split()
    assert main([*generate, "--model", str(out), "--backend", "onnx", "--onnx-provider", "cpu"]) == 0
    assert capsys.readouterr().out.split() == expected and expected


@pytest.mark.skipif(not (EMBEDDED / "npc-target").is_dir(),
                    reason="the embedded pair is not in models/ (models/npc-target absent)")
def test_embedded_pair_exports_and_matches(export):
    target_dir, draft_dir = EMBEDDED / "npc-target", EMBEDDED / "npc-draft"
    for model_dir in (target_dir, draft_dir):
        torch_model, ort_model = load_model(model_dir), OnnxModel(export(model_dir))
        expected = run_steps(torch_model, KVCache(torch_model.args, 3, 256, "cpu", torch.float32))
        got = run_steps(ort_model, KVCache(ort_model.args, 3, 256, "cpu", torch.float32))
        for e, g in zip(expected, got):
            assert torch.allclose(g, e, atol=1e-4, rtol=0), (g - e).abs().max()
    params = SamplingParams(temperature=0, max_tokens=24)
    torch_engine = Engine.load(target_dir, draft=str(draft_dir), backend="torch", max_batch=4, max_seq=512, fixed_k=4)
    onnx_engine = Engine.load(export(target_dir), draft=str(export(draft_dir)), backend="onnx", max_batch=4,
                              max_seq=512, fixed_k=4)
    assert run_batch(onnx_engine, PROMPTS, params) == run_batch(torch_engine, PROMPTS, params)


# ---- errors ----------------------------------------------------------------------------------------------

def test_missing_export_is_named(tiny_model_dir, tmp_path):
    with pytest.raises(OnnxBackendError, match="no ONNX export here.*npc-engine export-onnx"):
        Engine.load(tiny_model_dir, backend="onnx")
    with pytest.raises(OnnxBackendError, match="ONNX model folder not found"):
        OnnxModel(tmp_path / "nowhere")


def test_missing_model_file_and_foreign_manifest(tiny_model_dir, export, tmp_path):
    broken = shutil.copytree(export(tiny_model_dir), tmp_path / "broken")
    (broken / "model.onnx").unlink()
    with pytest.raises(OnnxBackendError, match=r"model\.onnx: missing"):
        OnnxModel(broken)
    (broken / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(OnnxBackendError, match="not an npc-engine ONNX manifest"):
        OnnxModel(broken)


@pytest.mark.skipif(cuda_usable(), reason="CUDA is usable here")
def test_unavailable_provider_is_named_and_falls_back_only_when_asked(tiny_model_dir, export):
    out = export(tiny_model_dir)
    with pytest.raises(OnnxBackendError, match="CUDAExecutionProvider unavailable.*--onnx-provider auto"):
        OnnxModel(out, "cuda")
    with pytest.raises(OnnxBackendError, match="CUDAExecutionProvider unavailable"):
        Engine.load(out, draft="none", device="cuda")
    assert OnnxModel(out, "auto").provider == "cpu"
    assert Engine.load(out, draft="none", device="cuda", onnx_provider="auto").device.type == "cpu"
    with pytest.raises(OnnxBackendError, match="provider 'tpu' unknown"):
        OnnxModel(out, "tpu")


def test_opset_the_runtime_cannot_load_is_explained(tiny_model_dir, export, tmp_path):
    future = shutil.copytree(export(tiny_model_dir), tmp_path / "future")
    proto = onnx.load(str(future / "model.onnx"))
    proto.opset_import[0].version = 40
    onnx.save_model(proto, str(future / "model.onnx"))
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "opset": 40}))
    with pytest.raises(OnnxBackendError, match=r"opset 40 \(manifest\).*re-export with a lower --opset"):
        OnnxModel(future)


def test_an_ort_layout_the_runtime_defines_otherwise_is_explained(tiny_model_dir, export, tmp_path):
    """A `--layout ort` graph whose GroupQueryAttention this onnxruntime does not take (here: an input more than its
    schema has, as an older runtime lacks a newer input) names the version that exported it and the way out."""
    other = shutil.copytree(export(tiny_model_dir, layout="ort"), tmp_path / "other")
    assert json.loads((other / "manifest.json").read_text())["onnxruntime_version"] == onnxruntime.__version__
    proto = onnx.load(str(other / "model.onnx"))
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input.extend(["input_ids"] * 8)
    onnx.save_model(proto, str(other / "model.onnx"))
    hint = rf"GroupQueryAttention as onnxruntime {onnxruntime.__version__} defines it: install that version, or "
    with pytest.raises(OnnxBackendError, match=hint + "re-export with --layout portable"):
        OnnxModel(other)


def test_dtype_other_than_the_exported_one_is_refused(tiny_model_dir, export):
    out = export(tiny_model_dir)
    assert load_onnx_model(out, dtype="float32").dtype == torch.float32
    with pytest.raises(OnnxBackendError, match="exported as fp32, cannot run as bfloat16"):
        load_onnx_model(out, dtype="bfloat16")


def test_export_refuses_bad_options(tiny_model_dir, tmp_path, capsys, tiny_pair_dirs):
    with pytest.raises(ExportError, match="--opset 9 not supported"):
        export_onnx(tiny_model_dir, tmp_path, opset=9, progress=False)
    with pytest.raises(ExportError, match="must differ from the model folder"):
        export_onnx(tiny_model_dir, tiny_model_dir, progress=False)
    with pytest.raises(ExportError, match="--layout 'sentis' not supported"):
        export_onnx(tiny_model_dir, tmp_path, layout="sentis", progress=False)
    with pytest.raises(ExportError, match="--draft-weights goes with --layout ort"):
        export_onnx(tiny_model_dir, tmp_path, draft_weights=True, progress=False)
    with pytest.raises(ExportError, match="multiple of 16, this model's is 8; use --layout portable"):
        export_onnx(tiny_pair_dirs[1], tmp_path, layout="ort", progress=False)
    assert main(["export-onnx", "--model", str(tmp_path / "absent"), "-o", str(tmp_path / "out")]) == 2
    assert "model folder not found" in capsys.readouterr().err


@pytest.mark.skipif(not cuda_usable(), reason="needs onnxruntime-gpu with a CUDA device")
def test_cuda_provider_keeps_the_cache_on_the_device_and_matches(tiny_model_dir, export):
    ort_model = OnnxModel(export(tiny_model_dir), "cuda")
    cache = KVCache(ort_model.args, 3, 256, ort_model.device, torch.float32)
    got = run_steps(ort_model, cache)
    expected = run_steps(load_model(tiny_model_dir), KVCache(ort_model.args, 3, 256, "cpu", torch.float32))
    assert all(g.device.type == "cuda" for g in got) and cache.k.device.type == "cuda"
    for e, g in zip(expected, got):
        assert torch.allclose(g.cpu(), e, atol=1e-4, rtol=0)


def test_feature_head_needs_an_export_with_hidden_states(tiny_model_dir, export, tmp_path):
    from npc_engine.head import FeatureHead, head_args, save_head
    from npc_engine.loading import load_model

    save_head(FeatureHead(head_args(load_model(tiny_model_dir).args)), tmp_path / "head", target_name="tiny")
    fix = "re-export with `npc-engine export-onnx --layout ort --draft-weights`"
    with pytest.raises(ValueError, match=f"hidden states, which this export lacks; {fix}"):
        Engine.load(export(tiny_model_dir), draft=str(tmp_path / "head"))
    with pytest.raises(ValueError, match=f"draft_weights.safetensors, which this export lacks; {fix}"):
        Engine.load(export(tiny_model_dir, layout="ort"), draft=str(tmp_path / "head"))
    save_head(FeatureHead(head_args(load_model(tiny_model_dir).args), feature_layers=(0, 1)), tmp_path / "layers",
              target_name="tiny")
    with pytest.raises(CheckpointError, match="export outputs layers last: re-export with .* --feature-layers 0,1"):
        Engine.load(export(tiny_model_dir, layout="ort", draft_weights=True), draft=str(tmp_path / "layers"))
    with pytest.raises(ValueError, match="--feature-layers goes with --layout ort"):
        export_onnx(tiny_model_dir, tmp_path / "x", progress=False, feature_layers=(0, 1))
    with pytest.raises(ValueError, match="two or more increasing layer indices"):
        export_onnx(tiny_model_dir, tmp_path / "x", progress=False, layout="ort", feature_layers=(1, 0))
    with pytest.raises(ValueError, match="a draft tree runs the torch backend's forward"):
        Engine.load(export(tiny_model_dir, layout="ort", draft_weights=True), draft=str(tmp_path / "head"),
                    draft_tree=TreeShape(2, 4))


@pytest.mark.parametrize("weights,max_abs,max_kl,layout", [("int8", 0.5, 0.005, "portable"),
                                                            ("int4", 6.0, 0.3, "portable"), ("int4", 6.0, 0.3, "ort")])
def test_weight_only_quantized_export_stays_near_float32(tmp_path, weights, max_abs, max_kl, layout):
    """--weights int8/int4 on the embedded target: every linear layer (7 per decoder layer and the output head;
    `--layout ort`: q/k/v and gate/up one each) becomes MatMulNBits, and prefill logits of the persona prompts stay
    within the stated tolerance of the float32 model (logits' standard deviation about 3.4): the largest |difference|
    and the mean KL(float32 || quantized) per prompt. Block-32 int4 on this 256-wide model moves logits a lot: int8 is
    the safe choice there."""
    target_dir = EMBEDDED / "npc-target"
    out = tmp_path / weights
    export_onnx(target_dir, out, progress=False, weights=weights, layout=layout)
    assert json.loads((out / "manifest.json").read_text())["weights"] == weights
    ops = [node.op_type for node in onnx.load(str(out / "model.onnx")).graph.node]
    torch_model, ort_model = load_model(target_dir), OnnxModel(out)
    per_layer = 7 if layout == "portable" else 4
    assert ops.count("MatMulNBits") == per_layer * torch_model.args.n_layers + 1
    assert ops.count("GroupQueryAttention") == (layout == "ort") * torch_model.args.n_layers
    tokenizer = Tokenizer.from_dir(target_dir)
    for text in PROMPTS:
        ids = torch.tensor([tokenizer.encode(text)])
        pos = torch.arange(ids.shape[1])[None]
        expected, got = (m(ids, pos, KVCache(m.args, 1, 256, "cpu", torch.float32), torch.tensor([0]), 256)
                         for m in (torch_model, ort_model))
        kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1).mean()
        assert (got - expected).abs().max() <= max_abs and kl <= max_kl, (text, (got - expected).abs().max(), kl)
