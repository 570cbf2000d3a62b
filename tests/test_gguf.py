"""GGUF import against transformers' own GGUF loading: small random files written with gguf.GGUFWriter
(quant types, both architectures, both tokenizer kinds), the real SmolLM2 file, and the errors."""
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import models, pre_tokenizers, trainers  # noqa: E402

from npc_engine.gguf_import import import_gguf  # noqa: E402
from npc_engine.loading import CheckpointError, load_model  # noqa: E402
from npc_engine.tokenizer import Tokenizer  # noqa: E402

SHAPE = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn=512)  # K-quants need rows of 256
CORPUS = ["The merchant sells spices, maps and charms from far away.", "Where is the harbour? Three weeks west.",
          "Don't touch the dragon's gold! It's cursed, 12345 times over.", "naïve café, 日本語 and émoji 🎉 too"] * 20
TEXTS = ["Hello world", " leading space and  two", "héllo wörld 日本語 🎉 ∑", "tabs\tand\nnew lines\n\n  end",
         "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "don't 12345 <think>x</think>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# (offset of each f16 scale field in a block) for the K-quants, whose blocks gguf cannot quantize: random bytes
# with sane scales stand in for them.
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def gpt2_vocab() -> tuple[list[str], list[int], list[str]]:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get) + ["<think>", "</think>"]
    types = [3 if t in specials else 4 if t.endswith("think>") else 1 for t in tokens]
    return tokens, types, [" ".join(m) for m in model["merges"]]


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, types, [0.0] * 259 + [-float(i) for i in range(len(pieces))]


