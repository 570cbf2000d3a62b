import pytest
from transformers import PreTrainedTokenizerFast

from npc_engine.tokenizer import IncrementalDecoder, Tokenizer

TEXT = "<|persona|>I forge swords.<|eot|><|player|>Grüße, smith! 火🐉 ok?<|eot|><|npc|>"


@pytest.mark.parametrize("bos", [False, True])
def test_encoding_matches_transformers(make_checkpoint, bos):
    path = make_checkpoint("llama_gqa", bos=bos)
    ours = Tokenizer.from_dir(path).encode(TEXT)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))(TEXT)["input_ids"]
    assert ours == ref
    assert (ours[0] == 0) == bos  # the post-processor, not the engine, decides BOS


def test_incremental_decoding_never_emits_broken_utf8(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    text = "Grüße 火🐉 the dragon — ça va?"
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # multi-byte characters span several byte-level tokens


def test_stop_ids_include_end_of_turn(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    assert tok.eot_id in tok.stop_ids


def test_flush_releases_what_an_unfinished_stream_holds_back(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    ids = tok.encode("ok 🐉")
    decoder = IncrementalDecoder(tok)
    held = "".join(decoder.push(i) for i in ids[:-1])  # the dragon's last byte never arrives
    assert held == "ok " and decoder.flush() == "\ufffd"
    assert decoder.flush() == ""
