"""Built-in chat templates: mergekit's names, the text mergekit's templates render; names, "auto", checks."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.io.chat_templates import BUILTIN, check_chat_template, read_chat_template, resolve_chat_template

S = {"role": "system", "content": " Be brief. "}
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": " hi there \n"}, {"role": "assistant", "content": "hello "}],
    [
        S,
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "q2"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "user_context", "content": "ctx\n"},
        {"role": "assistant", "content": "b"},
    ],
    [S, {"role": "user", "content": "x"}],
    [{"role": "assistant", "content": "only"}],
]


def _render(template: str, conversation: list[dict[str, str]], generation: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            [conversation],
            chat_template=template,
            add_generation_prompt=generation,
            bos_token="<s>",
            eos_token="</s>",
        )
    except Exception as error:  # a template may refuse a conversation (mistral: roles must alternate)
        return f"refused: {type(error).__name__}"
    return rendered[0]


@pytest.mark.oracle
@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_render_as_mergekits(name: str) -> None:
    import importlib.resources

    from mergekit._data import chat_templates  # type: ignore[import-untyped]

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for conversation, generation in itertools.product(CONVERSATIONS, [False, True]):
        ours, expected = (
            _render(BUILTIN[name], conversation, generation),
            _render(theirs, conversation, generation),
        )
        if name == "exaone":  # mergekit's indented file prints its indentation; EXAONE's format does not
            ours, expected = re.sub(r"\s+", "", ours), re.sub(r"\s+", "", expected)
        assert ours == expected, (conversation, generation)


@pytest.mark.oracle
def test_the_names_are_mergekits() -> None:
    import importlib.resources

    from mergekit._data import chat_templates

    files = importlib.resources.files(chat_templates).iterdir()
    assert {path.name.removesuffix(".jinja") for path in files if path.name.endswith(".jinja")} == set(
        BUILTIN
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("chatlm", "neither a built-in template"),
        ("{{ short }}", "neither a built-in template"),  # mergekit wants 20 characters or more
        ("{% for m in messages %}{{ m['content'] }}", "does not parse"),
    ],
)
def test_bad_templates_are_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_chat_template(value)


def test_auto_picks_the_most_common_template(tmp_path: Path) -> None:
    dirs = [tmp_path / name for name in "abcd"]
    for directory in dirs:
        directory.mkdir()
    (dirs[0] / "tokenizer_config.json").write_text('{"chat_template": "T1 {{ x }} long enough"}')
    (dirs[1] / "chat_template.jinja").write_text("T2 {{ x }} long enough\n")
    (dirs[2] / "tokenizer_config.json").write_text(
        '{"chat_template": [{"name": "default", "template": "T2 {{ x }} long enough"}]}'
    )
    assert read_chat_template(dirs[3]) is None
    assert resolve_chat_template("auto", dirs) == "T2 {{ x }} long enough"
    assert resolve_chat_template("auto", [dirs[3]]) is None
    assert resolve_chat_template("chatml", []) == BUILTIN["chatml"]
    check_chat_template("auto")
