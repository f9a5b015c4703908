"""Where the serving ranks' requests come from: a JSONL file, stdin, or the built-in synthetic stream.

A JSONL line (or a stdin line) is {"prompt": text} or {"tokens": [ids]}, with optional "id" and
"domain" (metrics are kept per domain); a stdin line that is not JSON is a plain-text prompt. A line that
is none of these is still a request, one that carries its `error`: the server answers it with an error
line, as it does a prompt too long for the models, and goes on (one bad request never stops the service).
The synthetic stream cuts `prompt_len`-token prompts from the held-out end (the last tenth) of a
built-in text domain, `domain:count` entries in order (e.g. 400 from stdlib, then 400 from headers).
Every serving rank reads the same stream and answers the requests whose index i has
i % servers == its server index, so no request is answered twice or skipped.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from expertmesh.config import ConfigError, DistillConfig

HELD_OUT = 0.1  # synthetic prompts come from the last tenth of each domain's text
DOMAIN_BYTES = 4_000_000  # text read per synthetic domain


@dataclass
class Request:
    index: int  # position in the stream
    id: str
    domain: str
    tokens: list[int]
    error: str | None = None  # a malformed line: answered with this error, never decoded


def _parse(line: str, lineno: int, where: str, tokenizer,
           plain_ok: bool) -> tuple[str, str, list[int], str | None] | None:
    """(id, domain, tokens, error) of one line; None for a blank line."""
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        if plain_ok:
            return str(lineno), "default", tokenizer.encode(line).tolist(), None
        return str(lineno), "default", [], f"{where}:{lineno} is not valid JSON: {e.msg}"
    if not isinstance(rec, dict) or ("prompt" in rec) == ("tokens" in rec):
        rid = str(rec.get("id", lineno)) if isinstance(rec, dict) else str(lineno)
        return rid, "default", [], f"{where}:{lineno} needs exactly one of 'prompt' (text) or 'tokens' (ids)"
    rid, domain = str(rec.get("id", lineno)), str(rec.get("domain", "default"))
    if "tokens" in rec:
        tokens = rec["tokens"]
        if not isinstance(tokens, list) or not tokens or \
                not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            return rid, domain, [], f"{where}:{lineno} 'tokens' must be a non-empty list of token ids (ints >= 0)"
    else:
        tokens = tokenizer.encode(str(rec["prompt"])).tolist()
    if not tokens:
        return rid, domain, [], f"{where}:{lineno} has an empty prompt"
    return rid, domain, tokens, None


def _lines(source: str, tokenizer) -> Iterator[tuple[str, str, list[int], str | None]]:
    if source == "stdin":
        for lineno, line in enumerate(sys.stdin, 1):
            if (item := _parse(line, lineno, "stdin", tokenizer, plain_ok=True)) is not None:
                yield item
        return
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"distill.prompts={source!r}: no such file (or 'synthetic', 'stdin')")
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if (item := _parse(line, lineno, source, tokenizer, plain_ok=False)) is not None:
                yield item


def synthetic(entries: list[str], prompt_len: int, tokenizer, seed: int) -> Iterator[tuple[str, str, list[int], None]]:
    from expertmesh.data.corpus import domain_text

    rng = random.Random(seed)
    n = 0
    for entry in entries:
        domain, _, count = entry.partition(":")
        text = domain_text(domain, DOMAIN_BYTES)
        tokens = tokenizer.encode(text[int(len(text) * (1 - HELD_OUT)):]).tolist()
        if len(tokens) <= prompt_len:
            raise ConfigError(f"domain {domain!r} has {len(tokens)} held-out tokens, fewer than "
                              f"distill.prompt_len={prompt_len}")
        for _ in range(int(count)):
            start = rng.randrange(len(tokens) - prompt_len)
            yield f"{domain}-{n}", domain, tokens[start:start + prompt_len], None
            n += 1


def requests(cfg: DistillConfig, tokenizer, seed: int, server: int = 0, servers: int = 1) -> Iterator[Request]:
    """This serving rank's share of the stream, in stream order."""
    if cfg.prompts == "stdin" and servers > 1:
        raise ConfigError(f"distill.prompts='stdin' feeds one serving rank, not {servers}; use a JSONL file")
    items = synthetic(cfg.synthetic, cfg.prompt_len, tokenizer, seed) if cfg.prompts == "synthetic" \
        else _lines(cfg.prompts, tokenizer)
    for i, (rid, domain, tokens, error) in enumerate(items):
        if i % servers == server:
            yield Request(i, rid, domain, tokens, error)
