"""`npc-engine train` end to end on a small generated corpus (CPU, tiny config), plus its parts."""
import csv
import io
import json
import lzma
import random
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from npc_engine.loading import load_model
from npc_engine.prompt import SPECIAL_TOKENS, PromptPersona, Turn, training_text
from npc_engine.tokenizer import Tokenizer
from npc_engine.train import batches, loop
from npc_engine.train.books import clean_book, mine_dialogue
from npc_engine.train.cli import Log, main
from npc_engine.train.config import TINY
from npc_engine.train.data import persona_chat_examples, persona_qa_example, read_jsonl
from npc_engine.train.eval import adherent, generate, model_proposals, replay_speculation, topic_questions
from npc_engine.train.tokenizer import encode_conversations, load_tokenizer

WORDS = ("river stone lantern forest castle dragon meadow silver wander whisper ancient golden harbor tower "
         "valley shadow ember willow thunder marble crimson falcon orchard quiet bright hollow").split()
NAMES = ["Alda", "Borin", "Cressa", "Dunmore", "Elowen", "Fenwick"]
SHARED_PARAGRAPH = "This very paragraph is printed in every edition of the tales, word for word, as it was told."


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def fake_book(i: int, rng: random.Random) -> dict:
    paragraphs = ["Produced by Jane Doe and the Online Distributed Proofreading Team at http://www.pgdp.net",
                  f"THE TALE OF BOOK {i}", SHARED_PARAGRAPH]
    for j in range(36):
        kind = j % 4
        if kind == 0:
            paragraphs.append(f"{sentence(rng)} _{rng.choice(WORDS)}_ {sentence(rng)}\n{sentence(rng, 8)}")
        elif kind == 1:
            a, b = rng.sample(NAMES, 2)
            paragraphs.append(f'"{sentence(rng, 6)[:-1]}?" asked {a}.')
            paragraphs.append(f'"{sentence(rng, 7)[:-1]}," said {b}, "{sentence(rng, 5)}"')
        elif kind == 2:
            paragraphs.append(f"[Illustration: {sentence(rng, 4)}]\n\n{sentence(rng)} Zoë smiled — naïve café 🐉.")
        else:
            paragraphs.append(f"{NAMES[i % 6].upper()}. {sentence(rng, 9)}\n\n{NAMES[(i + 1) % 6].upper()}. "
                              f"[Aside.] {sentence(rng, 9)}")
    paragraphs.append("Transcriber's Notes:\n\nObvious punctuation errors repaired.")
    return {"pg": 1000 + i, "title": f"Book {i}", "author": "", "text": "\n\n".join(paragraphs)}


def fake_persona_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        personas = []
        for side in range(2):
            personas.append("\n".join([f"I work as a {rng.choice(['baker', 'teacher', 'nurse'])}.",
                                       f"I have a {rng.choice(['dog', 'cat', 'parrot'])} named {rng.choice(WORDS)}.",
                                       f"My favorite color is {rng.choice(['blue', 'green', 'red'])}.",
                                       f"I collect {rng.choice(WORDS)} stones number {2 * i + side}."]))
        turns = [f"User {1 + t % 2}: {sentence(rng, 7)}" for t in range(10)]
        if i % 3 == 0:
            turns[1] = "User 2: Hi, I'm [user 2's name]! Nice to meet you."
        if i % 5 == 0:
            turns[6] = "User 1: Hello [name], how are you?"
        rows.append({"user 1 personas": personas[0], "user 2 personas": personas[1],
                     "Best Generated Conversation": "\n".join(turns)})
    return rows


def write_corpus(root: Path) -> Path:
    rng = random.Random(0)
    (root / "books").mkdir(parents=True)
    (root / "dialogue").mkdir()
    with lzma.open(root / "books" / "books-00.jsonl.xz", "wt", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps(fake_book(i, rng), ensure_ascii=False) + "\n")
    write_persona_chat(root, rng)
    return root


