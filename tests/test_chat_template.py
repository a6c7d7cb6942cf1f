"""Chat templates render in a bounded sandbox: as transformers renders them, and never past the bound."""

import contextlib
import io
import shutil

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from serve_process import ServerProcess

from tablefree.serve.chat_template import ChatTemplate, ChatTemplateError

LIMIT = 1 << 16


class TemplateOnly:
    """What ChatTemplate reads of a tokenizer."""

    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>"}

    def __init__(self, source: str):
        self.chat_template = source


def render(source: str, content: str = "hello", limit: int = LIMIT) -> str:
    return ChatTemplate(TemplateOnly(source), limit).render([{"role": "user", "content": content}], True)


def test_the_code_point_template_renders_as_transformers_renders_it(code_point_tokenizer):
    template = ChatTemplate(code_point_tokenizer, LIMIT)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b> & {{ x }}"},
                    {"role": "assistant", "content": "Hello."}, {"role": "tool", "content": "42"},
                    {"role": "user", "content": "And?"}]
    for prompt in (True, False):
        assert template.render(conversation, prompt) == code_point_tokenizer.apply_chat_template(
            conversation, add_generation_prompt=prompt, tokenize=False)
    with pytest.raises(ChatTemplateError, match="unknown chat role robot; use system, developer, user, assistant or tool"):
        template.render([{"role": "robot", "content": "x"}], True)


@pytest.mark.parametrize("source, message", [
    ("{{ 'a' * 20000000000 }}", "would build a repeated string or list of more than 65,536"),
    ("{{ [messages] * 100000 }}", "would build a repeated string or list"),
    ("{{ 2 ** 100000 }}", "would compute a number over 4096 bits"),
    ("{{ 'a'|center(1000000000) }}", "passes 1000000000 to |center"),
    ("{{ 'a'.ljust(1000000000) }}", "passes 1000000000 to a call"),
    ("{% set ns = namespace(x='a') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "would build a value of more than"),
    ("{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s }}{% endmacro %}{{ f('a', 40) }}", "would build a value"),
    ("{% for i in range(300) %}{% for j in range(300) %}{% endfor %}{% endfor %}", "loops over more than 65,536 numbers"),
    ("{{ messages[0].content.replace('', messages[0].content) }}", "would build a replaced string"),
    ("{{ messages[0].content|list|join(messages[0].content) }}", "would build a joined string"),
    ("{{ messages[0].content.join(messages[0].content) }}", "would build a joined string"),
    ("{{ '%0999999999d' % 1 }}", "formats with a width or precision it cannot be held to"),
    ("{{ '{:>999999999}'.format(1) }}", "formats with a width or precision it cannot be held to"),
    ("{{ '%*d'|format(99999999, 1) }}", "formats with a width or precision it cannot be held to"),
    ("{% for i in range(9999) %}{{ messages[0].content }}{% endfor %}", "would build output of more than"),
    ("{% set x %}{% for i in range(9999) %}{{ messages[0].content }}{% endfor %}{% endset %}{{ x|length }}",
     "would build a block of output"),
    ("{{ messages[0].content|indent(1000) }}", "would build an indented string"),
    ("{{ messages[0].content|wordwrap(1, wrapstring=messages[0].content) }}", "would build a wrapped string"),
    ("{{ lipsum(5) }}", "'lipsum' is undefined"),
    ("{% set ns = namespace() %}{% set ns.__class__ = 1 %}", "may not set the namespace attribute '__class__'"),
    ("{{ messages|tojson(indent=100) }}", "indents JSON by more than 64"),
    ("{% for", "is not valid Jinja"),
])
def test_hostile_templates_are_refused_before_they_build(source, message):
    with pytest.raises(ChatTemplateError, match=message.replace("(", r"\(").replace("|", r"\|").replace("*", r"\*")):
        render(source, content="x\t\n" * 400)


def test_generation_blocks_and_template_helpers_render():
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% generation %}"
              "{{ m|tojson }}{% endgeneration %}{% endfor %}{{ ns.n }}{{ eos_token }}{{ strftime_now('%Y')|length }}")
    assert render(source, "<&>") == '{"role": "user", "content": "<&>"}1</s>4'


