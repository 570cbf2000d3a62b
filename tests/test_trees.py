"""Draft trees (npc_engine.engine.trees): the step accepts exactly the target's greedy path through the tree, moves
its cache entries to the line's positions, and greedy lines equal plain decoding's whatever the tree holds."""
import argparse

import pytest
import torch

from kernels.prefix import prefix_rows
from npc_engine.cli.common import parse_draft_tree
from npc_engine.drafters import DraftTree, HeadDrafter, NgramDrafter
from npc_engine.engine import Engine, rows
from npc_engine.engine.trees import TreeShape, ancestors, greedy_tree_step, path_nodes
from npc_engine.fusion import fuse_projections_
from npc_engine.loading import load_model
from npc_engine.model import KVCache, TreeStep
from npc_engine.sampling import SamplingParams
from npc_engine.tokenizer import Tokenizer
from test_speculative import PROMPTS, make_engine, random_head, run_batch


class PlantedTree(HeadDrafter):
    """A feature head's tree with the target's own greedy continuation planted along the path to its deepest node,
    so steps accept several tokens; the other nodes stay the head's (none equal to a planted sibling)."""

    def __init__(self, *args, lines: list[list[int]]):
        super().__init__(*args)
        self.lines, self.planted = lines, 0  # planted: drafts on planted paths (each step accepts its path)

    def draft_tree(self, last, lengths, slots, width, depth, nodes, kv_len, prefix, stale=None):
        tree = super().draft_tree(last, lengths, slots, width, depth, nodes, kv_len, prefix, stale)
        for b in range(len(last)):
            pos = torch.arange(int(lengths[b]) - 1)  # a shared persona prefix's tokens are in its own slot
            seq = self.tokens[prefix_rows(slots[b:b + 1], pos[None], prefix[b:b + 1])[0], pos].tolist() + [int(last[b])]
            line = next((x for x in self.lines if x[:len(seq)] == seq), None)
            path, node = [], int(tree.depths[b].argmax()) + 1
            while node:
                path.insert(0, node)
                node = int(tree.parents[b, node - 1])
            if line is None or len(seq) + len(path) > len(line):
                continue
            for d, node in enumerate(path):
                true, siblings = line[len(seq) + d], tree.parents[b] == tree.parents[b, node - 1]
                tree.tokens[b] = torch.where(siblings & (tree.tokens[b] == true), (true + 1) % 97, tree.tokens[b])
                tree.tokens[b, node - 1] = true
            self.planted += len(path)
        return tree


def run_with_stats(engine: Engine, prompts: list[str], params: SamplingParams) -> tuple[list[list[int]], list]:
    """run_batch's lines, and each request's stats."""
    out, stats = {f"r{i}": [] for i in range(len(prompts))}, []
    for rid, text in zip(out, prompts):
        engine.submit(rid, engine.tokenizer.encode(text), params)
    while engine.has_work():
        for ev in engine.step():
            out[ev.rid] += ev.token_ids
            if ev.finished:
                stats.append(ev.stats)
    return list(out.values()), stats


def planted_engine(target_dir, lines, tree: TreeShape, **kwargs) -> Engine:
    target = load_model(target_dir)
    drafter = PlantedTree(random_head(target), target, 9, 1024, "cpu", torch.float32, lines=lines)
    return Engine(target, drafter, Tokenizer.from_dir(target_dir), max_batch=8, draft_tree=tree, **kwargs)


@pytest.mark.parametrize("tree,k", [(TreeShape(1, 4), 4), (TreeShape(3, 8), 3), (TreeShape(4, 16), 4),
                                    (TreeShape(4, 16), None)])
