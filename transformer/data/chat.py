"""Chat templates of Hugging Face tokenizer folders, rendered with jinja2 as transformers renders them.

An instruct model was trained on conversations laid out by its template (role headers, end-of-turn
tokens); prompting or fine-tuning it in any other layout degrades it. So the template is read from the
folder (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) and rendered in the same
sandbox, with the same globals, filters and variables as `transformers.apply_chat_template`:

    tokenizer = load_tokenizer("path/to/instruct-model")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    stop = tokenizer.chat_template.stop_ids   # end generation at the template's end-of-turn tokens
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from transformer.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
# The variables transformers passes every template (`special_tokens_map`).
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                "mask_token")
# Tokens that close a turn in the templates of common model families; a template's stop ids are its
# eos token and those of these it writes.
END_OF_TURN_TOKENS = (
    "<|eot_id|>", "<|eom_id|>",  # Llama 3
    "<|im_end|>",  # ChatML: Qwen, SmolLM
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3
    "<|endoftext|>", "<|end_of_text|>", "</s>",
)
TEMPLATE_FILE = "chat_template.jinja"
NAMED_TEMPLATES_DIR = "additional_chat_templates"
Message = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, the special-token strings it sees, and the ids that end a turn.

    Holds only strings and ints (the compiled template is cached per source), so a tokenizer that
    carries one still pickles for data-loader workers.
    """

    source: str  # the Jinja text
    folder: str  # where it was read from, named in every error
    special_tokens: Mapping[str, str]  # bos_token, eos_token, ... as strings
    stop_ids: tuple[int, ...] = ()  # eos and the end-of-turn tokens the template writes
    name: str = "default"

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as the text the model was trained on."""
        chat = check_messages(messages, self.folder)
        try:
            return _compile(self.source).render(
                messages=chat, tools=None, documents=None,
                add_generation_prompt=add_generation_prompt, **self.special_tokens,
            )
        except Exception as e:  # jinja2 errors, raise_exception, and Python errors inside the template
            raise ValueError(
                f"the chat template of {self.folder} failed to render this conversation: "
                f"{type(e).__name__}: {str(e).rstrip('.')}. Fix the messages (roles and order "
                f"the template accepts), or the template ({TEMPLATE_FILE} or 'chat_template' in "
                "tokenizer_config.json)"
            ) from e


def check_messages(messages: Sequence[Message], folder: str = "") -> list[dict[str, Any]]:
    """Plain-dict copies of the messages, after checking roles and contents (errors say which)."""
    where = f" (chat template of {folder})" if folder else ""
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise ValueError(f"a conversation is a list of messages, got {type(messages).__name__}{where}")
    if not messages:
        raise ValueError(f"the conversation is empty: give at least one message{where}")
    chat = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and "
                             f"'content'{where}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; chat messages take the roles "
                             f"{', '.join(ROLES)}{where}")
        content = message.get("content")
        if content is None:
            raise ValueError(f"message {i} ({role}) has no 'content': give its text{where}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) has content of type {type(content).__name__}; "
                             f"give its text as a string{where}")
        # As transformers: keys whose value is None are dropped, templates test for missing keys.
        chat.append({k: v for k, v in message.items() if v is not None})
    return chat


def _token_string(value: Any) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: malformed JSON ({e.msg} at line {e.lineno}); fix or remove the file"
        ) from None
    return data if isinstance(data, dict) else {}


def _templates(folder: pathlib.Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Templates by name, with transformers' precedence: .jinja files over tokenizer_config.json."""
    found: dict[str, str] = {}
    if (folder / TEMPLATE_FILE).is_file():
        found["default"] = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (folder / NAMED_TEMPLATES_DIR).is_dir():
        for path in sorted((folder / NAMED_TEMPLATES_DIR).glob("*.jinja")):
            found[path.stem] = path.read_text(encoding="utf-8")
    if found:
        return found
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, Mapping) and "name" in t}
    return {}


def load_chat_template(
    folder: str | pathlib.Path, tokenizer: Tokenizer | None = None, name: str | None = None
) -> ChatTemplate | None:
    """The chat template of a Hugging Face tokenizer folder, None when it has none.

    Of several named templates, `name` picks one (default: the one named 'default'). With the
    tokenizer, the stop ids are resolved: the eos token, the known end-of-turn tokens the template
    writes, and the `eos_token_id` of a `generation_config.json` beside it.
    """
    folder = pathlib.Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    templates = _templates(folder, config)
    if not templates:
        return None
    chosen = name or "default"
    if chosen not in templates:
        raise ValueError(f"{folder} has no chat template named {chosen!r}; its templates are "
                         f"{sorted(templates)}: pass one of them as name")
    source = templates[chosen]
    legacy = _read_json(folder / "special_tokens_map.json")  # older folders keep special tokens here
    special: dict[str, str] = {}
    for key in SPECIAL_KEYS:
        value = _token_string(config.get(key)) or _token_string(legacy.get(key))
        if value is not None:
            special[key] = value
    try:
        _compile(source)
    except Exception as e:
        raise ValueError(f"the chat template {chosen!r} of {folder} is not valid Jinja: {e}; fix "
                         f"{TEMPLATE_FILE} or 'chat_template' in tokenizer_config.json") from e
    stop: tuple[int, ...] = ()
    if tokenizer is not None:
        stop = _stop_ids(tokenizer, source, special, _read_json(folder / "generation_config.json"))
    return ChatTemplate(source=source, folder=str(folder), special_tokens=special, stop_ids=stop,
                        name=chosen)