# Expressions that multiply what they are given, composed at random with sizes up to a trillion.
LEAVES = st.sampled_from(["'ab'", "messages[0].content", "[1, 'a']", "messages", "'%s{}'"])
SIZES = st.one_of(st.integers(0, 3), st.integers(100, 5000), st.integers(10**6, 10**12))
AMPLIFIERS = ["({a} * {n})", "({a} ~ {a})", "({a} + {a})", "({a}|join)", "(({a}|string).replace('', {a}|string))",
              "([{a}] * {n})", "({a}|string|indent({n}))", "({a}|string|center({n}))", "(({a}|string).expandtabs({n}))",
              "({a}|string|wordwrap(3, wrapstring={a}|string))", "(2 ** {n})", "({a}|list)", "({a}|tojson)",
              "(({a}|string) % ({a}|string))", "(({a}|string).format({a}))", "({a}|string).join({a}|list)"]


def _amplified(inner):
    return st.tuples(st.sampled_from(AMPLIFIERS), inner, SIZES).map(lambda t: t[0].format(a=t[1], n=t[2]))


TEMPLATES = st.one_of(
    st.recursive(LEAVES, _amplified, max_leaves=4).map(lambda e: "{{ " + e + " }}"),
    st.tuples(st.recursive(LEAVES, _amplified, max_leaves=3), SIZES).map(
        lambda t: f"{{% for i in range({min(t[1], 99999)}) %}}{{{{ {t[0]} }}}}{{% endfor %}}"),
    st.tuples(st.recursive(LEAVES, _amplified, max_leaves=2), st.integers(1, 60)).map(
        lambda t: f"{{% set ns = namespace(v={t[0]}) %}}{{% for i in range({t[1]}) %}}{{% set ns.v = ns.v ~ ns.v %}}"
                  f"{{% endfor %}}{{{{ ns.v }}}}"),
)


@settings(max_examples=150, deadline=None)
@given(source=TEMPLATES)
def test_whatever_a_template_multiplies_its_output_stays_within_the_bound(source):
    try:
        text = render(source, content="x\t{}" * 300)
    except ChatTemplateError as exc:
        assert not str(exc).startswith("MemoryError"), source  # refused before allocating, not by running out
    else:
        assert len(text) <= LIMIT


# ---- the server ----
def _model_with_template(saved_tiny_model, tmp_path, source: str):
    target = tmp_path / "model"
    shutil.copytree(saved_tiny_model[0], target)
    (target / "chat_template.jinja").write_text(source)
    return target


@pytest.mark.parametrize("source, message", [
    ("{{ 'a' * 20000000000 }}", "error: the model's chat template fails on a one-line chat: the chat template would "
                                "build a repeated string or list of more than 8,388,608 characters or items"),
    ("{% for m in messages %}{{ m.content }", "error: the model's chat template cannot be used: the chat template is "
                                              "not valid Jinja: unexpected '}' (line 1)"),
])
def test_serve_refuses_a_failing_template_at_start(saved_tiny_model, tmp_path, source, message):
    from tablefree.cli import main

    target = _model_with_template(saved_tiny_model, tmp_path, source)
    stream = io.StringIO()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        code = main(["serve", str(target), "--port", "0"])
    assert code == 2 and stream.getvalue().strip().splitlines() == [message], stream.getvalue()


def test_a_rendering_over_the_bound_is_a_400_for_that_request_alone(saved_tiny_model, tmp_path):
    source = "{% for m in messages %}[USER]{{ m.content * 1000 }}[EOT]{% endfor %}[ASSISTANT]"
    server = ServerProcess(_model_with_template(saved_tiny_model, tmp_path, source), tmp_path / "serve.log",
                           "--max-body-bytes", "65536")
    try:
        chat = {"messages": [{"role": "user", "content": "x" * 1000}], "max_tokens": 1}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "messages" and "would build a repeated string or list of more than 131,072" in error["message"]
        chat["messages"][0]["content"] = "x"
        assert httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=120).status_code == 200
    finally:
        server.stop()
