"""Every way a model folder can be wrong gets its own clear error."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from npc_engine.loading import CheckpointError, load_model, save_model
from npc_engine.tokenizer import Tokenizer


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dest = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dest)
    return dest


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_missing_config(model_copy):
    (model_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_model(model_copy)


def test_missing_weights(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load_model(model_copy)


def test_missing_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        Tokenizer.from_dir(model_copy)


def test_unsupported_architecture(model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(model_copy)


def test_shape_mismatch_names_the_tensor(model_copy):
    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 64)
    save_file(weights, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(7, 64\)"):
        load_model(model_copy)


def test_unsupported_dtype_names_the_tensor(model_copy):
    weights = load_file(model_copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int8)
    save_file(weights, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype torch.int8, not supported"):
        load_model(model_copy)


def test_missing_tensor(model_copy):
    weights = load_file(model_copy / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, model_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: model.layers.0.self_attn.k_proj.weight"):
        load_model(model_copy)


def test_save_shards_and_reload(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir)
    save_model(model, tmp_path / "sharded", dtype=torch.float32, max_shard_mb=0.05)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    reloaded = load_model(tmp_path / "sharded")
    tokens = torch.arange(10)[None]
    assert torch.equal(model(tokens), reloaded(tokens))


def test_feature_head_for_another_target_or_backend_is_refused(tiny_pair_dirs, tmp_path):
    from npc_engine.engine import Engine
    from npc_engine.head import FeatureHead, head_args, is_head_dir, load_head, save_head

    target_dir, other_dir = tiny_pair_dirs  # hidden sizes differ
    target = load_model(target_dir)
    head_dir = tmp_path / "head"
    save_head(FeatureHead(head_args(target.args)), head_dir, target_name=target_dir.name)
    assert is_head_dir(head_dir) and not is_head_dir(target_dir)
    assert load_head(head_dir, target, "cpu").fc.in_features == 2 * target.args.dim
    other = load_model(other_dir)
    with pytest.raises(CheckpointError, match=f"trained for a target with dim {target.args.dim}, this target has "
                                              f"{other.args.dim}"):
        load_head(head_dir, other, "cpu")
    with pytest.raises(CheckpointError, match="trained for a target with dim"):
        Engine.load(other_dir, draft=str(head_dir))
    state = load_file(head_dir / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != "fc.weight"}, head_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: fc.weight"):
        load_head(head_dir, target, "cpu")


def test_feature_head_folder_that_is_not_one_is_named(model_copy):
    from npc_engine.head import load_head

    with pytest.raises(CheckpointError, match="not a feature-head folder"):
        load_head(model_copy, load_model(model_copy), "cpu")


# ---------------------------------------------------------------- defaults that do not depend on the current folder

def test_default_voice_and_its_fallback(tmp_path, monkeypatch, capsys):
    from npc_engine import paths
    from npc_engine.cli.common import voice_args

    monkeypatch.setattr(paths, "BASE_GGUF", tmp_path / "base.gguf")
    monkeypatch.setattr(paths, "DEFAULT_ADAPTER", tmp_path / "adapter")
    assert paths.default_voice() == (paths.TINY_MODEL, None)
    assert "make model" in capsys.readouterr().err  # says how to fetch the real base
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    assert paths.default_voice() == (tmp_path / "base.gguf", None)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert voice_args(None, None) == (str(tmp_path / "base.gguf"), str(tmp_path / "adapter"))
    assert voice_args("m", None) == ("m", None) and voice_args(None, "a")[1] == "a"


def test_defaults_resolve_from_the_project_not_the_cwd(tmp_path, monkeypatch):
    from npc_engine.cli import build_parser
    from npc_engine.paths import PERSONAS_DIR, TINY_MODEL

    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    assert parser.parse_args(["serve"]).personas == str(PERSONAS_DIR) and PERSONAS_DIR.is_dir()
    assert parser.parse_args(["chat", "--npc", "host"]).personas == str(PERSONAS_DIR)
    assert parser.parse_args(["generate", "--prompt", "x"]).model == str(TINY_MODEL)
    assert (TINY_MODEL / "config.json").is_file()
