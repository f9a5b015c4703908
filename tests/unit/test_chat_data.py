"""Chat-style JSONL rendered by a checkpoint's chat template, with the loss on the assistant's tokens only."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.data.chat import IGNORE, ChatRenderer, chat_stream, find_template
from expertmesh.data.loader import TokenLoader, split_tokens
from expertmesh.data.tokenizer import BPETokenizer
from expertmesh.models.hf import load_config

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TALK = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi there!"}, {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Sure: hi."}]


def add_tokenizer(directory, template=CHATML):
    """A byte-level BPE with ChatML's special tokens and a chat template, as a checkpoint ships them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello there, the assistant says hi again and again"] * 20, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>"} | ({"chat_template": template} if template else {})
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def test_assistant_tokens_carry_the_loss(tmp_path):
    add_tokenizer(tmp_path)
    tok = BPETokenizer.load(tmp_path / "tokenizer.json")
    renderer = ChatRenderer(*find_template(tmp_path))
    text, spans = renderer.assistant_spans(TALK)
    assert [text[a:b] for a, b in spans] == ["Hi there!<|im_end|>\n", "Sure: hi.<|im_end|>\n"]
    tokens, labels = chat_stream(tmp_path / "x.jsonl", [json.dumps({"messages": TALK})], renderer, tok, "assistant")
    ids, offsets = tok.encode_with_offsets(text)
    assert tokens == ids and "<|im_start|>" in tok._tok.get_vocab()
    kept = "".join(text[a:b] for (a, b), lab in zip(offsets, labels, strict=True) if lab != IGNORE)
    assert kept == "Hi there!<|im_end|>\nSure: hi.<|im_end|>\n"
    assert all(lab in (IGNORE, t) for lab, t in zip(labels, tokens, strict=True))
    _, every = chat_stream(tmp_path / "x.jsonl", [json.dumps({"messages": TALK})], renderer, tok, "all")
    assert every == tokens


def test_chat_needs_a_template_and_messages(tmp_path, hf_dirs):
    add_tokenizer(tmp_path, template=None)
    with pytest.raises(ConfigError, match="needs a chat template: .* no chat_template"):
        find_template(tmp_path)
    renderer = ChatRenderer(CHATML, {})
    tok = BPETokenizer.load(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"x.jsonl:2 has no 'messages' list"):
        chat_stream(tmp_path / "x.jsonl", ["", json.dumps({"text": "hi"})], renderer, tok, "all")
    with pytest.raises(ConfigError, match="data.loss_on='assistant' needs data.format='chat'"):
        config.load(None, ['data.loss_on="assistant"'])
    with pytest.raises(ConfigError, match="data.format='chat' reads data.paths"):
        config.load(None, ['data.format="chat"', 'data.source="files"', f'data.paths=["{tmp_path}/x"]'])


def test_training_on_chat_counts_only_the_assistant(tmp_path, hf_dirs):
    """The first logged loss is the cross-entropy over the first batch's assistant tokens alone, computed
    here from the same checkpoint."""
    from expertmesh.dist.env import DistEnv
    from expertmesh.models.hf import load_pretrained
    from expertmesh.train.loop import run

    ckpt = tmp_path / "ckpt"
    shutil.copytree(hf_dirs["qwen3_moe"], ckpt)
    add_tokenizer(ckpt)
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": TALK[: 3 + i % 3]}) for i in range(60)) + "\n")
    cfg = load_config(None, [f'model.hf_path="{ckpt}"', 'data.source="files"', f'data.paths=["{data}"]',
                             'data.format="chat"', 'data.loss_on="assistant"', 'data.tokenizer="hf"',
                             "data.seq_len=32", "data.batch_size=4", "train.steps=2", "train.eval_batches=1",
                             f'train.run_dir="{tmp_path}"', 'metrics.wandb_mode="disabled"', "metrics.log_every=1",
                             "checkpoint.enabled=false", "moe.aux_loss_coef=0.0", "moe.z_loss_coef=0.0"])
    from expertmesh.data.chat import load_chat

    tok = BPETokenizer.load(ckpt / "tokenizer.json")
    tokens, labels = load_chat(cfg.data, [data], tok, ckpt)
    (train_tokens, _), (train_labels, _) = (split_tokens(t, cfg.data.eval_fraction) for t in (tokens, labels))
    x, y = TokenLoader(train_tokens, 32, 4, 0, 1, cfg.train.seed, 1, train_labels).next_batch()
    assert 0 < int((y != IGNORE).sum()) < y.numel()
    with torch.no_grad():
        logits, _ = load_pretrained(ckpt)(x)
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE).item()
    rec = run(cfg, DistEnv(0, 0, 1, 1, "single"))
    first = [json.loads(line) for line in (cfg.run_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"][0]
    assert first["loss"] == pytest.approx(want, rel=1e-5)
    assert rec["eval_loss"] is not None and rec["eval_loss"] == rec["eval_loss"]  # finite, not NaN
