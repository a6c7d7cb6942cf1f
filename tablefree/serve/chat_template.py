"""A model's chat template, rendered in a sandbox that bounds what one rendering may build.

The template is Jinja from the model directory, run on every chat request. jinja2's immutable sandbox (the
one transformers renders in) blocks attribute tricks but not `{{ 'a' * 20000000000 }}`. This sandbox also
bounds, before they are made, every string, list and number a template builds (operators, filters, string
methods, macro and block output, namespace attributes), the ranges one rendering may loop over, and its
output, all to `limit` (characters, items, loop steps). The server renders the template once at start.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

LARGEST_INTEGER_BITS = 4096  # numbers a template computes stay this small (2 ** 10 ** 9 would take the CPU for minutes)
LARGEST_JSON_INDENT = 64
RANGE_BUDGET = "\u2063range budget"  # the rendering's remaining loop steps, where a template cannot name or reach it
# %-style and {}-style conversion specs, for the widths and precisions they hold.
PERCENT_SPEC = re.compile(r"%[#0 +\-]*(\*|\d*)(?:\.(\*|\d*))?")
BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}")


class ChatTemplateError(Exception):
    """The template failed or was refused for one conversation; the message says why, on one line."""


class TooLarge(jinja2.exceptions.SecurityError):
    pass


def weight(value, limit: int) -> int:
    """The size a value stands for once it is text: characters of strings, items of containers (nested ones summed,
    a list of a million references to one long string counts each); counting stops past `limit`."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, dict)):
        total = len(value)
        for item in value.items() if isinstance(value, dict) else value:
            total += weight(item, limit)
            if total > limit:
                break
        return total
    return 1


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (the assistant-mask tag some templates carry) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox in which nothing a template builds may pass `limit` (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limit: int):
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[GenerationBlock, jinja2.ext.loopcontrols])
        self.limit = limit
        del self.globals["lipsum"]  # n paragraphs of filler: no chat template needs it
        self.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=self.namespace)
        self.filters["tojson"] = tojson
        self.filters = {name: self.bounded_filter(name, f) for name, f in self.filters.items()}

    def check_count(self, value, where: str) -> None:
        """An integer argument is a width or a count (center, ljust, indent, batch, ...): it stays within the limit."""
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limit:
            raise TooLarge(f"the chat template passes {value} to {where}; widths and counts stop at {self.limit:,}")

    def refuse_over(self, size: int, what: str) -> None:
        if size > self.limit:
            raise TooLarge(f"the chat template would build {what} of more than {self.limit:,} characters or items")

    def check_built(self, value):
        self.refuse_over(weight(value, self.limit), "a value")
        return value

    # ---- what the template calls ----
    def call_binop(self, context, operator, left, right):
        numbers = all(isinstance(x, int) and not isinstance(x, bool) for x in (left, right))
        if operator == "*" and numbers:
            if left.bit_length() + right.bit_length() > LARGEST_INTEGER_BITS:
                raise TooLarge(f"the chat template would compute a number over {LARGEST_INTEGER_BITS} bits")
        elif operator == "*":
            sequence, times = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(times, int) and isinstance(sequence, (str, list, tuple)):
                self.refuse_over(weight(sequence, self.limit) * max(times, 0), "a repeated string or list")
        elif operator == "**" and numbers and abs(left) > 1 and right * left.bit_length() > LARGEST_INTEGER_BITS:
            raise TooLarge(f"the chat template would compute a number over {LARGEST_INTEGER_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self.refuse_over(weight(left, self.limit) + weight(right, self.limit), "a joined string or list")
        elif operator == "%" and isinstance(left, str):
            self.check_format(left, right if isinstance(right, (tuple, dict)) else (right,))
        return self.check_built(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature, whose names cannot clash)
        for value in (*args, *kwargs.values()):
            if not getattr(__obj, "checks_its_widths", False):
                __self.check_count(value, "a call")
            __self.check_built(value)  # what a macro calls itself with, among others
        if __obj is safe_range:
            budget = __context.parent[RANGE_BUDGET]
            budget[0] -= len(range(*args))
            if budget[0] < 0:
                raise TooLarge(f"the chat template loops over more than {__self.limit:,} numbers in one rendering")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)):
            args = __self.check_string_method(__obj.__name__, owner, args, kwargs)
        return __self.check_built(super().call(__context, __obj, *args, **kwargs))

    def check_string_method(self, name: str, text, args: tuple, kwargs: dict) -> tuple:
        """Refuses the string methods whose result can outgrow their inputs many times over, before they run;
        returns the arguments to call with (an iterable to join is read once, here)."""
        if name == "join" and args:
            items = list(args[0])
            self.refuse_over(sum(weight(i, self.limit) for i in items) + len(text) * len(items), "a joined string")
            return (items, *args[1:])
        elif name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            count = text.count(old) if old else len(text) + 1
            self.refuse_over(len(text) + count * max(0, len(new) - len(old)), "a replaced string")
        elif name == "expandtabs":
            tab = args[0] if args else kwargs.get("tabsize", 8)
            self.refuse_over(len(text) + text.count("\t" if isinstance(text, str) else b"\t") * max(tab, 0), "a string")
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((weight(v, self.limit) for v in args[0].values()), default=1)
            self.refuse_over(len(text) * max(longest, 1), "a translated string")
        return args

    def wrap_str_format(self, value):
        """`text.format(...)` and `format_map`, checked as `%` and the format filter are."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None

        @functools.wraps(wrapper)
        def bounded(*args, **kwargs):
            mapping = args[0].values() if args and isinstance(args[0], dict) else ()  # format_map's
            self.check_format(value.__self__, (*args, *kwargs.values(), *mapping))
            return self.check_built(wrapper(*args, **kwargs))

        bounded.checks_its_widths = True  # in its format string: its arguments are values, not widths
        return bounded

    def check_format(self, text: str, values) -> None:
        """A format string's widths and precisions, and what its fields can expand to, before it is applied."""
        for match in (*PERCENT_SPEC.finditer(text), *BRACE_SPEC.finditer(text)):
            spec = "".join(g or "" for g in match.groups())
            if "*" in spec or "{" in spec or any(int(n) > self.limit for n in re.findall(r"\d+", spec)):
                raise TooLarge(f"the chat template formats with a width or precision it cannot be held to "
                               f"({match.group()!r})")
        values = values.values() if isinstance(values, dict) else values
        sizes = (weight(v, self.limit) if isinstance(v, (str, bytes, list, tuple, dict)) else len(str(v))
                 for v in values)
        self.refuse_over(len(text) + (text.count("%") + text.count("{")) * max(sizes, default=0), "a formatted string")

    def bounded_filter(self, name: str, function):
        # A filter marked pass_context (or eval context, or environment) gets that first, then the value.
        passes_state = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

        @functools.wraps(function)
        def bounded(*args, **kwargs):
            state, value, rest = args[:passes_state], args[passes_state], args[passes_state + 1:]
            if name != "format":  # format's arguments are values; its widths are in its format string
                for argument in (*rest, *kwargs.values()):
                    self.check_count(argument, f"|{name}")
            if name == "join":
                value = list(value)
                separator = str(rest[0] if rest else kwargs.get("d", ""))
                joined = sum(weight(i, self.limit) for i in value) + len(separator) * len(value)
                self.refuse_over(joined, "a joined string")
            elif isinstance(value, str):
                self.check_filter_on_text(name, value, rest, kwargs)
            return self.check_built(function(*state, value, *rest, **kwargs))

        return bounded

    def check_filter_on_text(self, name: str, text: str, args, kwargs) -> None:
        if name == "replace" and len(args) >= 2:
            self.check_string_method("replace", text, (str(args[0]), str(args[1])), {})
        elif name == "indent":
            width = args[0] if args else kwargs.get("width", 4)
            prefix = len(width) if isinstance(width, str) else max(width, 0) if isinstance(width, int) else 0
            self.refuse_over(len(text) + (text.count("\n") + 1) * prefix, "an indented string")
        elif name == "wordwrap":
            width = args[0] if args else kwargs.get("width", 79)
            wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
            lines = len(text) // max(width, 1) + 1 if isinstance(width, int) else len(text)
            self.refuse_over(len(text) + lines * len(str(wrap)), "a wrapped string")
        elif name == "format":
            self.check_format(text, (*args, *kwargs.values()))

    def namespace(self, *args, **kwargs):
        return BoundedNamespace(self, *args, **kwargs)

    # Output built inside a rendering (macro bodies, `{% set x %}` blocks, `{% filter %}`) is joined here.
    def concat(self, pieces):
        pieces = list(pieces)
        self.refuse_over(sum(len(p) for p in pieces), "a block of output")
        return "".join(pieces)