def write_persona_chat(root: Path, rng: random.Random, n: int = 60) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["user 1 personas", "user 2 personas", "Best Generated Conversation"])
    writer.writeheader()
    writer.writerows(fake_persona_rows(rng, n))
    (root / "dialogue").mkdir(exist_ok=True)
    with lzma.open(root / "dialogue" / "Synthetic-Persona-Chat_valid.csv.xz", "wt", encoding="utf-8") as f:
        f.write(buf.getvalue())


def write_personas(root: Path) -> Path:
    root.mkdir()
    for pid, name in (("smith", "Brom"), ("healer", "Wren")):
        (root / f"{pid}.toml").write_text(
            f'id = "{pid}"\nname = "{name}"\nrole = "villager"\nfacts = ["I live in Harrowford."]\n'
            f'greeting = "Hello."\nfallback_lines = ["Hm."]\n')
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    paths = {"corpus": write_corpus(root / "corpus"), "work": root / "work", "out": root / "models",
             "personas": write_personas(root / "personas")}
    code = main(["--config", "tiny", "--device", "cpu", "--corpus", str(paths["corpus"]), "--work", str(paths["work"]),
                 "--out", str(paths["out"]), "--personas", str(paths["personas"]), "--seed", "0"])
    assert code == 0
    return paths


# ---------------------------------------------------------------- data preparation

def test_clean_book_removes_credits_notes_markers_and_underscores():
    text = ("Produced by A. Reader and the Online Distributed Proofreading Team\n\nCHAPTER I\n\n"
            "The _brave_ knight   rode\nout. [Illustration: A knight\non a horse] He sang.[12]\n\n"
            "[Footnote 3: an old song]\n\nThe end came." + "\n\nMore tale." * 40 +
            "\n\nTranscriber's Notes:\n\nTypos fixed.")
    paragraphs = clean_book(text)
    assert paragraphs[:3] == ["CHAPTER I", "The brave knight rode out. He sang.", "The end came."]
    joined = "\n".join(paragraphs)
    for junk in ("Produced", "Illustration", "Footnote", "_", "[12]", "Transcriber", "Typos", "  "):
        assert junk not in joined


def test_persona_chat_gives_both_roles_and_fills_or_cuts_placeholders():
    row = {"user 1 personas": "I am a farmer.\nI have a cow.", "user 2 personas": "I am a pilot.\nI love jazz.",
           "Best Generated Conversation": "User 1: Hi!\nUser 2: Hello, I'm [User 2's name].\nUser 1: I farm.\n"
                                          "User 2: I fly planes.\nUser 1: Bye [name]!\nUser 2: Bye!"}
    examples = persona_chat_examples(row)
    assert [e["persona"]["facts"] for e in examples] == [["I am a pilot.", "I love jazz."],
                                                          ["I am a farmer.", "I have a cow."]]
    npc2 = examples[0]
    name = npc2["persona"]["name"]
    assert npc2["turns"] == [["player", "Hi!"], ["npc", f"Hello, I'm {name}."], ["player", "I farm."],
                             ["npc", "I fly planes."]]  # cut before "[name]", ends on the NPC
    assert examples[1]["turns"][0] == ["npc", "Hi!"]
    assert not any("[" in t for e in examples for _, t in e["turns"])


def test_mine_dialogue_from_prose_and_plays():
    prose = ["The wolf met her on the path through the dark wood.", '"Where are you going?" asked the Wolf.',
             '"To my grandmother," said Red Riding Hood, "who lives in the wood."', "So they parted."]
    [c] = mine_dialogue(prose, 10)
    assert c["persona"]["name"] == "Red Riding Hood"
    assert c["persona"]["facts"] == ["The wolf met her on the path through the dark wood."]
    assert c["turns"] == [["player", "Wolf: Where are you going?"],
                          ["npc", "To my grandmother, who lives in the wood."]]
    play = ["MRS. ALVING. [Smiling.] You are home at last.", "OSWALD. Yes, mother.", "MRS. ALVING. Sit down."]
    [c] = mine_dialogue(play, 10)
    assert c["persona"]["name"] == "Oswald"
    assert c["turns"] == [["player", "Mrs. Alving: You are home at last."], ["npc", "Yes, mother."]]


