"""Chat templates rendered as transformers renders them, the persona prompt built through them, the end-of-turn
stop token, and the system message as a cached prefix."""
import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from conftest import build_checkpoint
from npc_engine.chat_template import ChatTemplate, ChatTemplateError
from npc_engine.dialogue import fit_prompt, prefix_ids
from npc_engine.paths import PERSONAS_DIR
from npc_engine.persona import PersonaStore
from npc_engine.prompt import Turn, chat_messages
from npc_engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN2 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
LLAMA3 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be user or assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
# assistant text in {% generation %} tags (for training masks), a namespace and tojson with options
TAGGED = ("{%- set ns = namespace(n=0) %}{%- for m in messages %}{%- set ns.n = ns.n + 1 %}"
          "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{% generation %}{{ m.content }}<|im_end|>"
          "{% endgeneration %}\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content | tojson(indent=1) }}<|im_end|>\n"
          "{%- endif %}{%- endfor %}{{ ns.n }}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "What do you sell?"}],
    [{"role": "system", "content": "You are Orrin, a merchant. Speak briefly."},
     {"role": "user", "content": "Hi there!  "}, {"role": "assistant", "content": "Welcome, traveller."},
     {"role": "user", "content": "Any maps? ünïcödé 🐉"}],
]


def model_folder(path, template: str, variant: str = "llama_gqa"):
    """A random checkpoint whose tokenizer has the templates' special tokens and whose folder has a chat template."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [t["content"] for c in CONVERSATIONS for t in c] * 10 + ["Brom forges swords, the guard buys them."] * 10
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    build_checkpoint(path, variant, vocab_size=tok.get_vocab_size())
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": "<|endoftext|>",
              "bos_token": "<|begin_of_text|>", "pad_token": "<|endoftext|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))  # <|im_end|> is not here
    (path / "npc_engine.json").write_text(json.dumps({"prompt_format": "chat_template"}))
    return path


@pytest.mark.parametrize("template", [SMOLLM2, QWEN2, LLAMA3, TAGGED], ids=["smollm2", "qwen2", "llama3", "tagged"])
def test_render_equals_transformers(tmp_path, template):
    folder = model_folder(tmp_path, template)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate.from_dir(folder)
    for messages in CONVERSATIONS:
        for gen in (False, True):
            assert ours.render(messages, gen) == ref.apply_chat_template(messages, add_generation_prompt=gen,
                                                                         tokenize=False)
    tools = [{"type": "function", "function": {"name": "price", "description": "Preis <€>", "parameters": {}}}]
    assert ours.render(CONVERSATIONS[0], tools=tools) == ref.apply_chat_template(CONVERSATIONS[0], tools=tools,
                                                                                tokenize=False)


def test_template_errors():
    with pytest.raises(ChatTemplateError, match="Conversation roles must be user or assistant"):
        ChatTemplate(LLAMA3, {}).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}", {}).render([])
    with pytest.raises(Exception, match="unsafe|access"):  # the sandbox: no way to reach Python internals
        ChatTemplate("{{ messages.__class__.__mro__ }}", {}).render([])


@pytest.mark.parametrize("template", [SMOLLM2, QWEN2], ids=["smollm2", "qwen2"])
def test_persona_prompt_equals_apply_chat_template(tmp_path, template):
    folder = model_folder(tmp_path, template)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer.from_dir(folder)
    persona = PersonaStore(PERSONAS_DIR).get("merchant")
    history = [Turn("player", "Hello."), Turn("npc", "Welcome to my stall!")]
    prompt = fit_prompt(tok, persona, history, "Any maps for sale?", max_len=4096)
    ids, prefix_len = prompt.ids, prompt.prefix_len
    messages = chat_messages(persona.to_prompt_persona(), history + [Turn("player", "Any maps for sale?")])
    assert messages[0]["role"] == "system" and persona.name in messages[0]["content"]
    assert ids == list(ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    system = ref.apply_chat_template(messages[:1], tokenize=True)["input_ids"]
    assert prefix_len == len(system) and ids[:prefix_len] == list(system) == prefix_ids(tok, persona)
    # while the player types, the prompt is the complete one's prefix up to the last word
    open_ids = fit_prompt(tok, persona, history, "Any maps for", max_len=4096, complete=False).ids
    assert tok.decode(ids).startswith(tok.decode(open_ids)) and tok.decode(open_ids).endswith("Any maps for")
    assert tok.tok.token_to_id("<|im_end|>") in tok.stop_ids  # the template's end of turn stops generation


def test_npc_format_models_keep_their_format(tiny_model_dir):
    tok = Tokenizer.from_dir(tiny_model_dir)
    persona = PersonaStore(PERSONAS_DIR).get("merchant")
    assert tok.chat_template is None
    assert prefix_ids(tok, persona) == tok.encode(persona.prefix())


def test_system_prefix_is_a_prefix_cache_hit(tmp_path):
    from npc_engine.engine import Engine
    from npc_engine.sampling import SamplingParams

    folder = model_folder(tmp_path, SMOLLM2)
    engine = Engine.load(folder, draft="none", max_batch=2, max_seq=1024)
    persona = PersonaStore(PERSONAS_DIR).get("merchant")
    stats = []
    for rid, text in (("a", "What do you sell?"), ("b", "Where is the harbour?")):
        prompt = fit_prompt(engine.tokenizer, persona, [], text, engine.max_prompt_len())
        ids, prefix_len = prompt.ids, prompt.prefix_len
        engine.submit(rid, ids, SamplingParams(temperature=0.0, max_tokens=4), prefix_len=prefix_len)
        while engine.has_work():
            stats += [e.stats for e in engine.step() if e.finished]
    assert prefix_len > 20 and stats[0].cached_prefix_tokens == 0 and stats[1].cached_prefix_tokens == prefix_len


def test_prompt_format_is_recorded_and_checked(tmp_path):
    from npc_engine.loading import CheckpointError

    folder = model_folder(tmp_path, SMOLLM2)
    (folder / "npc_engine.json").unlink()  # no record: a folder with a template and no <|persona|> token uses it
    assert Tokenizer.from_dir(folder).chat_template is not None
    (folder / "npc_engine.json").write_text(json.dumps({"prompt_format": "npc"}))
    assert Tokenizer.from_dir(folder).chat_template is None
    (folder / "npc_engine.json").write_text(json.dumps({"prompt_format": "alpaca"}))
    with pytest.raises(CheckpointError, match="prompt_format 'alpaca' unknown"):
        Tokenizer.from_dir(folder)
