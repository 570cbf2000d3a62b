"""The engine on CUDA: graph replay equals eager, fused kernels equal the PyTorch path, FP8 stays close to bf16."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from npc_engine.drafters import HeadDrafter, ModelDrafter, NgramDrafter, NoDrafter  # noqa: E402
from npc_engine.engine import Engine  # noqa: E402
from npc_engine.engine.policy import DRAFT_LENGTHS  # noqa: E402
from npc_engine.fusion import fuse_projections_  # noqa: E402
from npc_engine.head import FeatureHead, head_args  # noqa: E402
from npc_engine.loading import load_model  # noqa: E402
from npc_engine.model import KVCache  # noqa: E402
from npc_engine.quantize import quantize_fp8_  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402
from npc_engine.tokenizer import Tokenizer  # noqa: E402


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def prompts(tok):
    return [tok.encode(t) for t in ["<|persona|>I forge swords.<|eot|><|player|>Hi<|eot|><|npc|>", "Once upon a time",
                                    "The tavern is warm. The tavern is warm. The tavern", "What"]]


def make_drafter(kind, target, draft_dir):
    """A drafter on CUDA; the feature head is random (seeded: the same weights in every engine of a test)."""
    if kind == "head":
        torch.manual_seed(0)
        head = FeatureHead(head_args(target.args)).to("cuda").eval().requires_grad_(False)
        return HeadDrafter(head, target, 9, 1024, "cuda", torch.float32)
    return {"none": NoDrafter, "ngram": lambda: NgramDrafter(target.args.vocab_size, "cuda"),
            "model": lambda: ModelDrafter(load_model(draft_dir, "cuda", torch.float32), 9, 1024, "cuda", torch.float32)
            }[kind]()


def run(engine, prompt_ids, params):
    out = {}
    for i, p in enumerate(prompt_ids):
        engine.submit(str(i), p, params)
        out[str(i)] = []
    while engine.has_work():
        for ev in engine.step():
            out[ev.rid] += ev.token_ids
    return [out[str(i)] for i in range(len(prompt_ids))]


@pytest.mark.parametrize("temperature,k", [(0, 4), (0, None), (0.8, 4)],
                         ids=["greedy-k4", "greedy-adaptive", "sampled-k4"])
@pytest.mark.parametrize("drafter", ["none", "ngram", "model", "head"])
def test_graph_replay_and_fused_kernels_equal_eager(tiny_pair_dirs, drafter, temperature, k):
    """Greedy steps replay one graph for the whole speculative step; sampled ones replay forwards."""
    target_dir, draft_dir = tiny_pair_dirs
    tok = Tokenizer.from_dir(target_dir)
    params = SamplingParams(temperature=temperature, seed=11, max_tokens=24)
    results = []
    for graphs, fused in [(False, False), (True, False), (True, True)]:
        target = load_model(target_dir, "cuda", torch.float32)
        d = make_drafter(drafter, target, draft_dir)
        engine = Engine(target, d, tok, "cuda", max_batch=8, cuda_graphs=graphs, fused_kernels=fused, fixed_k=k)
        results.append(run(engine, prompts(tok), params))
    assert results[1] == results[0], "CUDA-graph replay differs from eager"
    if temperature == 0:  # sampled tokens may flip where fused and PyTorch logits differ in the last bits
        assert results[2] == results[0], "fused kernels differ from the PyTorch path"


@pytest.mark.parametrize("drafter", ["none", "ngram", "model", "head"])
def test_captured_graphs_serve_every_step(tiny_pair_dirs, drafter):
    """After capture_graphs, greedy and sampled lines with adaptive K capture nothing more, and greedy lines
    give the same tokens as an engine that captured as it went (sampled tokens may differ with K)."""
    target_dir, draft_dir = tiny_pair_dirs
    tok = Tokenizer.from_dir(target_dir)
    results = []
    for precapture in (False, True):
        target = load_model(target_dir, "cuda", torch.float32)
        d = make_drafter(drafter, target, draft_dir)
        engine = Engine(target, d, tok, "cuda", max_batch=8)
        forwards = [engine.fw.forward] + ([d.forward] if drafter == "model" else [])
        if precapture:
            assert engine.capture_graphs(range(1, 9)) > 0
            if drafter != "none":  # the policy starts from the replay time of every drafted step it may take
                assert {(b, k) for b in (1, 2, 4, 8) for k in DRAFT_LENGTHS} <= engine.policy.step_seconds.keys()
        counts = [len(f.graphs) for f in forwards] + [len(engine.fw.greedy_step.graphs)]
        out = [run(engine, prompts(tok), SamplingParams(temperature=t, seed=3, max_tokens=40)) for t in (0, 0.8)]
        if precapture:
            assert [len(f.graphs) for f in forwards] + [len(engine.fw.greedy_step.graphs)] == counts
        results.append(out[0])
    assert results[1] == results[0]


def test_streamed_prompt_with_graphs_equals_one_shot(tiny_pair_dirs):
    target_dir, draft_dir = tiny_pair_dirs
    tok = Tokenizer.from_dir(target_dir)
    params = SamplingParams(temperature=0, max_tokens=16)
    text = ("<|persona|>I forge swords for the guard.<|eot|><|player|>Which blade for the northern woods at night, "
            "smith?")
    full = tok.encode(text + "<|eot|><|npc|>")
    engines = [Engine(load_model(target_dir, "cuda", torch.float32),
                      ModelDrafter(load_model(draft_dir, "cuda", torch.float32), 9, 1024, "cuda", torch.float32),
                      tok, "cuda", max_batch=8) for _ in range(2)]
    expected = run(engines[0], [full], params)[0]
    engine = engines[1]
    words = text.split(" ")
    engine.submit("0", tok.encode(words[0]), params, complete=False)
    for i in range(2, len(words) + 1):
        engine.update_prompt("0", tok.encode(" ".join(words[:i])), complete=False)
        assert engine.step() == []
    engine.update_prompt("0", full, complete=True)
    got = []
    while engine.has_work():
        got += [t for ev in engine.step() for t in ev.token_ids]
    assert got == expected


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_fused_logits_match_torch_path(tiny_model_dir, dtype, bound):
    """The torch path runs the checkpoint as loaded; the fused path has its norm weights folded into the projections
    (the tiny checkpoint's norm weights are random, not 1)."""
    torch_path = load_model(tiny_model_dir, "cuda", dtype)
    assert not bool((torch_path.model.layers[0].input_layernorm.weight == 1).all())
    fused_path = fuse_projections_(load_model(tiny_model_dir, "cuda", dtype))
    tokens = torch.randint(0, torch_path.args.vocab_size, (3, 40), device="cuda")
    pos = torch.arange(40, device="cuda").expand(3, -1)
    slots = torch.tensor([2, 0, 1], device="cuda")
    outs = []
    for fused, model in ((False, torch_path), (True, fused_path)):
        model.fused = fused
        cache = KVCache(model.args, 3, 128, "cuda", dtype)
        prefill = model(tokens[:, :33], pos[:, :33], cache, slots, 64)
        verify = model(tokens[:, 33:], pos[:, 33:], cache, slots, 64)
        outs.append(torch.cat([prefill, verify], 1))
    assert rel_err(outs[1], outs[0]) <= bound


def test_one_row_decode_through_the_gemv_matches_torch_path(tiny_model_dir):
    """bf16 decode steps of one row take kernels.linear's small-M Triton kernel on the fused path (norms inside it,
    residual adds and silu(gate) * up in its epilogue), against the unfolded checkpoint on the torch path."""
    torch_path = load_model(tiny_model_dir, "cuda", torch.bfloat16)
    fused_path = fuse_projections_(load_model(tiny_model_dir, "cuda", torch.bfloat16))
    tokens = torch.randint(0, torch_path.args.vocab_size, (1, 24), device="cuda")
    slots = torch.tensor([1], device="cuda")
    outs = []
    for fused, model in ((False, torch_path), (True, fused_path)):
        model.fused = fused
        cache = KVCache(model.args, 2, 128, "cuda", torch.bfloat16)
        model(tokens[:, :16], torch.arange(16, device="cuda")[None], cache, slots, 64, logits=False)
        outs.append(torch.cat([model(tokens[:, t:t + 1], torch.full((1, 1), t, device="cuda"), cache, slots, 64)
                               for t in range(16, 24)], 1))
    assert rel_err(outs[1], outs[0]) <= 2e-2


def test_fp8_logits_close_to_bf16(tiny_model_dir):
    """Bound: relative L2 error of the logits <= 0.1 (e4m3 has a 3-bit mantissa: about 6% per weight)."""
    ref = load_model(tiny_model_dir, "cuda", torch.bfloat16)
    fp8 = quantize_fp8_(load_model(tiny_model_dir, "cuda", torch.bfloat16))
    tokens = torch.randint(0, ref.args.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        err = rel_err(fp8(tokens), ref(tokens))
    assert err <= 0.1, err


def test_fp8_fused_steps_close_to_bf16(tiny_model_dir):
    """FP8 weights through the fused path (small-M kernel for a 16-token chunk, one-row steps and a 5-row
    verify; cuBLAS-free): relative L2 error of the logits against the bf16 model <= 0.1, as above."""
    ref = load_model(tiny_model_dir, "cuda", torch.bfloat16)
    fp8 = fuse_projections_(quantize_fp8_(load_model(tiny_model_dir, "cuda", torch.bfloat16)))
    fp8.fused = True
    tokens = torch.randint(0, ref.args.vocab_size, (1, 22), device="cuda")
    pos, slots = torch.arange(22, device="cuda")[None], torch.tensor([0], device="cuda")
    cache = KVCache(fp8.args, 1, 64, "cuda", torch.bfloat16)
    with torch.no_grad():
        got = [fp8(tokens[:, :16], pos[:, :16], cache, slots, 64)]
        got += [fp8(tokens[:, t:t + 1], pos[:, t:t + 1], cache, slots, 64) for t in (16, 17)]
        got.append(fp8(tokens[:, 18:], pos[:, 18:], cache, slots, 64))
        err = rel_err(torch.cat(got, 1), ref(tokens))
    assert err <= 0.1, err


@pytest.mark.parametrize("drafter", ["none", "ngram", "model", "head"])
def test_shared_persona_prefix_with_graphs_and_fused_kernels_equals_unshared_eager(tiny_pair_dirs, drafter):
    """Conversations reading one persona from a prefix slot (graph replays; the fused attention picks the slot per
    key) give the greedy lines of eager runs without sharing; the persona is prefilled once per engine."""
    target_dir, draft_dir = tiny_pair_dirs
    tok = Tokenizer.from_dir(target_dir)
    params = SamplingParams(temperature=0, max_tokens=24)
    persona = tok.encode("<|persona|>I forge swords for the town guard and I never lie about steel.<|eot|>")
    lines = ["<|player|>Hi<|eot|><|npc|>", "<|player|>What do you sell?<|eot|><|npc|>",
             "<|player|>Which blade for the northern woods at night?<|eot|><|npc|>"]
    prompts = [persona + tok.encode(line) for line in lines]

    def make(graphs, fused):
        target = load_model(target_dir, "cuda", torch.float32)
        d = make_drafter(drafter, target, draft_dir)
        return Engine(target, d, tok, "cuda", max_batch=8, cuda_graphs=graphs, fused_kernels=fused, fixed_k=4)

    expected = run(make(False, False), prompts, params)
    assert any(expected)
    for graphs, fused in [(False, False), (True, False), (True, True)]:
        engine = make(graphs, fused)
        for wave in range(2):
            out = {str(i): [] for i in range(len(prompts))}
            for i, p in enumerate(prompts):
                engine.submit(str(i), p, params, prefix_len=len(persona))
            while engine.has_work():
                for ev in engine.step():
                    out[ev.rid] += ev.token_ids
            got = [out[str(i)] for i in range(len(prompts))]
            assert got == expected, f"graphs {graphs}, fused {fused}, wave {wave}"
        (entry,) = engine.prefix_cache.entries.values()
        assert entry.refs == 0 and engine.prefix_cache.hits == 2 * len(prompts) - 1


@pytest.mark.parametrize("k", [3, None], ids=["depth3", "adaptive"])
def test_draft_tree_steps_in_graphs_keep_greedy_lines(tiny_pair_dirs, k):
    """Tree steps, eager and replayed from CUDA graphs (pipelined), on the unfused forward and on the fused one (the
    Triton rope kernel writing each node at its tree position, the attention kernel under the tree mask) give plain
    greedy lines. The head is random, so few drafts are accepted; tests/test_trees.py plants accepted paths on the CPU
    (its planting reads the host)."""
    from npc_engine.engine.trees import TreeShape

    target_dir, draft_dir = tiny_pair_dirs
    tok = Tokenizer.from_dir(target_dir)
    params = SamplingParams(temperature=0, max_tokens=32)
    plain = run(Engine(load_model(target_dir, "cuda", torch.float32), NoDrafter(), tok, "cuda", max_batch=8,
                       fused_kernels=False), prompts(tok), params)
    for graphs, fused in [(False, False), (True, False), (False, True), (True, True)]:
        target = load_model(target_dir, "cuda", torch.float32)
        engine = Engine(target, make_drafter("head", target, draft_dir), tok, "cuda", max_batch=8, cuda_graphs=graphs,
                        fused_kernels=fused, fixed_k=k, draft_tree=TreeShape(3, 8))
        assert target.fused == fused
        engine.capture_graphs(range(1, 5))
        assert run(engine, prompts(tok), params) == plain, f"graphs {graphs}, fused {fused}"
        assert not graphs or engine.fw.greedy_step.graphs  # the tree steps replayed graphs


def test_draft_trees_run_the_fused_forward_by_default(tiny_pair_dirs):
    """An engine with a draft tree on CUDA takes the fused kernels and CUDA graphs, as one without does."""
    from npc_engine.engine.trees import TreeShape

    target_dir, draft_dir = tiny_pair_dirs
    target = load_model(target_dir, "cuda", torch.float32)
    engine = Engine(target, make_drafter("head", target, draft_dir), Tokenizer.from_dir(target_dir), "cuda",
                    max_batch=2, draft_tree=TreeShape(3, 8))
    assert engine.target.fused and engine.graphed
