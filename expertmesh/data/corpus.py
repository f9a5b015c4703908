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


def glob_files(patterns: list[str]) -> list[Path]:
    files: set[Path] = set()
    for pattern in patterns:
        files.update(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise ConfigError(f"data.paths {patterns} matched no files")
    return sorted(files)


def _read(path: Path, jsonl_field: str) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return text
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{lineno} is not valid JSON: {e.msg}") from None
        if not isinstance(record, dict) or jsonl_field not in record:
            raise ConfigError(f"{path}:{lineno} has no field '{jsonl_field}' (set data.jsonl_field)")
        docs.append(str(record[jsonl_field]))
    return SEPARATOR.join(docs)


def load_text(cfg: DataConfig) -> str:
    """The whole corpus as one string, capped at `cfg.max_bytes` characters (0 = no cap)."""
    files = stdlib_files() if cfg.source == "stdlib" else glob_files(cfg.paths)
    parts, size = [], 0
    for path in files:
        text = _read(path, cfg.jsonl_field)
        parts.append(text)
        size += len(text) + len(SEPARATOR)
        if cfg.max_bytes and size >= cfg.max_bytes:
            break
    corpus = SEPARATOR.join(parts)
    return corpus[: cfg.max_bytes] if cfg.max_bytes else corpus