def test_greedy_lines_with_draft_trees_equal_plain_lines_at_every_batch_size(tiny_pair_dirs, tree, k):
    target_dir, _ = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=40)
    prompts = (PROMPTS * 2)[:8]
    plain = run_batch(make_engine(target_dir, "none"), prompts, params)
    tok = Tokenizer.from_dir(target_dir)
    lines = [tok.encode(p) + out for p, out in zip(prompts, plain)]
    for batch in (1, 3, 8):
        engine = planted_engine(target_dir, lines, tree, fixed_k=k)
        out, stats = run_with_stats(engine, prompts[:batch], params)
        assert out == plain[:batch]
        if k is not None:  # every planted path is accepted (a line's last step may stop inside one)
            accepted, steps = sum(s.accepted for s in stats), sum(s.target_forwards for s in stats)
            assert engine.drafter.planted >= accepted >= engine.drafter.planted - 4 * batch
            assert accepted >= 1.5 * steps
    # random heads alone (nothing planted), on the last layer and on both layers: their trees are mostly rejected,
    # the lines the same
    for kind in ("head", "head_layers"):
        assert run_batch(make_engine(target_dir, kind, fixed_k=k, draft_tree=tree), prompts, params) == plain


@pytest.mark.parametrize("tree,k", [(TreeShape(3, 8), 3), (TreeShape(4, 16), 4)])
def test_tree_steps_on_the_fused_forward_keep_the_lines(tiny_pair_dirs, tree, k):
    """The fused forward verifies the trees (on the CPU the kernels' PyTorch references, which check their inputs as
    the GPU kernels need them): every planted path accepted, the lines plain decoding's."""
    target_dir, _ = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=40)
    prompts = PROMPTS[:3]
    plain = run_batch(make_engine(target_dir, "none"), prompts, params)
    tok = Tokenizer.from_dir(target_dir)
    lines = [tok.encode(p) + out for p, out in zip(prompts, plain)]
    for batch in (1, 3):
        engine = planted_engine(target_dir, lines, tree, fixed_k=k, fused_kernels=True)
        assert engine.target.fused
        out, stats = run_with_stats(engine, prompts[:batch], params)
        assert out == plain[:batch]
        accepted, steps = sum(s.accepted for s in stats), sum(s.target_forwards for s in stats)
        assert engine.drafter.planted >= accepted >= engine.drafter.planted - 4 * batch
        assert accepted >= 1.5 * steps


