import torch

from npc_engine.drafters import NoDrafter
from npc_engine.engine import Engine
from npc_engine.loading import load_model
from npc_engine.sampling import SamplingParams, probs_from_logits, sample
from npc_engine.tokenizer import Tokenizer


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.2, 0.15, 0.1, 0.05]]]))
    top2 = probs_from_logits(logits, rows(1.0), torch.tensor([2]), rows(1.0))[0, 0]
    assert torch.allclose(top2, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    nucleus = probs_from_logits(logits, rows(1.0), torch.tensor([0]), rows(0.8))[0, 0]
    assert torch.allclose(nucleus, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    greedy = probs_from_logits(logits, rows(0.0), torch.tensor([0]), rows(1.0))[0, 0]
    assert greedy.tolist() == [1, 0, 0, 0, 0]


def test_inverse_cdf_sampling_never_picks_zero_probability_tokens():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0]).expand(10000, 5)
    picks = sample(probs, torch.rand(10000))
    assert set(picks.tolist()) == {1, 3}
    assert abs((picks == 3).float().mean().item() - 0.7) < 0.03
    assert sample(probs[:2], torch.tensor([0.999999, 0.0])).tolist() == [1, 3]  # u -> 1 - u: low mass first


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_model_dir):
    engine = Engine(load_model(tiny_model_dir), NoDrafter(), Tokenizer.from_dir(tiny_model_dir))
    prompt = engine.tokenizer.encode("<|player|>Hello there<|eot|><|npc|>")
    stop_free = SamplingParams(temperature=1.0, max_tokens=24, seed=7)
    runs = [list(engine.generate(prompt, stop_free, rid=f"r{i}")) for i in range(2)]
    other = list(engine.generate(prompt, SamplingParams(temperature=1.0, max_tokens=24, seed=8), rid="r3"))
    assert runs[0] == runs[1]
    assert runs[0] != other
