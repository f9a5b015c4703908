"""Chat-style JSONL (`{"messages": [{"role": ..., "content": ...}, ...]}` per line), rendered with a
checkpoint's own chat template and tokenized with its tokenizer, into a token stream and a label stream.

Labels are the tokens where the loss counts and IGNORE elsewhere: everywhere (`data.loss_on="all"`) or
only on what the assistant says (`"assistant"`). The assistant's spans are found by rendering each
conversation prefix by prefix: the text from "everything before message i, with the generation prompt"
to "everything up to message i" is message i as the template writes it (its content and its end
token). A template that does not render conversations prefix by prefix is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from expertmesh.config import ConfigError
from expertmesh.data.corpus import jsonl_records

IGNORE = -100  # cross-entropy's ignore_index: a position without loss


def find_template(directory: Path) -> tuple[str, dict]:
    """(the chat template, tokenizer_config.json's contents) of a checkpoint or tokenizer directory."""
    tok_cfg_file = directory / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text()) if tok_cfg_file.is_file() else {}
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if not template:
        raise ConfigError(f"data.format='chat' needs a chat template: {directory} has no chat_template in "
                          "tokenizer_config.json and no chat_template.jinja")
    return template, tok_cfg


def _special(tok_cfg: dict, name: str) -> str:
    value = tok_cfg.get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else value


class ChatRenderer:
    def __init__(self, template: str, tok_cfg: dict) -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: "")
        self.template = env.from_string(template)
        self.extra = {"bos_token": _special(tok_cfg, "bos_token"), "eos_token": _special(tok_cfg, "eos_token")}

    def render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=generation_prompt, **self.extra)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans of the assistant's messages in it."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            start, end = self.render(messages[:i], True), self.render(messages[: i + 1])
            if not (text.startswith(end) and end.startswith(start)):
                raise ConfigError("the chat template does not render conversations prefix by prefix: "
                                  "data.loss_on='assistant' cannot find the assistant's tokens")
            spans.append((len(start), len(end)))
        return text, spans


def chat_stream(path: Path, lines: list[str], renderer: ChatRenderer, tokenizer, loss_on: str):
    """Tokens and labels of every conversation in a JSONL file, in order."""
    tokens, labels = [], []
    for lineno, record in jsonl_records(path, lines):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ConfigError(f"{path}:{lineno} has no 'messages' list of {{role, content}} objects")
        text, spans = renderer.assistant_spans(messages)
        ids, offsets = tokenizer.encode_with_offsets(text)
        if loss_on == "all":
            keep = [True] * len(ids)
        else:  # a token counts when it starts inside an assistant span
            keep = [any(a <= s < b for a, b in spans) for s, _ in offsets]
        tokens.extend(ids)
        labels.extend(i if k else IGNORE for i, k in zip(ids, keep, strict=True))
    return tokens, labels


def load_chat(cfg, files: list[Path], tokenizer, template_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, labels) of the chat files, capped at data.max_bytes characters of JSONL (0 = all)."""
    renderer = ChatRenderer(*find_template(template_dir))
    tokens, labels, size = [], [], 0
    for path in files:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        if cfg.max_bytes:
            kept = []
            for line in lines:
                if size >= cfg.max_bytes:
                    break
                kept.append(line)
                size += len(line) + 1
            lines = kept
        t, lab = chat_stream(path, lines, renderer, tokenizer, cfg.loss_on)
        tokens += t
        labels += lab
        if cfg.max_bytes and size >= cfg.max_bytes:
            break
    if not any(lab != IGNORE for lab in labels):
        raise ConfigError(f"data.format='chat' with data.loss_on={cfg.loss_on!r}: no token of {len(files)} file(s) "
                          "carries a loss")
    return torch.tensor(tokens, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64)
