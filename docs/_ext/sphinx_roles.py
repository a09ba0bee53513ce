"""Griffe extension for the docs build: render the Sphinx-isms of the docstrings as Markdown.

The library's numpy-style docstrings use reStructuredText habits (``:class:`X```
roles, ``::`` before literal blocks, simple ``=====`` tables). mkdocstrings renders
docstrings as Markdown, where these show up verbatim. Before docstrings are parsed,
this extension rewrites, in place and for the docs only:

* ``:class:`~pkg.mod.Name``` (any role) -> an optional cross-reference to the object,
  resolved from the docstring's own scope (unresolvable names become code spans);
* a trailing ``::`` -> ``:`` (the indented block below is a code block in Markdown too);
* code markup in the type of numpy ``name : type`` lines (rendered as plain text) is dropped;
* simple reST tables -> Markdown pipe tables;
* doctest blocks (``>>>``) -> fenced ``pycon`` code.

It is loaded by ``mkdocs.yml`` (``plugins.mkdocstrings.handlers.python.options.extensions``)
and is not part of the library.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|obj|exc|const|ref):`(~?)([^`<>]+?)`")
RULE = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


def _lazy_export(target: str) -> str:
    """``combinability.<name>`` re-exported lazily (``combinability._LAZY``) -> its defining module's path."""
    package, _, name = target.partition(".")
    if package != "combinability" or not name or "." in name:
        return target
    try:
        from combinability import _LAZY
    except ImportError:
        return target
    module = _LAZY.get(name)
    return target if module is None or module == target else f"{module}.{name}"


def _resolve(obj: griffe.Object, target: str, loader: griffe.GriffeLoader) -> str | None:
    """Full path of ``target`` seen from ``obj``, or None."""
    target = _lazy_export(target.strip().rstrip("()"))
    found: Any = None
    try:
        found = loader.modules_collection[target]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        found = None
    if found is None:
        head, _, rest = target.partition(".")
        try:
            path = obj.resolve(head)
        except (griffe.NameResolutionError, griffe.AliasResolutionError, griffe.CyclicAliasError, KeyError):
            return target if "." in target else None
        full = f"{path}.{rest}" if rest else path
        try:
            found = loader.modules_collection[full]
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            return full
    try:
        found = found.final_target if found.is_alias else found
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return found.path
    if found.is_module and found.name in found.members:  # a function shadowing its own module
        return found.members[found.name].path
    return found.path


def _roles(text: str, obj: griffe.Object, loader: griffe.GriffeLoader) -> str:
    def repl(match: re.Match[str]) -> str:
        short, target = match.group(1) == "~", match.group(2).strip()
        title = target.rsplit(".", 1)[-1] if short else target
        path = _resolve(obj, target, loader)
        code = f"<code>{html.escape(title)}</code>"
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'

    return ROLE.sub(repl, text)


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    parts = re.split(r"\s{2,}", line.strip())
    if len(parts) != len(spans):  # fall back on the rule's column positions
        parts = [line[a:b if i < len(spans) - 1 else None].strip() for i, (a, b) in enumerate(spans)]
    return [p.replace("|", r"\|") for p in parts]


def _tables(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = RULE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent = match.group(1)
        spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[i])]
        rules = [i]
        j = i + 1
        while j < len(lines) and len(rules) < 3:
            if RULE.match(lines[j]):
                rules.append(j)
            elif not lines[j].strip():
                break
            j += 1
        if len(rules) < 3:  # not a complete simple table: leave it alone
            out.append(lines[i])
            i += 1
            continue
        header = [_cells(line, spans) for line in lines[rules[0] + 1 : rules[1]]]
        body = [_cells(line, spans) for line in lines[rules[1] + 1 : rules[2]] if line.strip()]
        head = header[0] if header else [""] * len(spans)
        out.append(f"{indent}| " + " | ".join(head) + " |")
        out.append(f"{indent}|" + "---|" * len(spans))
        out.extend(f"{indent}| " + " | ".join(row) + " |" for row in body)
        i = rules[2] + 1
    return "\n".join(out)


PARAM = re.compile(r"^(\s*[\w*][\w*, ]*) : (.+)$")


def _strip_code(s: str) -> str:
    return s.replace("``", "").replace("`", "")


def _param_types(text: str) -> str:
    """Drop the code markup from types (rendered as plain text): ``name : type`` lines, and the
    unindented lines of Returns/Yields sections."""
    lines = text.split("\n")
    section, base = "", None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if i + 1 < len(lines) and stripped and set(lines[i + 1].strip()) == {"-"}:
            section, base = stripped.lower(), len(line) - len(line.lstrip())
            continue
        match = PARAM.match(line)
        if match:
            lines[i] = f"{match.group(1)} : {_strip_code(match.group(2))}"
        elif section in ("returns", "yields") and stripped and len(line) - len(line.lstrip()) == base:
            lines[i] = _strip_code(line)
    return "\n".join(lines)


def _literal_markers(text: str) -> str:
    out = []
    for line in text.split("\n"):
        stripped = line.rstrip()
        if stripped.strip() == "::":
            out.append("")
        elif stripped.endswith("::") and not stripped.endswith(":::"):
            out.append(stripped[:-1])
        else:
            out.append(line)
    return "\n".join(out)


def _doctests(text: str) -> str:
    """Fence doctest blocks (a ``>>>`` line up to the next blank line) as ``pycon`` code.

    Unfenced, Markdown reads their ``a[[2, 0]]`` indexing as reference links.
    """
    out: list[str] = []
    fenced, block_indent = False, None
    for line in text.split("\n"):
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if block_indent is not None and not stripped:
            out.append(f"{block_indent}```")
            block_indent = None
        elif block_indent is None and not fenced and stripped.startswith(">>>"):
            out.append(f"{indent}```pycon")
            block_indent = indent
        elif block_indent is None and stripped.startswith("```"):
            fenced = not fenced
        out.append(line)
    if block_indent is not None:
        out.append(f"{block_indent}```")
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite every docstring of a loaded package (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                text = _doctests(_tables(_literal_markers(_param_types(obj.docstring.value))))
                obj.docstring.value = _roles(text, obj, loader)
                obj.docstring.__dict__.pop("parsed", None)  # drop a cached parse, if any
            stack.extend(m for m in obj.members.values() if not m.is_alias)
