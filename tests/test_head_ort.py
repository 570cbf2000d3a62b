"""A feature head on ONNX Runtime (npc_engine.head_ort): the same predictions and draft logits as the PyTorch head on
the same cache, and beside an `ort` export the engine's greedy lines stay identical with its drafts."""
import pytest
import torch

from npc_engine.drafters import HeadDrafter
from npc_engine.engine import Engine
from npc_engine.head import load_head, save_head
from npc_engine.head_ort import OrtHead
from npc_engine.loading import load_model
from npc_engine.model import KVCache
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer
from tests.test_onnx import PROMPTS, export  # noqa: F401 (the export fixture)
from tests.test_speculative import random_head, run_batch


def steps(target, head, width: int):
    """A prefill of 9 positions and a refeed of 3 on stored features, then 3 single positions on predicted ones, for
    two rows in slots 1 and 2: (tokens, positions, features) per call."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, target.args.vocab_size, (2, 15), generator=gen)
    stored = 4 * torch.randn(2, 15, width, generator=gen)
    out = [(tokens[:, :9], torch.arange(9).expand(2, 9), stored[:, :9]),
           (tokens[:, 7:10], torch.arange(7, 10).expand(2, 3), stored[:, 7:10])]
    return out + [(tokens[:, i:i + 1], torch.full((2, 1), i), torch.randn(2, 1, head.args.dim, generator=gen))
                  for i in range(10, 13)]


@pytest.mark.parametrize("layers", [(), (0, 1)])
def test_the_head_graph_predicts_what_the_torch_head_predicts(tiny_model_dir, layers):
    """Float weights: within float32 rounding of FeatureHead.forward and its draft logits, on one cache that the
    PyTorch head filled for the first call (the two write the same key/value layout); int8 weights: near them."""
    target = load_model(tiny_model_dir)
    head = random_head(target, draft_ids=torch.arange(0, target.args.vocab_size, 3), feature_layers=layers)
    rows, norm = head.draft_rows(target), target.model.norm
    width = max(1, len(layers)) * target.args.dim
    caches = {name: KVCache(head.args, 3, 64, "cpu", torch.float32) for name in ("torch", "float", "int8")}
    runners = {name: OrtHead(head, rows, norm, name) for name in ("float", "int8")}
    slots = torch.tensor([1, 2])
    with torch.no_grad():
        for i, (tokens, pos, features) in enumerate(steps(target, head, width)):
            head_input = head.target_features(features) if features.shape[-1] != head.args.dim else features
            expected = head(target, tokens, head_input, pos, caches["torch"], slots, 64)
            expected_logits = head.draft_logits(target, expected[:, -1:])
            for name, run in runners.items():
                if i == 0:  # the PyTorch head's prefill, then the graph on its entries
                    head(target, tokens, head_input, pos, caches[name], slots, 64)
                    continue
                predicted, logits = run(target.model.embed_tokens(tokens), features, pos, caches[name], 1, 64)
                tolerance = 1e-4 if name == "float" else 0.05 * expected.abs().max()
                assert torch.allclose(predicted, expected, atol=tolerance), (name, i)
                tolerance = 1e-4 if name == "float" else 0.05 * expected_logits.abs().max()
                assert torch.allclose(logits, expected_logits, atol=tolerance), (name, i)
    assert torch.allclose(caches["float"].k, caches["torch"].k, atol=1e-5)


@pytest.mark.parametrize("layers", [(), (0, 1)])
def test_greedy_lines_are_identical_with_the_head_on_onnx_runtime(tiny_pair_dirs, export, layers, tmp_path):  # noqa: F811
    """Beside an `ort` export a reduced-vocabulary head drafts on ONNX Runtime (every draft chain and refeed of these
    prompts, batched and with persona prefixes): float weights propose the PyTorch head's very drafts, int8 weights
    (the default) other ones, and the lines stay those of the PyTorch target."""
    from tests.test_onnx import record_drafts

    target_dir = tiny_pair_dirs[0]
    target = load_model(target_dir)
    head_dir = tmp_path / "head"
    save_head(random_head(target, draft_ids=torch.arange(0, target.args.vocab_size, 2), feature_layers=layers),
              head_dir, target_name="tiny", dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(target_dir)
    torch_engine = Engine(target, HeadDrafter(load_head(head_dir, target, "cpu"), target, 5, 512, "cpu",
                                              torch.float32), tokenizer, max_batch=4, max_seq=512, fixed_k=4)
    onnx_dir = export(target_dir, layout="ort", draft_weights=True, **({"feature_layers": layers} if layers else {}))
    int8 = Engine.load(onnx_dir, draft=str(head_dir), backend="onnx", max_batch=4, max_seq=512, fixed_k=4)
    floats = HeadDrafter(int8.drafter.model, int8.target, 5, 512, "cpu", torch.float32, ort_weights="float")
    engines = {"torch": torch_engine, "float": Engine(int8.target, floats, tokenizer, max_batch=4, max_seq=512,
                                                      fixed_k=4), "int8": int8}
    proposed, ort_calls = {name: [] for name in engines}, {name: 0 for name in engines}
    for name, engine in engines.items():
        engine.drafter.draft = record_drafts(engine.drafter.draft, proposed[name])
        if engine.drafter.ort is not None:
            call = engine.drafter.ort.__call__

            def counted(*args, name=name, call=call):
                ort_calls[name] += 1
                return call(*args)
            engine.drafter.ort = counted
    params = SamplingParams(temperature=0, max_tokens=16)
    lines = {name: [run_batch(engine, PROMPTS, params), run_batch(engine, PROMPTS[:1], params)]
             for name, engine in engines.items()}
    assert lines["float"] == lines["int8"] == lines["torch"] and any(lines["torch"][0])
    assert ort_calls["torch"] == 0 and ort_calls["float"] > len(proposed["float"]) and ort_calls["int8"] > 0
    assert proposed["float"] == proposed["torch"] != proposed["int8"]
