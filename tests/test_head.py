"""Feature head: input norms, heads saved before them, and the fused kernels' path."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from npc_engine.drafters import HeadDrafter
from npc_engine.engine import Engine
from npc_engine.fusion import fuse_projections_
from npc_engine.head import FeatureHead, head_args, load_head, save_head
from npc_engine.loading import CheckpointError, load_model
from npc_engine.model import KVCache


def drafted_features(head: FeatureHead, target) -> torch.Tensor:
    tokens = torch.arange(3, 11)[None]
    features = target.hidden_states(tokens, torch.arange(8)[None]) * 50  # the scale must not matter
    return head(target, tokens, features)


def test_input_norms_make_the_head_blind_to_the_feature_scale(tiny_model_dir):
    target = load_model(tiny_model_dir)
    torch.manual_seed(0)
    head = FeatureHead(head_args(target.args)).eval()
    tokens = torch.arange(3, 11)[None]
    features = target.hidden_states(tokens, torch.arange(8)[None])
    with torch.no_grad():
        assert torch.allclose(head(target, tokens, features), head(target, tokens, 300 * features), atol=1e-4)


def test_a_head_saved_before_input_norms_loads_and_drafts_as_trained(tiny_model_dir, tmp_path):
    target = load_model(tiny_model_dir)
    torch.manual_seed(0)
    old = FeatureHead(head_args(target.args), input_norms=False).eval()
    save_head(old, tmp_path / "old", target_name="t", dtype=torch.float32)
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["input_norms"]  # as written before the key existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert not any("norm" in k and "layer." not in k for k in load_file(tmp_path / "old" / "model.safetensors"))
    loaded = load_head(tmp_path / "old", target, "cpu", torch.float32)
    assert loaded.embed_norm is None
    with torch.no_grad():
        assert torch.equal(drafted_features(loaded, target), drafted_features(old, target))


def test_a_head_with_input_norms_round_trips(tiny_model_dir, tmp_path):
    target = load_model(tiny_model_dir)
    torch.manual_seed(0)
    head = FeatureHead(head_args(target.args)).eval()
    with torch.no_grad():
        head.feature_norm.weight.uniform_(0.5, 2.0)
    save_head(head, tmp_path / "new", target_name="t", dtype=torch.float32)
    assert json.loads((tmp_path / "new" / "config.json").read_text())["input_norms"] is True
    state = load_file(tmp_path / "new" / "model.safetensors")
    assert {"embed_norm.weight", "feature_norm.weight"} <= state.keys()
    loaded = load_head(tmp_path / "new", target, "cpu", torch.float32)
    with torch.no_grad():
        assert torch.equal(drafted_features(loaded, target), drafted_features(head, target))
    save_file({k: v for k, v in state.items() if k != "feature_norm.weight"}, tmp_path / "new" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: feature_norm.weight"):
        load_head(tmp_path / "new", target, "cpu")


def refeed_and_drafts(target, head: FeatureHead, prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The target and the head prefilled on prompt bar its last token, then the head's refeed (its predicted feature
    after the last token) and a chain of 4 greedy drafts."""
    drafter = HeadDrafter(head, target, 2, 256, "cpu", torch.float32)
    cache, slots, n = KVCache(target.args, 2, 256, "cpu", torch.float32), torch.tensor([0]), len(prompt)
    with torch.no_grad():
        target(torch.tensor([prompt[:-1]]), torch.arange(n - 1)[None], cache, slots, 256, logits=False)
        drafter.prefill(torch.tensor([prompt[:-1]]), torch.arange(n - 1)[None], slots, 256)
        lengths = torch.tensor([n])
        predicted, _ = drafter.refeed(torch.tensor([prompt[-1]]), lengths, slots, 256, None)
        drafts = drafter.greedy_drafts(torch.tensor([prompt[-2:]]), lengths, slots, 4, 256)
    return predicted, drafts[0].tolist()


