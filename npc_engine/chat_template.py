"""Chat templates rendered as `transformers` renders them (apply_chat_template): the same sandboxed Jinja2
environment, globals and filters, so an instruct model sees exactly the prompt it was trained on."""
import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from npc_engine.prompt import PromptPersona, Turn, chat_messages

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that cannot be compiled or that raised while rendering (raise_exception)."""


@lru_cache(maxsize=8)
def compile_template(source: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; it renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


@dataclass
class ChatTemplate:
    source: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplate | None":
        """The template of a model folder: tokenizer_config.json's chat_template (a string, or a list of named
        templates: "default"), else chat_template.jinja (where newer transformers write it). None: none."""
        path = Path(path)
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        source = config.get("chat_template")
        if isinstance(source, list):
            source = {t["name"]: t["template"] for t in source}.get("default")
        if not source and (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        if not source:
            return None
        tokens = {k: token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        return cls(source, tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The prompt text for `messages`, as tokenizer.apply_chat_template(..., tokenize=False) returns it."""
        import jinja2

        try:
            return compile_template(self.source).render(**{"tools": None, "documents": None, **self.special_tokens,
                                                           **kwargs, "messages": messages,
                                                           "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from None

    def end_of_turn(self) -> str:
        """The text the template puts after an assistant message's content (e.g. "<|im_end|>\\n"); its first
        special token is where generation stops."""
        marker = "\x00reply\x00"
        text = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}])
        return text[text.index(marker) + len(marker):] if marker in text else ""


def token_text(value) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return value["content"] if isinstance(value, dict) else str(value)


def chat_prefix(template: ChatTemplate, p: PromptPersona) -> str:
    """The start every prompt for this persona shares: the rendered system message (whatever the template renders
    the same with and without later turns), so its tokens are a prefix the engine caches."""
    system = chat_messages(p, [])
    return os.path.commonprefix([template.render(system),
                                 template.render(system + [{"role": "user", "content": "?"}], True)])


def chat_prompt(template: ChatTemplate, p: PromptPersona, turns: list[Turn], text: str = "",
                complete: bool = True, memories: list[str] = ()) -> str:
    """The prompt for the NPC's next line after `turns` and the player's `text`: persona as system message, the
    turns as user/assistant messages, then the template's generation prompt. complete=False: the player is still
    typing, and the prompt ends right after `text` (a prefix of the complete prompt, up to its last word)."""
    new = [Turn("player", text)] if text.strip() else []
    messages = chat_messages(p, list(turns) + new, memories=memories)
    if complete:
        return template.render(messages, add_generation_prompt=True)
    rendered = template.render(messages)
    end = rendered.rfind(text.strip()) if new else -1
    if end < 0:
        return template.render(chat_messages(p, list(turns), memories=memories))
    return rendered[:end + len(text.strip())]
