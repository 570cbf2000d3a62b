"""Header mask cost: llguidance vs xgrammar on our tokenizers (the choice behind npc_engine/header.py).

For every persona in personas/ and every header its lists allow ([emotion] and [emotion|action]), each library's
matcher walks the header's tokens as a training line encodes them (both masks are compared: llguidance also refuses
non-canonical splits of text the grammar forces, xgrammar allows every split); timed per token: the mask fill (into each
library's int32 bitmask) and accepting the token. Also timed once per persona: building the grammar (compile and
matcher construction), and once per library: its import and the tokenizer preprocessing. Then the same walk through
npc_engine.header.HeaderMatcher.mask (the chosen library plus unpacking to a bool tensor).

--engine: the speed cost of the header on the CPU: the tiny pair (models/npc-target, its draft model, and plain
decoding) writes one line per persona (a player question, --new-tokens tokens at most, greedy and temperature 0.8)
with and without the header; tokens per second (header tokens count) and ms per line, best of --engine-repeats.

    pip install llguidance                           # the alternative measured (not a dependency)
    python benchmarks/bench_mask.py                  # tiny pair + SmolLM2 tokenizers
    python benchmarks/bench_mask.py --repeats 50
    python benchmarks/bench_mask.py --engine
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from npc_engine.grammar import header_grammar, with_header  # noqa: E402
from npc_engine.header import HeaderCompiler  # noqa: E402
from npc_engine.prompt import PromptPersona, Turn, build_prompt  # noqa: E402
from npc_engine.sampling import SamplingParams  # noqa: E402
from npc_engine.tokenizer import Tokenizer  # noqa: E402

SMOLLM2_GGUF = ROOT / "models" / "base" / "SmolLM2-135M-Instruct.Q4_1.gguf"  # `make model` fetches it


def smollm2_tokenizer_dir(source: Path, cache: Path) -> Path:
    """A folder with SmolLM2's tokenizer.json: `source` itself, or the tokenizer of a GGUF file converted once by
    transformers into `cache`."""
    if source.is_dir():
        return source
    if not (cache / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name).save_pretrained(cache)
        (cache / "config.json").write_text(json.dumps({"eos_token_id": 2}))  # <|im_end|>
    return cache


def persona_lists() -> list[tuple[str, list[str], list[str]]]:
    out = []
    for f in sorted((ROOT / "personas").glob("*.toml")):
        d = tomllib.loads(f.read_text())
        if d.get("emotions"):
            out.append((f.stem, d["emotions"], d.get("actions", [])))
    return out


def header_ids(tok: Tokenizer, emotions, actions) -> list[list[int]]:
    """The tokens of each header as the start of a training line encodes it (the text's tokens cut off)."""
    out = []
    for e in emotions:
        for a in [None, *actions]:
            ids = tok.encode(with_header("Hello.", e, a), add_special_tokens=False)
            out.append(ids[:len(ids) - len(tok.encode(" Hello.", add_special_tokens=False))])
    return out


def lark_grammar(emotions, actions) -> str:
    alt = lambda labels: " | ".join(json.dumps(x) for x in labels)  # noqa: E731
    return ('start: "[" emotion ' + ('("|" action)? ' if actions else "") + '"]"\n'
            f"emotion: {alt(emotions)}\n" + (f"action: {alt(actions)}\n" if actions else ""))


def import_seconds(module: str) -> float:
    """A fresh interpreter that has torch loaded already (as the engine has)."""
    code = f"import torch, time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


class Llg:
    name = "llguidance"

    def __init__(self, tok: Tokenizer, vocab_size: int):
        import llguidance
        import llguidance.torch as llt
        self.llg, self.llt = llguidance, llt
        self.tokenizer = llguidance.LLTokenizer(tok.tok.to_str(), n_vocab=vocab_size, eos_token=tok.stop_ids)
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)

    def matcher(self, emotions, actions):
        m = self.llg.LLMatcher(self.tokenizer, self.llg.LLMatcher.grammar_from_lark(lark_grammar(emotions, actions)))
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, m):
        self.llt.fill_next_token_bitmask(m, self.bitmask)

    def accept(self, m, t):
        assert m.consume_token(t), m.get_error()

    def reset(self, m):
        m.reset()

    def finished(self, m) -> bool:
        return m.is_stopped() and m.is_accepting()


class Xgr:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer, vocab_size: int):
        import xgrammar
        from transformers import PreTrainedTokenizerFast
        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok.tok),
                                                       vocab_size=vocab_size, stop_token_ids=tok.stop_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def matcher(self, emotions, actions):
        return self.xgr.GrammarMatcher(self.compiler.compile_grammar(header_grammar(emotions, actions)),
                                       terminate_without_stop_token=True)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bitmask, 0)

    def accept(self, m, t):
        assert m.accept_token(t)

    def reset(self, m):
        m.reset()

    def finished(self, m) -> bool:
        return m.is_terminated()


def bench_library(lib_cls, tok: Tokenizer, vocab_size: int, personas, repeats: int) -> dict:
    t0 = time.perf_counter()
    lib = lib_cls(tok, vocab_size)
    setup = time.perf_counter() - t0
    fill_us, accept_us, build_ms = [], [], []
    masks = []
    for _, emotions, actions in personas:
        t0 = time.perf_counter()
        m = lib.matcher(emotions, actions)
        build_ms.append((time.perf_counter() - t0) * 1e3)
        for ids in header_ids(tok, emotions, actions):
            for rep in range(repeats):
                lib.reset(m)
                for t in ids:
                    t0 = time.perf_counter()
                    lib.fill(m)
                    t1 = time.perf_counter()
                    lib.accept(m, t)
                    t2 = time.perf_counter()
                    fill_us.append((t1 - t0) * 1e6)
                    accept_us.append((t2 - t1) * 1e6)
                    if rep == 0:
                        masks.append(lib.bitmask[0].clone())
                assert lib.finished(m)
    return {"library": lib.name, "tokenizer_setup_s": round(setup, 3),
            "mask_us_median": round(statistics.median(fill_us), 2), "mask_us_mean": round(statistics.mean(fill_us), 2),
            "accept_us_median": round(statistics.median(accept_us), 2),
            "grammar_build_ms_median": round(statistics.median(build_ms), 2), "masks": masks, "n": len(fill_us)}


