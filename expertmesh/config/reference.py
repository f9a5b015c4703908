"""docs/configuration.md, generated from the config schema itself: one section per dataclass of the JobConfig
tree, its docstring as the intro, and one table row per field with the field's default and its comment (the
`#` lines directly above the field, then the comment at the end of its line). Regenerate the page with

    python -m expertmesh.config.reference > docs/configuration.md

The comments are read from expertmesh/config/schema.py's source with `ast` and `tokenize`, the defaults from
the dataclasses. Imports no torch; tests/unit/test_config_reference.py keeps the page equal to this output."""

from __future__ import annotations

import ast
import dataclasses
import io
import json
import re
import tokenize
import typing
from pathlib import Path
from typing import Any

from expertmesh.config import schema

HEADER = """\
# Configuration

Every config key, its default and its meaning. This page is generated from the config dataclasses in
`expertmesh/config/schema.py` (each section's docstring, each field's comment): edit those, then run
`python -m expertmesh.config.reference > docs/configuration.md`. A test keeps the page equal to that output.

How to set keys (`--config`, dotted overrides) and what a bad value does is in the [README](../README.md#running).
The defaults below are the default run; `configs/default.toml` spells them out (a test keeps the two equal).
The resolved config is written to `runs/<name>/config.json`. Defaults are written as TOML writes them.
"""

DOC_REF = re.compile(r"(?<![\w/])docs/(?P<page>[\w.-]+\.md(?:#[\w-]+)?)")  # "docs/fssdp.md" in a comment


def sections(root: type = schema.JobConfig, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted name, dataclass) of every config section in JobConfig's field order, each nested section
    (moe.fssdp) right after its parent."""
    out = []
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            name = prefix + f.name
            out += [(name, hints[f.name]), *sections(hints[f.name], name + ".")]
    return out


def keys(cls: type) -> list[dataclasses.Field]:
    """The fields of a section that are keys (a nested dataclass is a section of its own)."""
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])]


def default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def toml_value(value: Any) -> str:
    """`value` as a TOML file writes it: strings quoted, booleans lowercase, lists as [...], floats as repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for the default {value!r} ({type(value).__name__})")


def parse(source: str) -> dict[str, tuple[str, dict[str, str]]]:
    """class name -> (docstring, {field name: comment}) for every class in `source`. A field's comment is the
    run of comment-only lines directly above it (no blank line between) joined with the comments on its own
    lines, with spaces."""
    text, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                alone.add(tok.start[0])
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        comments = {}
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                first = stmt.lineno
                while first - 1 in alone:
                    first -= 1
                lines = range(first, stmt.end_lineno + 1)
                comments[stmt.target.id] = " ".join(text[n] for n in lines if text.get(n))
        out[node.name] = (ast.get_docstring(node) or "", comments)
    return out


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def linked(text: str) -> str:
    """`docs/x.md` references made links relative to docs/ (the page lives there)."""
    return DOC_REF.sub(lambda m: f"[docs/{m['page']}]({m['page']})", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section_markdown(name: str, cls: type, doc: str, comments: dict[str, str]) -> str:
    rows = [f"| `{name}.{f.name}` | `{cell(toml_value(default(f)))}` | {cell(linked(comments.get(f.name, '')))} |"
            for f in keys(cls)]
    intro = f"{linked(doc)}\n\n" if doc else ""
    return f"## `{name}`\n\n{intro}| key | default | meaning |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def markdown() -> str:
    """The page docs/configuration.md, from the schema's source and defaults."""
    parsed = parse(Path(schema.__file__).read_text(encoding="utf-8"))
    found = sections()
    contents = "Sections: " + ", ".join(f"[`{name}`](#{anchor(f'`{name}`')})" for name, _ in found) + ".\n"
    parts = [HEADER, contents]
    for name, cls in found:
        doc, comments = parsed[cls.__name__]
        parts.append(section_markdown(name, cls, doc, comments))
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
