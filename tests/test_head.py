"""Feature head: input norms, and heads saved before them."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from npc_engine.head import FeatureHead, head_args, load_head, save_head
from npc_engine.loading import CheckpointError, load_model


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