def test_pipelined_tree_steps_keep_the_lines(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    params = SamplingParams(temperature=0, max_tokens=40)
    plain = run_batch(make_engine(target_dir, "none"), PROMPTS, params)
    tok = Tokenizer.from_dir(target_dir)
    lines = [tok.encode(p) + out for p, out in zip(PROMPTS, plain)]
    engine = planted_engine(target_dir, lines, TreeShape(3, 8), fixed_k=3, pipeline=True)
    out, stats = run_with_stats(engine, PROMPTS, params)
    assert out == plain
    assert sum(s.accepted for s in stats) >= engine.drafter.planted - 3 * len(PROMPTS) > 0


@pytest.mark.parametrize("fused", [False, True])
def test_tree_steps_over_a_shared_persona_prefix_keep_the_lines(tiny_pair_dirs, fused):
    """Rows reading their persona from a prefix slot: the head's refeed, the tree and the moved entries stay in each
    row's own slot (fused: the attention kernel's prefix and tree masks at once)."""
    target_dir, _ = tiny_pair_dirs
    tok = Tokenizer.from_dir(target_dir)
    persona = tok.encode(PROMPTS[0])
    prompts = [persona + tok.encode(line) for line in ("<|player|>Hi<|eot|><|npc|>", "<|player|>Who are you?<|eot|>")]
    params = SamplingParams(temperature=0, max_tokens=40)
    plain_engine = make_engine(target_dir, "none")
    plain = [list(plain_engine.generate(p, params, rid=str(i))) for i, p in enumerate(prompts)]
    engine = planted_engine(target_dir, [p + out for p, out in zip(prompts, plain)], TreeShape(3, 8), fixed_k=3,
                            fused_kernels=fused)
    out = {str(i): [] for i in range(len(prompts))}
    for rid, p in zip(out, prompts):
        engine.submit(rid, p, params, prefix_len=len(persona))
    while engine.has_work():
        for ev in engine.step():
            out[ev.rid] += ev.token_ids
    assert list(out.values()) == plain and engine.drafter.planted > 0
    assert engine.prefix_cache.hits >= 1


def tree_step(target, prompt: list[int], greedy: list[int]) -> tuple[list[int], KVCache, HeadDrafter]:
    """Prefills prompt, then one greedy tree step of depth 3 with greedy's first two tokens on one path of its tree:
    the result row, the cache and the drafter (which stored the path's tokens; the target its features)."""
    L = len(prompt)
    drafter = HeadDrafter(random_head(target), target, 2, 256, "cpu", torch.float32)
    cache = KVCache(target.args, 2, 256, "cpu", torch.float32)
    with torch.no_grad():
        target(torch.tensor([prompt[:-1]]), torch.arange(L - 1)[None], cache, torch.tensor([0]), 256, logits=False)
    g1, g2 = greedy[:2]
    wrong = [(g + 1) % target.args.vocab_size for g in greedy[:3]]
    # tree indices 1..6: 1 wrong@1, 2 g1@1, 3 g2 under the wrong node, 4 wrong under g1, 5 g2 under g1, 6 wrong under g2
    tree = DraftTree(torch.tensor([[wrong[0], g1, g2, wrong[1], g2, wrong[2]]]), torch.tensor([[0, 0, 1, 2, 2, 5]]),
                     torch.tensor([[1, 1, 2, 2, 2, 3]]))
    drafter.draft_tree = lambda *args: tree
    packed = torch.tensor([rows.pack(prompt, 0, 3, [0, 0], [], 0)])
    with torch.no_grad():
        out = greedy_tree_step(target, cache, drafter, packed, 3, 256, TreeShape(2, 6))[0].tolist()
    return out, cache, drafter


def greedy_after(target_dir, prompt: list[int]) -> list[int]:
    return list(make_engine(target_dir, "none").generate(prompt, SamplingParams(temperature=0, max_tokens=4)))


def test_a_tree_step_keeps_the_deepest_agreeing_path_and_moves_its_cache_entries(tiny_pair_dirs):
    """Against a plain cached run of the same tokens: the accepted count, the next token, and every layer's keys and
    values and the stored features at the accepted positions."""
    target_dir, _ = tiny_pair_dirs
    target = load_model(target_dir)
    prompt = Tokenizer.from_dir(target_dir).encode(PROMPTS[0])
    greedy = greedy_after(target_dir, prompt)
    (g1, g2, g3), L = greedy[:3], len(prompt)
    out, cache, drafter = tree_step(target, prompt, greedy)
    assert out[rows.ACCEPTED] == 2 and out[rows.NEXT_TOKEN] == g3 and out[rows.drafts(3)][:2] == [g1, g2]
    assert out[rows.carried(3)] == [g2, g3, L + 3]
    reference = KVCache(target.args, 1, 256, "cpu", torch.float32)
    target.feature_store, store = torch.zeros(1, 256, target.args.dim), target.feature_store
    with torch.no_grad():
        target(torch.tensor([prompt + [g1, g2]]), torch.arange(L + 2)[None], reference, torch.tensor([0]), 256,
               logits=False)
    span = slice(L - 1, L + 2)  # the last prompt token and the two accepted drafts
    assert torch.allclose(cache.k[:, 0, :, span], reference.k[:, 0, :, span], atol=1e-5)
    assert torch.allclose(cache.v[:, 0, :, span], reference.v[:, 0, :, span], atol=1e-5)
    assert torch.allclose(store[0, span], target.feature_store[0, span], atol=1e-5)
    assert drafter.tokens[0, L:L + 2].tolist() == [g1, g2]


def test_a_tree_step_on_the_fused_forward_equals_the_unfused_one(tiny_pair_dirs):
    """The fused forward (the kernels' references on the CPU: q and k rotated at each node's depth, the cache written
    at its tree position, attention under the tree mask; the norms folded into the projections) against the unfused
    one on the same tree: the same result row, and every layer's keys and values and the stored features over the
    prompt and the whole tree region (the accepted path moved, the other nodes left in place)."""
    target_dir, _ = tiny_pair_dirs
    prompt = Tokenizer.from_dir(target_dir).encode(PROMPTS[0])
    greedy = greedy_after(target_dir, prompt)
    targets = [load_model(target_dir), fuse_projections_(load_model(target_dir))]
    targets[1].fused = True
    (out, cache, drafter), (fused_out, fused_cache, fused_drafter) = (tree_step(t, prompt, greedy) for t in targets)
    assert fused_out == out and out[rows.ACCEPTED] == 2
    span = slice(0, len(prompt) + 6)  # the prompt and the six nodes past its last token
    assert torch.allclose(fused_cache.k[:, 0, :, span], cache.k[:, 0, :, span], atol=1e-5)
    assert torch.allclose(fused_cache.v[:, 0, :, span], cache.v[:, 0, :, span], atol=1e-5)
    assert torch.allclose(targets[1].feature_store[0, span], targets[0].feature_store[0, span], atol=1e-4)
    assert torch.equal(fused_drafter.tokens, drafter.tokens)


def test_tree_paths_and_ancestors():
    parents = torch.tensor([[0, 0, 1, 2, 2, 5]])
    depths = torch.tensor([[0, 1, 1, 2, 2, 2, 3]])
    seen = ancestors(parents, 3)
    assert seen[0, 6].nonzero().flatten().tolist() == [0, 2, 5, 6]
    assert seen[0, 3].nonzero().flatten().tolist() == [0, 1, 3]
    assert path_nodes(seen, depths, torch.tensor([6]), 3).tolist() == [[2, 5, 6]]
    assert path_nodes(seen, depths, torch.tensor([1]), 3).tolist() == [[1, 2, 3]]  # past the path: no-op moves
    assert path_nodes(seen, depths, torch.tensor([0]), 4).tolist() == [[1, 2, 3, 4]]


def test_draft_trees_are_refused_where_they_cannot_run(tiny_pair_dirs):
    target_dir, _ = tiny_pair_dirs
    target = load_model(target_dir)
    with pytest.raises(ValueError, match="feature-head drafter"):
        Engine(target, NgramDrafter(target.args.vocab_size, "cpu"), None, draft_tree=TreeShape(2, 4))
    head = HeadDrafter(random_head(target), target, 9, 1024, "cpu", torch.float32)
    with pytest.raises(ValueError, match="positions ahead"):
        Engine(target, head, None, draft_tree=TreeShape(8, 16), fixed_k=6)
    with pytest.raises(ValueError, match="deeper than its nodes"):
        Engine(target, head, None, draft_tree=TreeShape(2, 4), fixed_k=6)
    assert Engine(target, head, None, draft_tree=TreeShape(8, 16)).policy.lengths == (1, 2, 3, 4)  # 8 x 3 <= 32
    assert Engine(target, head, None, draft_tree=TreeShape(1, 3)).policy.lengths == (1, 2, 3)
    assert Engine(target, head, None, draft_tree=TreeShape(2, 4), fused_kernels=True).target.fused  # stays fused
    # the fused attention masks the step's own keys only: not the head's levels, whose regions are wider
    tokens, write = torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None]
    wide = TreeStep(write, torch.zeros(1, dtype=torch.long), torch.ones(1, 3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"visible must be \[B, T, T\]"):
        target(tokens, write, KVCache(target.args, 1, 64, "cpu", torch.float32), tree=wide)
    with pytest.raises(ValueError, match="WIDTH,NODES"):
        TreeShape.parse("4x16")
    with pytest.raises(ValueError, match="must be 1"):
        TreeShape(0, 4)
    assert TreeShape.parse("4,16") == TreeShape(4, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTH,NODES"):  # what --draft-tree reports
        parse_draft_tree("4x16")
