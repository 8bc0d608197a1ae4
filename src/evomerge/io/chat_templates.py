"""Chat templates for a merge's `chat_template`: a built-in format by name, "auto", or a Jinja string.

The names are mergekit 0.1.5's (`alpaca`, `chatml`, `exaone`, `llama3`, `mistral`); the templates are our
own, written from each format's public description, and render the same text as mergekit's
(tests/io/test_chat_templates.py), except `exaone`: mergekit's file spreads the template over indented
lines, and its output carries that indentation and blank lines; ours renders EXAONE's own compact format
(the same text once whitespace is ignored).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from evomerge.errors import ConfigError

_SYSTEM_LAST = "(messages | selectattr('role', 'equalto', 'system') | list)"

BUILTIN: dict[str, str] = {
    # ChatML: <|im_start|>role\ncontent<|im_end|>\n per message
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}\n"
    ),
    # Llama 3: header ids around the role, <|eot_id|> after each (trimmed) message, BOS first
    "llama3": (
        "{% for message in messages %}"
        "{{ (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim }}{{ '<|eot_id|>\\n' }}"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}\n"
    ),
    # Mistral: BOS, then " [INST] user [/INST]" and " answer</s>" turns; a system message joins the
    # first user turn; roles must alternate
    "mistral": (
        "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}\n"
        "{%- set turns = messages[1:] if system is not none else messages %}\n"
        "{{- bos_token }}\n"
        "{%- for message in turns %}\n"
        "{%- if (message['role'] == 'user') != loop.index is odd %}"
        "{{- raise_exception('mistral chat template: after an optional system message, roles must "
        "alternate user/assistant') }}{% endif %}\n"
        "{%- if message['role'] == 'user' %}\n"
        "{%- set prefix = system + '\\n\\n' if loop.first and system is not none else '' %}\n"
        "{{- ' [INST] ' + prefix + message['content'] + ' [/INST]' }}\n"
        "{%- elif message['role'] == 'assistant' %}\n"
        "{{- ' ' + message['content'] + eos_token }}\n"
        "{%- else %}"
        "{{- raise_exception('mistral chat template: only user and assistant roles, and one system "
        "message first') }}{% endif %}\n"
        "{%- endfor %}\n"
    ),
    # Alpaca: the last system message, then ### Instruction / ### Input / ### Response sections
    "alpaca": (
        "{{ (" + _SYSTEM_LAST + " | last).content | trim if " + _SYSTEM_LAST + " else '' }}\n\n"
        "{% set headers = {'user': '### Instruction:', 'assistant': '### Response:', "
        "'user_context': '### Input:'} %}"
        "{% for message in messages if message['role'] in headers %}"
        "{{ headers[message['role']] + '\\n' + message['content'] | trim }}"
        "{{ '' if loop.last else '\\n\\n' }}"
        "{% endfor %}\n"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}\n### Response:\n{% endif %}\n"
    ),
    # EXAONE: [|role|]content, a user turn ends with a newline, others with [|endofturn|]
    "exaone": (
        "{% for message in messages %}"
        "{{ '[|system|][|endofturn|]\\n' if loop.first and message['role'] != 'system' else '' }}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}\n"
    ),
}
AUTO = "auto"


def check_chat_template(value: str) -> None:
    """Refuse what is neither "auto", a built-in name nor a plausible Jinja template (as mergekit does,
    a template must hold a `{` and be at least 20 characters), and templates that do not parse."""
    if value == AUTO or value in BUILTIN:
        return
    if len(value) < 20 or "{" not in value:
        raise ConfigError(
            f"chat_template: {value!r} is neither a built-in template ({', '.join(sorted(BUILTIN))}), "
            "'auto' (the most common template of the models), nor a Jinja template; give one of these."
        )
    import jinja2

    try:
        jinja2.Environment().parse(value)
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(
            f"chat_template: the Jinja template does not parse (line {error.lineno}: {error})."
        ) from None


def resolve_chat_template(value: str, model_dirs: Iterable[Path]) -> str | None:
    """The template text `value` stands for; "auto": the models' most common template (the first model's
    among equals), None when none has one."""
    if value in BUILTIN:
        return BUILTIN[value]
    if value != AUTO:
        return value
    found = [template.strip() for template in map(read_chat_template, model_dirs) if template]
    return Counter(found).most_common(1)[0][0] if found else None


def read_chat_template(model_dir: Path) -> str | None:
    """A model dir's default chat template: chat_template.jinja, else tokenizer_config.json's entry."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
