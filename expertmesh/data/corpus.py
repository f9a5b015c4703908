"""Where training text comes from.

The default corpus is the Python standard library's own `.py` sources, found at run time through
`sysconfig` (minus its test suites): real text on every machine, nothing downloaded. The
alternative is a list of local globs (.txt/.py/.md… read as text, .jsonl read field by field).
Files are read in sorted path order, so every rank and every run sees the same bytes.
"""

from __future__ import annotations

import glob
import json
import sysconfig
from pathlib import Path

from expertmesh.config import ConfigError, DataConfig

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SEPARATOR = "\n\n"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))]
    if not files:
        raise ConfigError(f"no .py files found under the standard library at {root}")
    return sorted(files)


def header_files() -> list[Path]:
    """C headers under /usr/include: a second text domain present on every Debian-like machine."""
    root = Path("/usr/include")
    files = sorted(p for p in root.rglob("*.h") if p.is_file()) if root.is_dir() else []
    if not files:
        raise ConfigError(f"no .h files found under {root} (install libc6-dev, or use another domain)")
    return files


DOMAINS = {"stdlib": stdlib_files, "headers": header_files}


def domain_text(name: str, max_bytes: int = 0) -> str:
    """The text of a built-in domain (files in sorted order), capped at `max_bytes` (0 = all)."""
    if name not in DOMAINS:
        raise ConfigError(f"unknown text domain {name!r}; built-in domains: {', '.join(DOMAINS)}")
    return _concat(DOMAINS[name](), max_bytes, lambda p: p.read_text(encoding="utf-8", errors="replace"))


def glob_files(patterns: list[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise ConfigError(f"data.paths {patterns} matched no files")
    return sorted(files)


def jsonl_records(path: Path, lines: list[str]):
    """(line number, record) of every non-blank JSONL line; a malformed line is a ConfigError naming it."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno} is not valid JSON: {e.msg}") from None


def _read(path: Path, jsonl_field: str) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return text
    docs = []
    for lineno, record in jsonl_records(path, text.splitlines()):
        if not isinstance(record, dict) or jsonl_field not in record:
            raise ConfigError(f"{path}:{lineno} has no field '{jsonl_field}' (set data.jsonl_field)")
        docs.append(str(record[jsonl_field]))
    return SEPARATOR.join(docs)


def load_text(cfg: DataConfig) -> str:
    """The whole corpus as one string, capped at `cfg.max_bytes` characters (0 = no cap)."""
    files = stdlib_files() if cfg.source == "stdlib" else glob_files(cfg.paths)
    return _concat(files, cfg.max_bytes, lambda p: _read(p, cfg.jsonl_field))


def _concat(files: list[Path], max_bytes: int, read) -> str:
    """The files' texts joined by SEPARATOR, read in order until `max_bytes` characters (0 = all)."""
    parts, size = [], 0
    for path in files:
        parts.append(read(path))
        size += len(parts[-1]) + len(SEPARATOR)
        if max_bytes and size >= max_bytes:
            break
    corpus = SEPARATOR.join(parts)
    return corpus[:max_bytes] if max_bytes else corpus
