"""docs/configuration.md is generated from the config schema (expertmesh/config/reference.py) and stays so:
the page is the generator's output, every key has a meaning, every default shown is the dataclass default,
and the generator runs without torch."""

import dataclasses
import difflib
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from helpers import failure

from expertmesh.config import reference

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "configuration.md"
REGENERATE = "python -m expertmesh.config.reference > docs/configuration.md"


def table_rows(page: str) -> dict[str, tuple[str, str]]:
    """key -> (default, meaning) of every table row, cells split at unescaped `|` and unescaped."""
    rows = {}
    for line in page.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 3, f"not a key | default | meaning row: {line}"
        key, default, meaning = cells
        rows[key.strip("`")] = (default.removeprefix("`").removesuffix("`"), meaning)
    return rows


def expected_keys() -> dict[str, dataclasses.Field]:
    return {f"{name}.{f.name}": f for name, cls in reference.sections() for f in reference.keys(cls)}


def test_page_is_the_generators_output():
    page, generated = PAGE.read_text(encoding="utf-8"), reference.markdown()
    diff = "".join(list(difflib.unified_diff(page.splitlines(True), generated.splitlines(True),
                                             "docs/configuration.md", "generated"))[:60])
    assert page == generated, f"docs/configuration.md is out of date: run `{REGENERATE}`\n{diff}"


def test_sections_follow_jobconfig_with_fssdp_after_moe():
    names = [name for name, _ in reference.sections()]
    assert names == ["model", "moe", "moe.fssdp", "parallel", "data", "optim", "train", "checkpoint", "metrics",
                     "diloco", "distill", "draft_head"]


def test_every_key_has_a_meaning_and_every_section_an_intro():
    rows = table_rows(reference.markdown())
    expected = expected_keys()
    assert sorted(rows) == sorted(expected), "the page's keys are not the schema's keys"
    bare = [key for key, (_, meaning) in rows.items() if not meaning]
    assert not bare, f"fields without a comment in expertmesh/config/schema.py: {bare}"
    parsed = reference.parse(Path(reference.schema.__file__).read_text(encoding="utf-8"))
    no_intro = [name for name, cls in reference.sections() if not parsed[cls.__name__][0]]
    assert not no_intro, f"sections whose dataclass has no docstring: {no_intro}"


def test_every_default_shown_is_the_dataclass_default():
    rows = table_rows(reference.markdown())
    wrong = []
    for key, f in expected_keys().items():
        shown = tomllib.loads(f"v = {rows[key][0]}")["v"]  # the value a TOML file with this text would set
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if json.dumps(shown) != json.dumps(value):  # json tells 1 from 1.0 and true from 1
            wrong.append(f"{key}: page {rows[key][0]}, dataclass {value!r}")
    assert not wrong, "\n".join(wrong)


def test_comment_lines_above_and_at_the_end_are_joined_and_pipes_escaped():
    source = '''
class C:
    """Intro."""

    # a group comment, kept apart by the blank line

    # first line
    # second line
    a: int = 1  # trailing
    b: str = "x|y"  # one | two
    c: int = 0
'''
    doc, comments = reference.parse(source)["C"]
    assert doc == "Intro."
    assert comments == {"a": "first line second line trailing", "b": "one | two", "c": ""}
    assert reference.cell("one | two") == "one \\| two"
    assert table_rows('| `s.b` | `"x\\|y"` | one \\| two |') == {"s.b": ('"x|y"', "one | two")}


def test_generator_runs_as_a_module_without_torch():
    code = ("import runpy, sys; runpy.run_module('expertmesh.config.reference', run_name='__main__'); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch'); "
            "sys.stderr.write(f'torch modules: {bad}'); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, failure(r)
    assert r.stdout == reference.markdown()