def quantized(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype not in K_SCALES:
        return gguf.quants.quantize(w, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        scales = rng.uniform(1e-3, 1e-2, data.shape[:2]).astype(np.float16)
        data[..., offset:offset + 2] = scales[..., None].view(np.uint8)
    return data.reshape(w.shape[0], -1)


def write_gguf(path, arch="llama", qtype=Q.F32, tokenizer="gpt2", seed=0, chat_template=TEMPLATE, tensors=None,
               rope_freqs=None):
    rng = np.random.default_rng(seed)
    s = SHAPE
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(s["n_layers"])
    w.add_context_length(512)
    w.add_embedding_length(s["dim"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["n_heads"])
    w.add_head_count_kv(s["n_kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0 if rope_freqs is None else 500000.0)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.add_rope_dimension_count(s["dim"] // s["n_heads"])
    if tokenizer == "gpt2":
        tokens, types, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    else:
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if chat_template:
        w.add_chat_template(chat_template)
    hd, kv = s["dim"] // s["n_heads"], s["n_kv_heads"] * s["dim"] // s["n_heads"]
    shapes = {"token_embd.weight": (len(tokens), s["dim"]), "output_norm.weight": (s["dim"],),
              "output.weight": (len(tokens), s["dim"])}
    for i in range(s["n_layers"]):
        shapes.update({f"blk.{i}.attn_norm.weight": (s["dim"],), f"blk.{i}.ffn_norm.weight": (s["dim"],),
                       f"blk.{i}.attn_q.weight": (s["dim"], s["dim"]), f"blk.{i}.attn_k.weight": (kv, s["dim"]),
                       f"blk.{i}.attn_v.weight": (kv, s["dim"]), f"blk.{i}.attn_output.weight": (s["dim"], s["dim"]),
                       f"blk.{i}.ffn_gate.weight": (s["ffn"], s["dim"]), f"blk.{i}.ffn_up.weight": (s["ffn"], s["dim"]),
                       f"blk.{i}.ffn_down.weight": (s["dim"], s["ffn"])})
        if arch == "qwen2":
            shapes.update({f"blk.{i}.attn_q.bias": (s["dim"],), f"blk.{i}.attn_k.bias": (kv,),
                           f"blk.{i}.attn_v.bias": (kv,)})
    assert hd * s["n_heads"] == s["dim"]
    for name, shape in (tensors or shapes).items():
        x = (rng.standard_normal(shape) * (0.02 if len(shape) == 2 else 0.1) + (len(shape) == 1 and "norm" in name))
        x = x.astype(np.float32)
        if len(shape) == 1:
            w.add_tensor(name, x)
            continue
        data = quantized(x, qtype, rng)
        w.add_tensor(name, data, raw_shape=data.shape if data.dtype != np.uint8 else None,
                     raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def hf_reference():
    """(model, tokenizer) as transformers loads a GGUF file, cached per file."""
    cache = {}

    def load(path):
        if path not in cache:
            kw = dict(gguf_file=path.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
            cache[path] = model.eval(), transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
        return cache[path]

    return load


CASES = [("llama", q, "gpt2") for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                                        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)]
CASES += [("qwen2", Q.Q4_K, "gpt2"), ("qwen2", Q.F16, "gpt2"), ("llama", Q.Q8_0, "llama"), ("qwen2", Q.F32, "llama")]


@pytest.mark.parametrize("arch,qtype,tokenizer", CASES, ids=[f"{a}-{q.name}-{t}" for a, q, t in CASES])
def test_weights_and_logits_match_transformers(tmp_path, hf_reference, arch, qtype, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", arch, qtype, tokenizer)
    out = import_gguf(path, tmp_path / "hf")
    ref, _ = hf_reference(path)
    ours = load_model(out, dtype="float32")
    theirs = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name  # the same dequantized values, Q/K rows in the same order
    ids = torch.randint(0, ours.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-4, rtol=0)
    assert json.loads((out / "npc_engine.json").read_text())["prompt_format"] == "chat_template"


@pytest.mark.parametrize("arch,tokenizer", [("llama", "gpt2"), ("qwen2", "gpt2"), ("llama", "llama")])
def test_token_ids_match_transformers(tmp_path, hf_reference, arch, tokenizer):
    path = write_gguf(tmp_path / "m.gguf", arch, Q.F16, tokenizer)
    out = import_gguf(path, tmp_path / "hf")
    _, ref = hf_reference(path)
    ours = Tokenizer.from_dir(out)
    for text in TEXTS + [ref.bos_token + " x" if ref.bos_token else "x"]:
        ids = ref(text).input_ids
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE and config["eos_token"] == ref.eos_token
    folder = transformers.AutoTokenizer.from_pretrained(out)  # the written folder is a valid transformers tokenizer
    assert all(folder(text).input_ids == ref(text).input_ids for text in TEXTS)


def llama_cpp_rope_factors(theta, head_dim, factor, low, high, old):
    """llama.cpp's convert_hf_to_gguf.py: the rope_freqs tensor of a Llama 3.1+ model."""
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


def test_llama3_rope_factors_become_its_rope_scaling(tmp_path):
    hd = SHAPE["dim"] // SHAPE["n_heads"]
    factors = llama_cpp_rope_factors(500000.0, hd, 32.0, 1.0, 4.0, 8192)
    out = import_gguf(write_gguf(tmp_path / "m.gguf", rope_freqs=factors), tmp_path / "hf")
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
    base = 1.0 / 500000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    torch.testing.assert_close(load_model(out).inv_freq.double(), base / torch.from_numpy(factors), rtol=1e-5, atol=0)
    with pytest.raises(CheckpointError, match="rope_freqs"):
        import_gguf(write_gguf(tmp_path / "x.gguf", rope_freqs=factors[::-1].copy()), tmp_path / "x")


def test_gguf_model_path_converts_once_into_the_cache(tmp_path, monkeypatch):
    from npc_engine.paths import resolve_model

    monkeypatch.setenv("NPC_ENGINE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", qtype=Q.Q8_0)
    folder = resolve_model(path)
    assert folder.parent == tmp_path / "cache" and (folder / "tokenizer.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_model(str(path)) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert load_model(path).args.n_layers == SHAPE["n_layers"]
    assert resolve_model(tmp_path) == tmp_path  # a folder is its own model


def test_cache_dir_honours_xdg_and_override(tmp_path, monkeypatch):
    from npc_engine.paths import cache_dir

    monkeypatch.delenv("NPC_ENGINE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "npc-engine"
    monkeypatch.setenv("NPC_ENGINE_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"


def test_import_gguf_command(tmp_path):
    from npc_engine.cli import main

    path = write_gguf(tmp_path / "m.gguf", qtype=Q.Q4_0)
    assert main(["import-gguf", str(path), "-o", str(tmp_path / "out")]) == 0
    assert load_model(tmp_path / "out").args.dim == SHAPE["dim"]


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    data = path.read_bytes().replace(b"llama", b"gpt_x", 1)  # general.architecture is the first string written
    (tmp_path / "x.gguf").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"architecture 'gpt_x' not supported \(supported: llama, qwen2\)"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_unknown_quant_type(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    tensors = {"token_embd.weight": (300, 256)}
    path = write_gguf(tmp_path / "m.gguf", tensors=tensors)
    # rewrite the file with an IQ4_NL tensor, a type llama.cpp has and this importer does not
    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    r = gguf.GGUFReader(path)
    for name, f in r.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    w.add_tensor("token_embd.weight", np.zeros((300, 256 // block * size), np.uint8), raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"quant type IQ4_NL, not supported \(supported: F32, F16, BF16, Q8_0"):
        import_gguf(tmp_path / "iq.gguf", tmp_path / "out")


def test_command_errors_are_one_line(tmp_path, capsys):
    from npc_engine.cli import main

    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + bytes(40))
    assert main(["import-gguf", str(tmp_path / "bad.gguf"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.gguf" in err and "GGUF" in err


def test_truncated_file(tmp_path, monkeypatch):
    from npc_engine.paths import resolve_model

    monkeypatch.setenv("NPC_ENGINE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", qtype=Q.Q4_1)
    data = path.read_bytes()
    for size in (len(data) - 1000, 100, 3):
        (tmp_path / "t.gguf").write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated"):
            resolve_model(tmp_path / "t.gguf")
    assert not any((tmp_path / "cache").glob("*/config.json"))  # nothing half-converted is left to be loaded
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        resolve_model(tmp_path / "missing.gguf")


def test_real_smollm2_generate_matches_transformers(capsys):
    """The shipped default base: greedy 32 tokens through `npc-engine generate --model FILE.gguf`."""
    from npc_engine.cli import main
    from npc_engine.paths import BASE_GGUF, fetch_base_model

    try:
        path = fetch_base_model()
    except OSError as e:
        pytest.skip(f"{BASE_GGUF.name} could not be fetched ({e}); `make model` fetches it")
    prompt = "Once upon a time, in a small village by the sea, there lived"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--greedy", "--max-tokens", "32",
                 "--ids", "--draft", "none"]) == 0
    ours = [int(t) for t in capsys.readouterr().out.split()]
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:]
    assert len(ours) == 32 and ours == out.tolist()


