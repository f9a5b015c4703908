"""The documentation stays true to the repository: the README stays short, every test the README, docs/ and
benchmarks/README.md name exists, and every relative link between those pages reaches a file (and a heading,
when it names one)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 25_000  # bytes: the README is the short entry point; everything else lives under docs/


def pages() -> list[Path]:
    """The pages whose test names and links are checked: README.md, docs/*.md, benchmarks/README.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


# `tests/unit/test_x.py`, `tests/unit/test_x.py::test_y`, `tests/unit/test_x.py::test_y[param]`, and
# `...::test_z`, which names a test in the last file named in full before it on the same page
TEST_REF = re.compile(r"(?P<file>tests/[\w./-]+?\.(?:py|sh))(?:::(?P<name>\w+)(?:\[[^\]]*\])?)?"
                      r"|(?<![\w/.])\.\.\.::(?P<short>\w+)(?:\[[^\]]*\])?")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def named_tests(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, file, name or None) for every test the page names, `...::name` resolved to its file."""
    text, refs, last_file = page.read_text(), [], None
    for m in TEST_REF.finditer(text):
        if m["file"]:
            last_file = m["file"]
            refs.append((line_of(text, m.start()), m["file"], m["name"]))
        else:
            refs.append((line_of(text, m.start()), last_file, m["short"]))
    return refs


def defines(source: str, name: str) -> bool:
    pattern = rf"^\s*(?:async\s+)?def {name}\(|^\s*class {name}\b|^\s*{name}\s*="
    return re.search(pattern, source, re.M) is not None


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not `-` or `_`), spaces to `-`."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes > {README_LIMIT}: move a section to docs/"


def test_every_named_test_exists():
    missing, count = [], 0
    for page in pages():
        where = page.relative_to(ROOT)
        for line, file, name in named_tests(page):
            count += 1
            label = f"{where}:{line}: {file}" + (f"::{name}" if name else "")
            if file is None:
                missing.append(f"{where}:{line}: ...::{name} has no earlier full file reference on the page")
            elif not (ROOT / file).is_file():
                missing.append(f"{label} (no such file)")
            elif name and not defines((ROOT / file).read_text(), name):
                missing.append(f"{label} (no `def {name}(`, `class {name}` or `{name} =` in {file})")
    assert count > 0, "no test references found: the pattern no longer matches the pages"
    assert not missing, "tests named in the documentation that do not exist:\n" + "\n".join(missing)


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        text = FENCE.sub(lambda m: "\n" * m.group().count("\n"), page.read_text())
        for m in LINK.finditer(text):
            target = m["target"]
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            label = f"{page.relative_to(ROOT)}:{line_of(text, m.start())}: ({target})"
            if not dest.exists():
                broken.append(f"{label} no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{label} no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "broken links in the documentation:\n" + "\n".join(broken)