# ---------------------------------------------------------------- the pipeline

def test_losses_decrease(run):
    stages = {s: json.loads((run["work"] / "stages" / f"{s}.json").read_text())
              for s in ("pretrain", "finetune", "distill", "head")}
    for name in ("pretrain", "distill", "head"):
        assert stages[name]["last_loss"] < stages[name]["first_loss"] - 0.1, name
    dev = stages["finetune"]["dev_history"]
    assert stages["finetune"]["dev_loss"] < dev[0][1]


def test_outputs_load_in_engine_and_transformers_with_matching_logits(run):
    transformers = pytest.importorskip("transformers")
    for name in ("npc-target", "npc-draft"):
        folder = run["out"] / name
        assert {"config.json", "tokenizer.json", "generation_config.json"} <= {f.name for f in folder.iterdir()}
        assert all(f.stat().st_size <= 15e6 for f in folder.glob("*.safetensors"))
        ours = load_model(folder, dtype=torch.float32)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokens = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
        assert diff <= 1e-4, (name, diff)
    tok = Tokenizer.from_dir(run["out"] / "npc-target")
    assert tok.stop_ids == sorted([tok.eot_id, tok.tok.token_to_id(SPECIAL_TOKENS[0])])
    hf_tok = transformers.AutoTokenizer.from_pretrained(run["out"] / "npc-target")
    prompt = "<|persona|>Name: Zoë\n- I sell café crème 🐉.<|eot|><|player|>Who are you?<|eot|><|npc|>"
    assert hf_tok.encode(prompt) == tok.encode(prompt)


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(run):
    tok = Tokenizer.from_dir(run["out"] / "npc-target")
    text = "Zoë's café — naïve 🐉 日本語\n  tabs\tand  spaces, \"quotes\" & ünïcödé!"
    assert tok.decode(tok.encode(text)) == text
    assert [tok.tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for special in SPECIAL_TOKENS:
        assert tok.encode(f"a{special}b")[1:-1] == [tok.tok.token_to_id(special)]


def test_conversations_encode_segment_by_segment_as_the_whole_prompt(run):
    tok = load_tokenizer(run["work"])
    records = read_jsonl(run["work"] / "data" / "conv_val.jsonl")[:5]
    encoded = encode_conversations(tok, records, workers=1)
    whole = [i for r in records for i in tok.encode(training_text(PromptPersona(**r["persona"]),
                                                                  [Turn(*t) for t in r["turns"]])).ids]
    assert encoded["ids"].tolist() == whole
    ids, mask = encoded["ids"], encoded["mask"].astype(bool)
    npc, eot, player = (tok.token_to_id(t) for t in ("<|npc|>", "<|eot|>", "<|player|>"))
    assert not mask[ids == npc].any() and mask[ids == eot].any() and not mask[ids == player].any()
    # exactly the NPC turns are learned: each masked run starts right after <|npc|> and ends on <|eot|>
    starts = np.flatnonzero(mask & ~np.roll(mask, 1))
    ends = np.flatnonzero(mask & ~np.roll(mask, -1))
    assert (ids[starts - 1] == npc).all() and (ids[ends] == eot).all()
    assert len(starts) == sum(s == "npc" for r in records for s, _ in r["turns"])


def test_held_out_books_and_personas_never_reach_training(run):
    data = run["work"] / "data"
    split = json.loads((data / "split.json").read_text())
    train_books = "\n".join(b["text"] for b in read_jsonl(data / "books_train.jsonl"))
    train_conv = read_jsonl(data / "conv_train.jsonl")
    train_text = train_books + "\n".join(t for c in train_conv for _, t in c["turns"])
    val_books = read_jsonl(data / "books_val.jsonl")
    assert split["books_val"] >= 1 and len(val_books) == split["books_val"]
    for book in val_books:
        assert str(book["pg"]) in split["val_books"]
        for paragraph in book["text"].split("\n"):
            if len(paragraph) >= 40:
                assert paragraph not in train_text
    assert SHARED_PARAGRAPH not in train_books  # it is also in a held-out book
    train_personas = {"\n".join(c["persona"]["facts"]) for c in train_conv}
    for held in ("val", "dev"):
        records = read_jsonl(data / f"conv_{held}.jsonl")
        assert records
        for r in records:
            assert "\n".join(r["persona"]["facts"]) not in train_personas
            assert "\n".join(r["persona"]["facts"]) not in train_text
    tokens = np.load(run["work"] / "tokens" / "books_train.npy")
    assert tokens.max() < TINY.vocab_size


def test_metrics_and_samples_are_written(run):
    metrics = json.loads((run["work"] / "metrics.json").read_text())
    for model in ("target", "draft"):
        assert metrics["perplexity"][model]["books_val"] > 1
        assert metrics["perplexity"][model]["persona_chat_val_npc_turns"] > 1
    for k in ("k4", "k8"):
        assert 0 <= metrics["acceptance"][k]["acceptance_rate"] <= 1
        assert metrics["acceptance"][k]["steps"] > 0
    assert metrics["persona_adherence"]["questions"] > 0
    samples = (run["work"] / "samples.md").read_text()
    assert samples.count("> Player:") == 10 and "**Brom** (villager)" in samples


def test_replay_speculation_counts_matches_exactly(run):
    target = load_model(run["out"] / "npc-target", dtype=torch.float32)
    prompts = [[1, 5, 6, 7, 4, 2], [1, 9, 4, 3]]
    replies = generate(target, prompts, 6, set(), 2, "cpu")
    assert all(len(r) == 6 for r in replies)
    same = replay_speculation(model_proposals(target), prompts, replies, 4, 2, "cpu")
    # the target drafting for itself: every proposal matches; 6 reply tokens = (4 accepted + 1) + 1 accepted
    assert same["acceptance_rate"] == 1.0 and same["steps"] == 4 and same["accepted"] == same["proposed"] == 10
    draft = load_model(run["out"] / "npc-draft", dtype=torch.float32)
    other = replay_speculation(model_proposals(draft), prompts, replies, 4, 2, "cpu")
    assert other["tokens_per_target_forward"] == 12 / other["steps"]
    assert other["accepted"] <= other["proposed"] and other["steps"] >= 4


def test_metrics_hold_the_feature_head_acceptance(run):
    metrics = json.loads((run["work"] / "metrics.json").read_text())
    head = metrics["acceptance_feature_head"]
    assert head["prompts"] == metrics["acceptance"]["prompts"] > 0
    assert 0 <= head["k4"]["accepted"] <= head["k4"]["proposed"] and head["k4"]["steps"] > 0


def test_persona_adherence_measure():
    facts = ["I have two cats.", "My favorite color is teal.", "I work as a nurse."]
    questions = {topic: (q, f) for topic, q, f in topic_questions(facts)}
    assert questions == {"pets": ("Do you have any pets?", ["I have two cats."]),
                         "favorite color": ("What is your favorite color?", ["My favorite color is teal."]),
                         "job": ("What do you do for a living?", ["I work as a nurse."])}
    assert adherent("Yes, I have a cat named Tom.", *questions["pets"])
    assert not adherent("My favorite color is red.", *questions["favorite color"])
    assert adherent("I love teal!", *questions["favorite color"])


def test_persona_qa_answers_with_the_facts_in_other_words_than_the_eval():
    persona = PromptPersona(name="Ada", facts=["I have two cats.", "My favorite color is teal.", "I like chess."])
    turns = persona_qa_example(persona)["turns"]
    answers = {a for (_, q), (_, a) in zip(turns[::2], turns[1::2])}
    assert answers == {"I have two cats.", "My favorite color is teal.", "I like chess.",
                       next(a for a in answers if "Ada" in a)}
    eval_wordings = {q for _, q, _ in topic_questions(persona.facts)}
    assert not eval_wordings & {q for _, q in turns[::2]}


def test_resumed_pretraining_matches_an_uninterrupted_run(run, tmp_path, monkeypatch):
    config = replace(TINY, pretrain=replace(TINY.pretrain, max_steps=24, ckpt_every=10))

    def context(work: Path, resume: bool) -> loop.Context:
        for part in ("tokens", "tokenizer"):
            if not (work / part).exists():
                shutil.copytree(run["work"] / part, work / part)
        return loop.Context(config, work, work / "out", torch.device("cpu"), 3, resume, Log(work / "log"))

    loop.pretrain(context(tmp_path / "a", False))
    expected = load_model(tmp_path / "a" / "target-pretrained").state_dict()

    real_batch, calls = batches.MixedSampler.batch, []

    def crashing_batch(self):
        calls.append(1)
        if len(calls) > 15:
            raise KeyboardInterrupt
        return real_batch(self)

    monkeypatch.setattr(batches.MixedSampler, "batch", crashing_batch)
    with pytest.raises(KeyboardInterrupt):
        loop.pretrain(context(tmp_path / "b", False))
    assert (tmp_path / "b" / "ckpt" / "pretrain.pt").is_file()
    monkeypatch.setattr(batches.MixedSampler, "batch", real_batch)
    info = loop.pretrain(context(tmp_path / "b", True))
    assert info["steps"] == 24
    resumed = load_model(tmp_path / "b" / "target-pretrained").state_dict()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_time_budget_sets_the_schedule_and_stops(run, tmp_path):
    config = replace(TINY, pretrain=replace(TINY.pretrain, max_steps=1_000_000, max_minutes=0.05, log_every=1000))
    shutil.copytree(run["work"] / "tokens", tmp_path / "tokens")
    shutil.copytree(run["work"] / "tokenizer", tmp_path / "tokenizer")
    info = loop.pretrain(loop.Context(config, tmp_path, tmp_path / "out", torch.device("cpu"), 0, False,
                                      Log(tmp_path / "log")))
    assert 30 < info["planned_steps"] < 1_000_000
    assert info["steps"] <= info["planned_steps"] and info["seconds"] < 3 + 1.0


def test_time_budget_is_measured_again_after_a_slow_start(run, tmp_path, monkeypatch):
    """Slow steps 10-30 (as compiled layers meeting new batch widths are on CUDA) must not fix the schedule: the mark
    at step 200 measures the real speed and plans more steps. A fake clock: 1 s a step up to step 30, then 0.5 s."""
    config = replace(TINY, pretrain=replace(TINY.pretrain, max_steps=1_000_000, max_minutes=4, log_every=1000))
    shutil.copytree(run["work"] / "tokens", tmp_path / "tokens")
    shutil.copytree(run["work"] / "tokenizer", tmp_path / "tokenizer")
    real_step, clock, calls = loop.optimisation_step, [0.0], []

    def timed_step(*args):
        calls.append(1)
        clock[0] += 1.0 if len(calls) <= 30 else 0.5
        return real_step(*args)

    monkeypatch.setattr(loop, "optimisation_step", timed_step)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    info = loop.pretrain(loop.Context(config, tmp_path, tmp_path / "out", torch.device("cpu"), 0, False,
                                      Log(tmp_path / "log")))
    plans = [int(line.split("schedule set to ")[1].split()[0]) for line in (tmp_path / "log").read_text().splitlines()
             if "schedule set to" in line]
    # 240 s * 0.97: at step 30 (30 s spent, 1 s a step) 232 steps fit; at step 200 (115 s, 0.5 s a step) 435
    assert plans[:2] == [232, 435] and info["steps"] == info["planned_steps"] == plans[-1], plans


def test_cli_reports_missing_inputs(tmp_path, capsys):
    assert main(["--config", "tiny", "--device", "cpu", "--corpus", str(tmp_path / "nowhere"),
                 "--work", str(tmp_path / "w"), "--stages", "prepare"]) == 2
    assert "no books/books-*.jsonl.xz found" in capsys.readouterr().err
    assert main(["--config", "tiny", "--device", "cpu", "--work", str(tmp_path / "w"), "--stages", "finetune"]) == 2
    assert "run stage pretrain first" in capsys.readouterr().err
    assert main(["--config", "tiny", "--device", "cpu", "--work", str(tmp_path / "w"), "--head-chats", "-1"]) == 2
    assert "--head-chats must be 0 or more" in capsys.readouterr().err


def test_resume_skips_finished_stages(run, capsys):
    before = (run["out"] / "npc-draft" / "model.safetensors").stat().st_mtime_ns
    assert main(["--config", "tiny", "--device", "cpu", "--corpus", str(run["corpus"]), "--work", str(run["work"]),
                 "--out", str(run["out"]), "--stages", "tokenizer,distill", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "tokenizer: already done, skipped" in out and "distill: already done, skipped" in out
    assert (run["out"] / "npc-draft" / "model.safetensors").stat().st_mtime_ns == before


# ---------------------------------------------------------------- the persona stage (LoRA on an instruct base)

@pytest.fixture(scope="module")
def persona_run(tmp_path_factory) -> dict:
    from voice_data import build_chat_base, write_corpus

    root = tmp_path_factory.mktemp("persona")
    corpus = write_corpus(root / "corpus")
    write_persona_chat(corpus, random.Random(1), 12)  # the --base head stage's everyday talk
    base = build_chat_base(root / "base", corpus)
    args = ["--config", "tiny", "--device", "cpu", "--corpus", str(corpus), "--work", str(root / "work"),
            "--stages", "persona", "--base", str(base), "--adapter-out", str(root / "adapter")]
    assert main(args) == 0
    return {"root": root, "corpus": corpus, "base": base, "adapter": root / "adapter", "args": args}


def test_persona_stage_trains_an_adapter_whose_loss_falls(persona_run):
    adapter = persona_run["adapter"]
    info = json.loads((adapter / "training.json").read_text())
    assert info["steps"] == info["planned_steps"] == 4 * 7  # 28 examples: 12 conversations, 4 scene seats, 12 drills
    assert info["last_loss"] < info["first_loss"] * 0.8
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == TINY.persona.rank
    assert set(config["target_modules"]) == set(TINY.persona.targets)
    assert (adapter / "adapter_model.safetensors").stat().st_size < 12 * 2**20


def test_persona_adapter_loads_through_the_engine_and_matches_peft_merged(persona_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from npc_engine.engine import Engine
    from npc_engine.prompt import chat_messages
    from npc_engine.sampling import SamplingParams
    from npc_engine.train.npc_dialogue import prompt_persona
    from voice_data import persona

    base, adapter = persona_run["base"], persona_run["adapter"]
    tok = AutoTokenizer.from_pretrained(base)
    messages = chat_messages(prompt_persona(persona(40)), [Turn("player", "Where do you live?")])
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    params = SamplingParams(temperature=0.0, max_tokens=12)

    def greedy(adapter_dir):
        engine = Engine.load(base, draft="none", dtype="float32", adapter=adapter_dir)
        return list(engine.generate(engine.tokenizer.encode(prompt, add_special_tokens=False), params))

    plain, tuned = greedy(None), greedy(adapter)
    assert tuned != plain
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    expected = merged.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert tuned == expected[:len(tuned)] and (len(tuned) == 12 or expected[len(tuned)] == tok.eos_token_id)


def test_persona_examples_mask_only_npc_tokens_and_keep_labels(persona_run):
    from transformers import AutoTokenizer

    from npc_engine.grammar import with_header
    from npc_engine.train.npc_dialogue import train_examples
    from npc_engine.train.persona import encode

    tok = AutoTokenizer.from_pretrained(persona_run["base"])
    examples = train_examples(persona_run["corpus"])
    conversation = examples[0]
    ids, mask = encode(tok, conversation, 1024)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    npc_lines = [t.text for t in conversation.turns if t.speaker == "npc"]
    assert len(conversation.labels) == len(npc_lines)
    headed = [with_header(text, *label) for text, label in zip(npc_lines, conversation.labels)]
    assert trained == "".join(line + "<|im_end|>" for line in headed)
    seat = next(e for e in examples if e.kind == "scene" and e.persona.name.endswith("21"))  # the guest of scene 20
    text = tok.decode(encode(tok, seat, 1024)[0])
    assert "Alda Vorn20 to Alda Vorn21: Well said" not in text  # cut after the speaker's last line
    assert "Alda Vorn20: Welcome, all!\nPlayer to Alda Vorn21: What do you make?" in text
    assert "Present: Alda Vorn20, fisher of Carrow20; the player." in text and "The host is Alda Vorn20." in text
    assert (persona_run["corpus"] / "npc-dialogue" / "dev.jsonl").read_text() not in "".join(
        tok.decode(encode(tok, e, 1024)[0]) for e in examples)


def test_persona_stage_resumes_to_the_same_adapter(persona_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from npc_engine.train import persona

    args = [a if a != str(persona_run["adapter"]) else str(tmp_path / "adapter") for a in persona_run["args"]]
    args = [a if a != str(persona_run["root"] / "work") else str(tmp_path / "work") for a in args]
    real, calls = persona.save_checkpoint, []

    def crash_after_checkpoint(path, state):
        real(path, state)
        calls.append(state["step"])
        raise KeyboardInterrupt

    monkeypatch.setattr(persona, "save_checkpoint", crash_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert calls == [TINY.persona.ckpt_every]
    monkeypatch.setattr(persona, "save_checkpoint", real)
    assert main(args + ["--resume"]) == 0
    expected = load_file(str(persona_run["adapter"] / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_persona_stage_time_budget_cuts_the_schedule(persona_run, tmp_path):
    args = [a if a != str(persona_run["adapter"]) else str(tmp_path / "adapter") for a in persona_run["args"]]
    assert main(args + ["--epochs", "1000", "--budget-minutes", "persona=0.05"]) == 0
    info = json.loads((tmp_path / "adapter" / "training.json").read_text())
    assert 6 < info["planned_steps"] < 4000 and info["steps"] <= info["planned_steps"] and info["seconds"] < 3 + 1.0


def test_persona_stage_needs_an_instruct_base(persona_run, tmp_path, capsys):
    assert main(["--stages", "persona", "--device", "cpu", "--work", str(tmp_path)]) == 2
    assert "needs --base" in capsys.readouterr().err
    common = ["--stages", "persona", "--device", "cpu", "--work", str(tmp_path), "--corpus", str(persona_run["corpus"])]
    assert main([*common, "--base", str(tmp_path)]) == 2
    assert "not a model folder or .gguf file" in capsys.readouterr().err
    plain = tmp_path / "plain"
    shutil.copytree(persona_run["base"], plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    assert main([*common, "--base", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_head_stage_on_an_instruct_base_writes_a_reduced_head_that_keeps_greedy_output(persona_run, tmp_path, capsys):
    """`--stages head --base B --adapter A`: a feature head for the adapted base, drafting over the N most frequent
    ids of the target's outputs (its end-of-turn token among them), on the default feature layers, which the engine
    loads as the drafter and whose greedy lines are the target's own; feature layers the base lacks are refused."""
    from npc_engine.drafters import HeadDrafter
    from npc_engine.engine import Engine
    from npc_engine.head import default_feature_layers
    from npc_engine.prompt import chat_messages
    from npc_engine.sampling import SamplingParams
    from npc_engine.train.npc_dialogue import prompt_persona
    from voice_data import persona

    base, adapter, head_dir = persona_run["base"], persona_run["adapter"], tmp_path / "head"
    args = ["--config", "tiny", "--device", "cpu", "--corpus", str(persona_run["corpus"]), "--work",
            str(tmp_path / "work"), "--stages", "head", "--base", str(base), "--adapter", str(adapter),
            "--head-out", str(head_dir), "--draft-vocab", "48"]
    assert main(args) == 0
    info = json.loads((head_dir / "training.json").read_text())
    # a continuation at every NPC turn of the first head_replies conversations, not one per conversation
    assert info["steps"] == TINY.base_head.max_steps and info["replies"] > TINY.head_replies
    assert info["persona_chat"] == TINY.head_persona_chat  # everyday talk beside the NPC conversations
    # head_samples (1) sampled continuations at each NPC turn of the conversations, none at the Persona-Chat cuts
    assert TINY.head_replies < info["sampled_replies"] < info["replies"]
    assert info["draft_vocab"] == 48 and info["adapter"] == str(adapter) and info["last_loss"] < info["first_loss"]
    assert json.loads((head_dir / "config.json").read_text())["draft_vocab_size"] == 48

    params = SamplingParams(temperature=0.0, max_tokens=16)
    plain = Engine.load(base, draft="none", dtype="float32", adapter=adapter)
    drafted = Engine.load(base, draft=str(head_dir), dtype="float32", adapter=adapter, fixed_k=3)
    assert isinstance(drafted.drafter, HeadDrafter) and len(drafted.drafter.model.draft_ids) == 48
    assert plain.tokenizer.encode("<|im_end|>", add_special_tokens=False)[0] in drafted.drafter.model.draft_ids
    n = plain.target.args.n_layers
    layers = default_feature_layers(n)
    assert len(layers) >= 2 and info["feature_layers"] == list(layers)
    assert drafted.drafter.model.feature_layers == layers
    assert main([*args, "--head-out", str(tmp_path / "bad"), "--feature-layers", f"0,{n}"]) == 2
    assert f"two or more increasing layer indices below the target's {n} layers" in capsys.readouterr().err
    for i, line in enumerate(["Where do you live?", "Any news?", "What do you make?"]):
        messages = chat_messages(prompt_persona(persona(40 + i)), [Turn("player", line)])
        prompt = plain.tokenizer.encode(plain.tokenizer.chat_template.render(messages, add_generation_prompt=True),
                                        add_special_tokens=False)
        assert list(drafted.generate(prompt, params)) == list(plain.generate(prompt, params))
        assert drafted.last_stats.drafted > 0


def test_head_stage_samples_seeded_continuations_beside_the_greedy_ones(tiny_model_dir):
    """--head-samples: the target's sampled continuations, one seed per prompt (a rerun gives the same rows), as the
    engine samples them (so they part from the greedy ones), each max_tokens long."""
    from npc_engine.sampling import SamplingParams
    from npc_engine.train.feature_head import greedy_replies, target_replies

    target, cpu = load_model(tiny_model_dir, "cpu", torch.float32), torch.device("cpu")
    prompts = [[5, 9, 13, 21], [7, 7, 30], [5, 9, 13, 21]]
    sampled = SamplingParams(temperature=1.0, max_tokens=12, seed=40)
    first = target_replies(target, prompts, sampled, 0, cpu, print, "sampled")
    assert first == target_replies(target, prompts, sampled, 0, cpu, print, "sampled")
    assert all(len(r) == 12 for r in first) and first[0] != first[2]  # the same prompt, another seed
    assert first != greedy_replies(target, prompts, 12, 0, cpu, print)