def test_a_head_on_several_layers_drafts_from_the_stored_outputs_as_trained(tiny_model_dir, tmp_path):
    """A head on both layers' outputs: the target stores them side by side, the drafter's refeed predicts the feature
    the training-time forward (layer_features, target_features) predicts, and the head round-trips through its folder
    (config feature_layers, fuse and per-layer norms) drafting the same tokens."""
    target = load_model(tiny_model_dir)
    torch.manual_seed(0)
    head = FeatureHead(head_args(target.args), feature_layers=(0, 1)).eval()
    with torch.no_grad():
        for norm in head.layer_norms:
            norm.weight.uniform_(0.5, 2.0)
    prompt = [(7 * i + 3) % 97 for i in range(30)]
    predicted, drafts = refeed_and_drafts(target, head, prompt)
    assert target.feature_layers == (0, 1) and target.feature_store.shape[-1] == 2 * target.args.dim
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        _, stored = target.layer_features(tokens, torch.arange(len(prompt))[None], head.feature_layers)
        before = torch.nn.functional.pad(head.target_features(stored)[:, :-1], (0, 0, 1, 0))
        trained = head(target, tokens, before)[:, -1:]
    assert torch.allclose(predicted, trained, atol=1e-4)
    save_head(head, tmp_path / "layers", target_name="t", dtype=torch.float32)
    assert json.loads((tmp_path / "layers" / "config.json").read_text())["feature_layers"] == [0, 1]
    loaded = load_head(tmp_path / "layers", load_model(tiny_model_dir), "cpu", torch.float32)
    assert loaded.feature_layers == (0, 1)
    assert refeed_and_drafts(load_model(tiny_model_dir), loaded, prompt)[1] == drafts


@pytest.mark.parametrize("layers", [[1], [1, 0], [0, 2], "0,1"])
def test_a_head_with_unusable_feature_layers_is_refused(tiny_model_dir, tmp_path, layers):
    target = load_model(tiny_model_dir)
    save_head(FeatureHead(head_args(target.args), feature_layers=(0, 1)), tmp_path / "h", target_name="t")
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps({**config, "feature_layers": layers}))
    with pytest.raises(CheckpointError, match="feature_layers"):
        load_head(tmp_path / "h", target, "cpu")


@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("layers", [(), (0, 1)])
def test_the_fused_head_drafts_as_the_unfused_one(tiny_model_dir, reduced, layers):
    """On the fused kernels (their PyTorch references on the CPU: the input norms, the layer with its norms folded
    into fused projections, the refeed's 17 rows and the one-row drafts with the q/k/v + RoPE kernel, the draft
    vocabulary's logits) the head predicts the unfused head's features and drafts the same tokens."""
    prompt = [(7 * i + 3) % 97 for i in range(30)]
    runs = []
    for fused in (False, True):
        target = load_model(tiny_model_dir)
        torch.manual_seed(0)
        head = FeatureHead(head_args(target.args), torch.arange(0, 97, 2) if reduced else None,
                           feature_layers=layers).eval()
        if fused:
            fuse_projections_(target).fused = fuse_projections_(head).fused = True
        runs.append(refeed_and_drafts(target, head, prompt))
    (predicted, drafts), (fused_predicted, fused_drafts) = runs
    assert torch.allclose(fused_predicted, predicted, atol=1e-4) and predicted.abs().max() > 0.1
    assert fused_drafts == drafts


def test_the_engine_runs_a_feature_head_on_the_fused_kernels_with_its_target(tiny_model_dir):
    target = load_model(tiny_model_dir)
    head = FeatureHead(head_args(target.args)).eval()
    drafter = HeadDrafter(head, target, 3, 256, "cpu", torch.float32)
    Engine(target, drafter, None, max_batch=2, max_seq=256, fused_kernels=True)
    assert target.fused and head.fused and head.layer.self_attn.qkv is not None and head.layer.mlp.gate_up is not None
    Engine(target, drafter, None, max_batch=2, max_seq=256, fused_kernels=False)
    assert not target.fused and not head.fused