def bench_ours(tok: Tokenizer, vocab_size: int, personas, repeats: int) -> dict:
    """HeaderMatcher.mask: the chosen library's fill plus unpacking to a bool tensor [vocab]."""
    compiler = HeaderCompiler(tok, vocab_size)
    times = []
    for _, emotions, actions in personas:
        for ids in header_ids(tok, emotions, actions):
            for _ in range(repeats):
                m = compiler.matcher(emotions, actions)
                for t in ids:
                    t0 = time.perf_counter()
                    m.mask(vocab_size)
                    times.append((time.perf_counter() - t0) * 1e6)
                    m.accept(t)
    return {"header_matcher_mask_us_median": round(statistics.median(times), 2)}


def bench_engine(new_tokens: int, repeats: int) -> None:
    from npc_engine.engine import Engine

    personas = []
    for f in sorted((ROOT / "personas").glob("*.toml")):
        d = tomllib.loads(f.read_text())
        if d.get("emotions"):
            block = PromptPersona(d["name"], d.get("role", ""), d.get("facts", []), d.get("style", ""))
            personas.append((build_prompt(block, [Turn("player", "What can you tell me about this place?")]),
                             d["emotions"], d.get("actions", [])))
    print(f"\n## engine, CPU, torch threads 1: {len(personas)} lines of at most {new_tokens} tokens, "
          f"best of {repeats}")
    print("| drafter | temperature | header | tokens/s | ms/line | tokens/line |")
    print("| --- | --- | --- | --- | --- | --- |")
    for draft in ("auto", "none"):
        engine = Engine.load(ROOT / "models" / "npc-target", draft=draft, max_batch=1, max_seq=512)
        for temperature in (0.0, 0.8):
            for header in (False, True):
                best = None
                for _ in range(repeats):
                    tokens, t0 = 0, time.perf_counter()
                    for i, (prompt, emotions, actions) in enumerate(personas):
                        engine.submit(str(i), engine.tokenizer.encode(prompt),
                                      SamplingParams(temperature=temperature, max_tokens=new_tokens, seed=i),
                                      header=engine.header_matcher(emotions, actions) if header else None)
                        while engine.has_work():
                            tokens += sum(len(ev.token_ids) for ev in engine.step())
                    seconds = time.perf_counter() - t0
                    best = min(best or (seconds, tokens), (seconds, tokens))
                seconds, tokens = best
                name = "draft model" if draft == "auto" else "none"
                print(f"| {name} | {temperature} | {'yes' if header else 'no'} | {tokens / seconds:.0f} "
                      f"| {seconds / len(personas) * 1e3:.1f} | {tokens / len(personas):.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--smollm2", type=Path, default=SMOLLM2_GGUF,
                    help="SmolLM2's GGUF file, or a folder with its tokenizer.json")
    ap.add_argument("--smollm2-cache", type=Path, default=Path("/tmp/npc-engine-smollm2-tokenizer"))
    ap.add_argument("--engine", action="store_true", help="only the speed cost of the header in the engine")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--engine-repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.engine:
        return bench_engine(args.new_tokens, args.engine_repeats)
    personas = persona_lists()
    tokenizers = [("tiny pair (models/npc-target)", ROOT / "models" / "npc-target")]
    if args.smollm2.exists():
        tokenizers.append(("SmolLM2-135M", smollm2_tokenizer_dir(args.smollm2, args.smollm2_cache)))
    print(f"# bench_mask: {len(personas)} personas, torch threads 1, repeats {args.repeats}")
    print(f"import (torch loaded): llguidance {import_seconds('llguidance'):.3f} s, "
          f"xgrammar {import_seconds('xgrammar'):.3f} s")
    import llguidance  # noqa: F401 (imported before the setup timings below)
    import xgrammar  # noqa: F401
    for name, path in tokenizers:
        tok = Tokenizer.from_dir(path)
        vocab = tok.vocab_size
        rows = [bench_library(cls, tok, vocab, personas, args.repeats) for cls in (Llg, Xgr)]
        pairs = list(zip(rows[0]["masks"], rows[1]["masks"]))
        subset = all(torch.equal(a & b, a) for a, b in pairs)
        differ = sum(not torch.equal(a, b) for a, b in pairs)
        print(f"\n## {name}: vocabulary {vocab}, {len(pairs)} header tokens; llguidance's mask within "
              f"xgrammar's at every token: {subset}, smaller at {differ} (it allows only the canonical split of "
              f"forced text)")
        print("| library | mask µs/token (median) | mask µs (mean) | accept µs/token | grammar build ms "
              "| tokenizer setup s |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['library']} | {r['mask_us_median']} | {r['mask_us_mean']} | {r['accept_us_median']} "
                  f"| {r['grammar_build_ms_median']} | {r['tokenizer_setup_s']} |")
        print(f"npc_engine.header (xgrammar + bool unpack): {bench_ours(tok, vocab, personas, 3)}")


if __name__ == "__main__":
    main()