BUNDLED_DIR = pathlib.Path(__file__).parent / "chat_templates"


def template_from_file(path: str | pathlib.Path, tokenizer: Tokenizer) -> ChatTemplate:
    """A chat template from a `.jinja` file (or the name of one in chat_templates/, e.g. 'inst'),
    for a tokenizer that has none (e.g. a SentencePiece model trained here); its special tokens are
    the tokenizer's own bos/eos/pad/unk pieces."""
    bundled = BUNDLED_DIR / f"{path}.jinja"
    path = bundled if bundled.is_file() else pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat template file {path} does not exist (config.data.chat_template)")
    source = path.read_text(encoding="utf-8")
    try:
        _compile(source)
    except Exception as e:
        raise ValueError(f"the chat template {path} is not valid Jinja: {e}") from e
    special = {f"{name}_token": tokenizer.id_to_token(i) for name in ("bos", "eos", "pad", "unk")
               if (i := getattr(tokenizer, f"{name}_id")) is not None}
    stop = _stop_ids(tokenizer, source, special, {})
    return ChatTemplate(source=source, folder=str(path.parent), special_tokens=special,
                        stop_ids=stop, name=path.stem)


def save_template(template: ChatTemplate, directory: str | pathlib.Path) -> None:
    """Writes the template into a tokenizer folder (chat_template.jinja, and the special-token
    strings it reads into tokenizer_config.json), so the folder loads with it."""
    directory = pathlib.Path(directory)
    (directory / TEMPLATE_FILE).write_text(template.source, encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path)
    config.update({k: v for k, v in template.special_tokens.items() if k not in config})
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _stop_ids(tokenizer: Tokenizer, source: str, special: Mapping[str, str],
              generation: Mapping[str, Any]) -> tuple[int, ...]:
    eos = special.get("eos_token")
    eos_id = tokenizer.token_to_id(eos) if eos is not None else None
    ids: list[int | None] = [eos_id if eos_id is not None else tokenizer.eos_id]
    ids += [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS if t in source]
    listed = generation.get("eos_token_id")
    ids += listed if isinstance(listed, list) else [listed]
    return tuple(dict.fromkeys(int(i) for i in ids if isinstance(i, int)))


def encode_rendered(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of a rendered conversation: no special tokens added (the template wrote them), and those
    in the text each one id, as transformers tokenizes it.

    A `tokenizers` vocabulary matches its added tokens itself; other vocabularies (SentencePiece) are
    split at the special-token strings first. Those may differ from transformers around them: its
    Llama tokenizers add no word-start mark after a special token, and keep repeated spaces.
    """
    from transformer.data.hf_tokenizers import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode(text)
    template = tokenizer.chat_template
    strings = set(template.special_tokens.values()) if template is not None else set()
    strings |= {tokenizer.id_to_token(i) for i in tokenizer.special_ids.values()}
    strings |= {t for t in END_OF_TURN_TOKENS if tokenizer.token_to_id(t) is not None}
    strings = sorted((s for s in strings if s and tokenizer.token_to_id(s) is not None), key=len,
                     reverse=True)
    if not strings:
        return tokenizer.encode(text)
    ids: list[int] = []
    for piece in re.split("(" + "|".join(map(re.escape, strings)) + ")", text):
        if piece in strings:
            ids.append(int(tokenizer.token_to_id(piece)))  # type: ignore[arg-type]
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def apply_chat_template(
    tokenizer: Tokenizer, messages: Sequence[Message], add_generation_prompt: bool = False,
    tokenize: bool = True,
) -> list[int] | str:
    """The conversation rendered by the tokenizer's template: ids (tokenize=True) or text."""
    template = tokenizer.chat_template
    if template is None:
        folder = getattr(tokenizer, "chat_folder", None)
        where = f"the tokenizer loaded from {folder}" if folder else "this tokenizer"
        raise ValueError(
            f"{where} has no chat template: add the model's template to its folder (a "
            f"{TEMPLATE_FILE} file, or 'chat_template' in tokenizer_config.json, as the instruct "
            "model on the Hugging Face Hub ships it) and load the tokenizer from that folder"
        )
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    return encode_rendered(tokenizer, text) if tokenize else text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text in some templates): its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` without underscore attributes, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    """The template compiled in transformers' environment (sandbox, globals and filters)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env.from_string(source)