class BoundedNamespace(jinja2.utils.Namespace):
    """`namespace()`: the one object a template may change; its attributes are bounded and never dunder names."""

    def __init__(*args, **kwargs):  # noqa: N805 (the signature trick of jinja's Namespace)
        self, environment, args = args[0], args[1], args[2:]
        attributes = dict(*args, **kwargs)
        object.__setattr__(self, "_environment", environment)
        for name, value in attributes.items():
            BoundedNamespace.check(self, name, value)
        jinja2.utils.Namespace.__init__(self, attributes)

    # Called on the class: a Namespace answers attribute lookups from its attributes alone.
    def check(self, name, value) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set the namespace attribute {name!r}")
        object.__getattribute__(self, "_environment").check_built(value)

    def __setitem__(self, name, value):
        BoundedNamespace.check(self, name, value)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def strftime_now(format):
    return datetime.now().strftime(format)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """JSON as chat templates expect it: no HTML escaping (jinja's own tojson escapes <, > and &)."""
    if (len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0) > LARGEST_JSON_INDENT:
        raise TooLarge(f"the chat template indents JSON by more than {LARGEST_JSON_INDENT}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A tokenizer's chat template, compiled once into a BoundedSandbox; `render` turns a conversation into text."""

    def __init__(self, tokenizer, limit: int):
        source = tokenizer.chat_template
        if isinstance(source, dict):  # named templates: the default one is the chat's
            if "default" not in source:
                raise ChatTemplateError(f"the tokenizer has chat templates named {', '.join(map(str, source))} and "
                                        f"none named default")
            source = source["default"]
        self.limit = limit
        self.environment = BoundedSandbox(limit)
        self.variables = {name: value for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        try:
            self.template = self.environment.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template is not valid Jinja: {exc.message} (line {exc.lineno})") from None

    def render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as text; ChatTemplateError when the template fails or would pass the limit."""
        pieces, size = [], 0
        try:
            for piece in self.template.generate(**self.variables, messages=conversation, tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **{RANGE_BUDGET: [self.limit]}):
                size += len(piece)
                self.environment.refuse_over(size, "output")
                pieces.append(piece)
        except TooLarge as exc:
            raise ChatTemplateError(str(exc)) from None
        except jinja2.TemplateError as exc:  # jinja's errors, the sandbox's refusals, the template's raise_exception
            raise ChatTemplateError(" ".join(str(exc).split())[:300] or type(exc).__name__) from None
        except (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError, MemoryError) as exc:
            raise ChatTemplateError(" ".join(f"{type(exc).__name__}: {exc}".split())[:300]) from None
        return "".join(pieces)
