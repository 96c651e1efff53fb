"""Chat templates render as transformers' apply_chat_template(..., tokenize=False)."""

from __future__ import annotations

import functools
import importlib.util
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from meshpy.chat_template import _compile, render_chat
from meshpy.errors import ChatTemplateError, MeshpyError

DATA = Path(__file__).parent / "data"
MODELS = ["smollm2", "gemma3"]
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
)


@functools.cache
def chat_fixture(model: str) -> dict[str, Any]:
    with (DATA / f"tokenizer_{model}.json").open(encoding="utf-8") as f:
        chat = json.load(f)["chat"]
    assert chat["transformers"] is not None, f"tokenizer_{model}.json has no transformers chat rendering"
    return chat


def render_fixture(chat: dict[str, Any], add_generation_prompt: bool) -> str:
    return render_chat(
        chat["template"],
        chat["messages"],
        add_generation_prompt=add_generation_prompt,
        bos_token=chat["bos_token"],
        eos_token=chat["eos_token"],
    )


def test_smollm2_template_is_the_gguf_one(smollm2_gguf: Path) -> None:
    import gguf

    field = gguf.GGUFReader(str(smollm2_gguf)).fields["tokenizer.chat_template"]
    assert chat_fixture("smollm2")["template"] == field.contents()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_stored_transformers(model: str, add_generation_prompt: bool) -> None:
    chat = chat_fixture(model)
    key = "generation_prompt" if add_generation_prompt else "no_generation_prompt"
    assert render_fixture(chat, add_generation_prompt) == chat["transformers"][key]


@pytest.fixture(scope="module")
def transformers_tokenizer(smollm2_gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "  padded  "},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "é 🎉"},
    ],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "<b>x</b>"}],
]


@pytest.mark.reference
@needs_transformers
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_live_transformers(transformers_tokenizer: Any, model: str, add_generation_prompt: bool) -> None:
    chat = chat_fixture(model)
    for messages in [chat["messages"], *CONVERSATIONS]:
        expected = transformers_tokenizer.apply_chat_template(
            messages,
            chat_template=chat["template"],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            bos_token=chat["bos_token"],
            eos_token=chat["eos_token"],
        )
        got = render_chat(
            chat["template"],
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=chat["bos_token"],
            eos_token=chat["eos_token"],
        )
        assert got == expected


# Exercises the environment: trim/lstrip blocks, loop controls, namespace, tojson, dict.
FEATURES_TEMPLATE = """\
{% set ns = namespace(count=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% set ns.count = ns.count + 1 %}
[{{ m.role }}] {{ m.content | tojson }}
{% endfor %}
count={{ ns.count }} tools={{ tools | tojson }} extra={{ dict(a=1) | tojson(sort_keys=True) }}
{% generation %}gen{% endgeneration %}
"""


@pytest.mark.reference
@needs_transformers
def test_environment_features_equal_live_transformers(transformers_tokenizer: Any) -> None:
    messages = [
        {"role": "user", "content": "<a & b> \"q\" é"},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "x"},
        {"role": "stop", "content": "end"},
        {"role": "user", "content": "never"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    expected = transformers_tokenizer.apply_chat_template(
        messages, chat_template=FEATURES_TEMPLATE, tools=tools, tokenize=False
    )
    got = render_chat(FEATURES_TEMPLATE, messages, add_generation_prompt=False, tools=tools)
    assert got == expected


def test_environment_features() -> None:
    messages = [
        {"role": "user", "content": "<a & b> é"},
        {"role": "skip", "content": "hidden"},
        {"role": "stop", "content": "end"},
        {"role": "user", "content": "never"},
    ]
    got = render_chat(FEATURES_TEMPLATE, messages, add_generation_prompt=False)
    assert got == '[user] "<a & b> é"\ncount=1 tools=null extra={"a": 1}\ngen'


def test_none_values_are_dropped() -> None:
    template = "{% for m in messages %}{{ m.role }}:{{ 'content' in m }};{% endfor %}"
    got = render_chat(template, [{"role": "assistant", "content": None}, {"role": "user", "content": "x"}])
    assert got == "assistant:False;user:True;"


def test_extra_variables_and_strftime_now() -> None:
    template = "{{ bos_token }}{{ greeting }} {{ strftime_now('%Y') }}{{ eos_token }}"
    got = render_chat(template, [], bos_token="<s>", eos_token="</s>", greeting="hello")
    assert got == f"<s>hello {datetime.now().year}</s>"


def test_raise_exception_is_a_chat_template_error() -> None:
    gemma = chat_fixture("gemma3")["template"]
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        render_chat(gemma, two_users, bos_token="<bos>")
    with pytest.raises(ChatTemplateError, match="boom") as info:
        render_chat("{{ raise_exception('boom') }}", [])
    assert isinstance(info.value, MeshpyError) and isinstance(info.value, ValueError)


def test_broken_templates_are_chat_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for m in messages %}", [])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):  # the sandbox refuses attribute tricks
        render_chat("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(ChatTemplateError):  # namespaces refuse underscore names
        render_chat("{% set ns = namespace(_x=1) %}", [])
    with pytest.raises(ChatTemplateError):
        render_chat("{{ x }}", ["not a dict"])  # type: ignore[list-item]


def test_templates_are_compiled_once() -> None:
    template = "{{ messages | length }} cached-template-probe"
    _compile.cache_clear()
    for n in range(3):
        assert render_chat(template, [{"role": "user", "content": "x"}] * n) == f"{n} cached-template-probe"
    info = _compile.cache_info()
    assert (info.misses, info.hits) == (1, 2)
