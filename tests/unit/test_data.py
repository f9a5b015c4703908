import json
import sysconfig
from pathlib import Path

import pytest
import torch

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.data.corpus import load_text, stdlib_files
from expertmesh.data.loader import TokenLoader, eval_batches, split_tokens
from expertmesh.data.tokenizer import BPETokenizer, ByteTokenizer


def test_stdlib_corpus_is_real_python_without_test_suites():
    files = stdlib_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root) for f in files]
    assert any(str(r) == "json/__init__.py" for r in rel)
    assert not any("test" in r.parts[:-1] or "site-packages" in r.parts for r in rel)
    text = load_text(config.load(None, ["data.max_bytes=50000"]).data)
    assert len(text) == 50000 and "def " in text


def test_files_source_reads_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    cfg = config.load(None, ["data.source=files", f"data.paths=[\"{tmp_path}/*\"]"])
    assert load_text(cfg.data) == "hello world\n\ndoc one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ConfigError, match=r"c.jsonl:1 has no field 'text'"):
        load_text(cfg.data)


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids.dtype == torch.int64 and int(ids.max()) < 256
    assert tok.decode(ids) == "héllo"


def test_bpe_trains_locally_and_reloads(tmp_path):
    text = load_text(config.load(None, ["data.max_bytes=200000"]).data)
    tok = BPETokenizer.train(text, 300, tmp_path / "tok.json")
    again = BPETokenizer.load(tmp_path / "tok.json")
    sample = "def foo(x):\n    return x + 1\n"
    assert again.decode(again.encode(sample)) == sample
    assert len(tok.encode(sample)) < len(sample.encode())  # merges actually compress
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ConfigError, match="is not a tokenizers JSON file"):
        BPETokenizer.load(tmp_path / "junk.json")


def test_loader_batches_depend_on_the_global_batch_not_the_layout():
    tokens = torch.arange(10_000)
    train, held = split_tokens(tokens, 0.1)
    assert len(held) == 1000 and int(train[-1]) + 1 == int(held[0])
    two = [TokenLoader(train, 16, 4, rank=r, world=2, seed=1) for r in range(2)]
    one = TokenLoader(train, 16, 8, rank=0, world=1, seed=1)
    four = [TokenLoader(train, 16, 2, rank=r, world=4, seed=1) for r in range(4)]
    accum = [TokenLoader(train, 16, 2, rank=r, world=2, seed=1, accum=2) for r in range(2)]
    for _ in range(3):
        x1, y1 = one.next_batch()
        assert torch.equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
        assert torch.equal(torch.cat([ld.next_batch()[0] for ld in two]), x1)
        assert torch.equal(torch.cat([ld.next_batch()[0] for ld in four]), x1)
        micro = [[ld.next_batch()[0] for ld in accum] for _ in range(2)]  # micro-batch 0 of both, then 1
        assert torch.equal(torch.cat([x for m in micro for x in m]), x1)
    assert not torch.equal(one.next_batch()[0], x1)  # a new batch every step
    state = two[0].state_dict()
    future = [two[0].next_batch()[0] for _ in range(3)]
    resumed = TokenLoader(train, 16, 4, rank=0, world=2, seed=1)
    resumed.load_state_dict(state)
    assert all(torch.equal(f, resumed.next_batch()[0]) for f in future)


def test_eval_batches_are_fixed_and_too_little_data_is_an_error():
    held = torch.arange(3000)
    first = [x for x, _ in eval_batches(held, 32, 4, 3, 0, 2)]
    again = [x for x, _ in eval_batches(held, 32, 4, 3, 0, 2)]
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # the same windows under another layout with the same global batch (8 sequences)
    other = [torch.cat([x for x, _ in eval_batches(held, 32, 2, 3, r, 4)]) for r in range(4)]
    whole = torch.cat([torch.cat([x for x, _ in eval_batches(held, 32, 4, 3, r, 2)]) for r in range(2)])
    assert torch.equal(torch.sort(torch.cat(other)[:, 0]).values, torch.sort(whole[:, 0]).values)
    with pytest.raises(ConfigError, match="fewer than one sequence"):
        list(eval_batches(torch.arange(40), 32, 4, 3, 0, 2))


def test_fast_forward_puts_the_loader_where_an_uninterrupted_run_is_under_pp():
    """A DiLoCo joiner taking a peer's step: the loader reads on as a run that trained those steps does,
    with the pipeline's micro-batches counted (pp2 x 2 micro-batches x grad_accum 2: 4 per step)."""
    from expertmesh.config import pp_microbatches
    from expertmesh.train.loop import fast_forward

    cfg = config.load(None, ["train.grad_accum=2", "parallel.pp=2", "parallel.pp_microbatches=2"])
    micro = cfg.train.grad_accum * pp_microbatches(cfg.parallel)
    tokens = torch.arange(5000) % 256
    ran, jumped = (TokenLoader(tokens, 16, 2, 0, 1, 0, micro) for _ in range(2))
    for _ in range(3 * micro):  # three steps trained
        ran.next_batch()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fast_forward(3, jumped, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)), cfg)
    for _ in range(micro + 1):
        assert torch.equal(ran.next_batch()[0], jumped.next_batch()[0])
    assert opt.param_groups[0]["lr"] == 1.0 / 4
