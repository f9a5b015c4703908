"""DiLoCo pieces that need no process group: fragments, schedule, config checks, the quantizer."""

import pytest
import torch

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.compress import (
    dequantize,
    pack_bits,
    quantize,
    quantized_all_reduce_mean,
    sparse_all_reduce_mean,
    topk_compress,
    unpack_bits,
    wire_bytes_per_value,
)
from expertmesh.dist.diloco import DiLoCo, assign_fragments

NAMES = ["tok_embeddings.weight"] + [f"layers.{i}.attention.wq.weight" for i in range(6)] + ["norm.weight",
                                                                                           "output.weight"]


def test_fragments_strided_and_sequential():
    assert assign_fragments(NAMES, 6, 3, "strided") == [3, 0, 1, 2, 0, 1, 2, 3, 3]
    assert assign_fragments(NAMES, 6, 3, "sequential") == [3, 0, 0, 1, 1, 2, 2, 3, 3]
    assert assign_fragments(["layers.10.ffn.w1", "layers._checkpoint_wrapped_module"], 12, 4, "strided")[0] == 2


def test_schedule_staggers_fragments_h_over_p_apart():
    from expertmesh.models.transformer import Transformer

    cfg = config.load(None, ["diloco.enabled=true", "diloco.sync_every=8", "diloco.fragments=4"])
    d = DiLoCo(Transformer(cfg), cfg.model.n_layers, cfg.diloco, None, Comm())
    # a MoE block: 2 norms, wq wk wv wo, the gate, w1 w3 w2 = 10 tensors; then embeddings, norm, head
    assert [len(ps) for ps in d.params] == [10, 10, 10, 10, 3]
    starts = {t: d.fragments_starting(t) for t in range(1, 17)}
    assert {t: f for t, f in starts.items() if f} == {2: [0], 4: [1], 6: [2], 8: [3, 4], 10: [0], 12: [1], 14: [2],
                                                      16: [3, 4]}


@pytest.mark.parametrize("overrides, message", [
    (["diloco.sync_every=10", "diloco.fragments=4"], "diloco.fragments=4 does not divide diloco.sync_every=10"),
    (["diloco.sync_every=8", "diloco.fragments=4", "diloco.overlap=2"],
     "diloco.overlap=2 must be in [0, sync_every/fragments=2)"),
    (["diloco.merge_alpha=1.5"], "diloco.merge_alpha=1.5 must be in [0, 1]"),
    (["diloco.quant_bits=2"], "diloco.quant_bits=2 must be 0 (fp32), 4 or 8"),
    (['diloco.topk_average="senders"'], "diloco.topk_average='senders' divides top-k sums by their senders; "
     "diloco.compress='dense' sends every value"),
    (["diloco.fragments=5", "diloco.sync_every=50"], "diloco.fragments=5 exceeds model.n_layers=4"),
    (["diloco.elastic=true", "diloco.workers=2", "diloco.worker=2", "diloco.store=\"h:1\""],
     "diloco.worker in [0, workers); got workers=2, worker=2"),
    (["diloco.elastic=true", "diloco.workers=2", "diloco.worker=0", "diloco.store=\"nohost\""],
     "diloco.store='nohost' must be host:port"),
    (["diloco.elastic=true", "diloco.workers=2", "diloco.worker=0", "diloco.store=\"h:1\"",
      "parallel.dp_replicate=2"], "parallel.dp_replicate=2 must be 1"),
    (["diloco.elastic=true", "diloco.workers=2", "diloco.worker=0", "diloco.store=\"h:1\"", "diloco.settle_s=0"],
     "diloco.settle_s=0.0 must be > 0"),
    (["parallel.ep=2", 'moe.placement="fssdp"'], "moe.fssdp.reshard_every=100 with diloco.enabled=true is refused"),
    (['diloco.compress="topk"', "diloco.quant_bits=4"], "diloco.quant_bits=4 applies to dense exchanges only"),
    (['diloco.compress="topk"', "diloco.topk_bits=3"], "diloco.topk_bits=3 2, 4 or 8"),
    (['diloco.compress="topk"', "diloco.error_decay=1.5"], "diloco.error_decay=1.5 must be in [0, 1]"),
    (['diloco.secret_file="s"'], "diloco.secret_file='s' signs the elastic outer group's records; it needs "
                                 "diloco.elastic=true"),
])
def test_diloco_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(None, ["diloco.enabled=true", *overrides])
    assert message in str(e.value)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizer_round_trip_is_within_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64 * 50, generator=g) * torch.logspace(-3, 1, 64 * 50)  # blocks of very different scales
    x[:64] = 0.0  # an all-zero block
    codes, scales = quantize(x, bits, 64)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() * bits // 8
    back = dequantize(codes, scales, bits, 64)
    step = (x.view(-1, 64).abs().amax(1) / (2 ** (bits - 1) - 1)).repeat_interleave(64)
    assert torch.all((back - x).abs() <= step / 2 + 1e-7)
    assert torch.equal(back[:64], torch.zeros(64))
    assert wire_bytes_per_value(bits, 64) == bits / 8 + 1 / 16


def test_topk_sends_the_largest_per_chunk_at_two_bits_and_keeps_the_rest():
    """By hand: chunks of 4, 2 values each (the largest in magnitude), 2-bit codes of sign and level, a code
    standing for +-(level + 1/2) / 2 * the chunk's largest sent magnitude."""
    x = torch.tensor([0.1, -0.8, 0.3, 0.4, 0.5, 0.0, 0.05, -1.0, 0.2])
    mean, sent = sparse_all_reduce_mean(x, None, Comm(), 0.5, 4, 2, "diloco")
    # chunk 1: -0.8 and 0.4 (scale 0.8): levels 1 and 1 -> -0.6, 0.6; chunk 2: 0.5, -1.0 (scale 1): 0.75, -0.75;
    # chunk 3 (0.2 and a zero of padding): 0.2 -> level 1 of scale 0.2 -> 0.15
    want = torch.tensor([0.0, -0.6, 0.0, 0.6, 0.75, 0.0, 0.0, -0.75, 0.15])
    torch.testing.assert_close(sent, want)
    torch.testing.assert_close(mean, want)  # a group of one: the mean is what it sent
    torch.testing.assert_close(x - sent, torch.tensor([0.1, -0.2, 0.3, -0.2, -0.25, 0.0, 0.05, -0.25, 0.05]))
    offsets, packed, scales = topk_compress(x, 0.5, 4, 2)
    # the bytes on the wire: 6 offsets of 2 bits (chunks of 4), 6 codes of 2 bits, 3 fp32 scales
    assert (offsets.numel(), packed.numel(), scales.numel()) == (2, 2, 3)


def test_offsets_and_codes_are_packed_least_significant_bit_first():
    # 1, 2, 3 at 2 bits: 01 10 11 -> bits 1,0, 0,1, 1,1 -> 1 + 8 + 16 + 32
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    # 4095, 1 at 12 bits (offsets in chunks of 4096): 0xFFF then 0x001 -> 0xFF, 0x1F, 0x00
    assert pack_bits(torch.tensor([4095, 1]), 12).tolist() == [255, 31, 0]
    values = torch.randint(0, 2 ** 11, (1001,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(pack_bits(values, 11), 11, 1001), values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_topk_codes_are_within_half_a_level(bits):
    x = torch.randn(5000, generator=torch.Generator().manual_seed(bits))
    _, sent = sparse_all_reduce_mean(x, None, Comm(), 0.05, 500, bits, "diloco")
    kept = sent != 0
    assert kept.sum() == 10 * 25
    scale = x.view(10, 500).abs().topk(25, dim=1).values.amax(1).repeat_interleave(500)
    assert torch.all((sent - x)[kept].abs() <= scale[kept] / 2 ** bits + 1e-6)
    top = x.view(10, 500).abs().topk(25, dim=1).values.min(1).values.repeat_interleave(500)
    assert torch.all(x.abs()[kept] >= top[kept])  # what is sent is each chunk's largest


def test_topk_error_feedback_carries_what_was_not_sent_to_the_next_sync():
    """One worker (no group), two syncs of one fragment: e1 = delta1 - sent1, then e2 = beta * e1 + delta2 is
    what the second sync compresses, and the global copy moves by the sent values only (outer SGD, lr 1)."""
    from expertmesh.models.transformer import Transformer

    cfg = config.load(None, ["diloco.enabled=true", "diloco.sync_every=2", 'diloco.compress="topk"',
                             "diloco.topk_fraction=0.25", "diloco.topk_chunk=64", "diloco.outer_momentum=0.0",
                             "diloco.outer_lr=1.0", "diloco.error_decay=0.5"])
    model = Transformer(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    d = DiLoCo(model, cfg.model.n_layers, cfg.diloco, None, Comm())
    g0 = d.global_copy[0].clone()
    expect_e, expect_g = torch.zeros_like(g0), g0.clone()
    for sync in range(2):
        step = torch.randn(g0.shape, generator=torch.Generator().manual_seed(sync)) * 1e-3
        d._write(0, d._flat(0) - step)  # inner training moved the weights by -step
        delta = expect_g - d._flat(0)
        e = 0.5 * expect_e + delta
        _, sent = sparse_all_reduce_mean(e, None, Comm(), 0.25, 64, 2, "diloco")
        expect_e, expect_g = e - sent, expect_g - sent
        d.after_step(2 * (sync + 1))
        torch.testing.assert_close(d.error[0], expect_e)
        torch.testing.assert_close(d.global_copy[0], expect_g)
        assert 0.2 < (sent != 0).float().mean() <= 0.25


def test_quantized_mean_of_one_rank_is_the_round_trip():
    x = torch.randn(1000)
    mean = quantized_all_reduce_mean(x, None, Comm(), 8, 32, "diloco")
    assert mean.shape == x.shape and (mean - x).abs().max() <= x.abs().max() / 127  # two round trips


def test_elastic_workers_run_in_their_own_directories():
    cfg = config.load(None, ["train.name=r", "diloco.enabled=true", "diloco.elastic=true", "diloco.workers=3",
                             "diloco.worker=1", "diloco.store=\"localhost:29600\""])
    assert cfg.run_path.parts[-2:] == ("r", "worker1")


@pytest.mark.parametrize("overlap", [0, 1])
def test_an_exchange_error_reaches_the_training_loop_as_itself(tmp_path, monkeypatch, overlap):
    """An error inside the exchange (in the background thread when overlapped) is raised by the main thread
    with the fragments named, not as an unrelated error from an empty result."""
    import expertmesh.dist.diloco as diloco_mod
    from expertmesh.dist.env import DistEnv
    from expertmesh.train.loop import run

    def broken(*args, **kwargs):
        raise ValueError("codes do not fit")

    monkeypatch.setattr(diloco_mod, "quantized_all_reduce_mean", broken)
    cfg = config.load(None, [f'train.run_dir="{tmp_path}"', "model.dim=32", "model.n_layers=2", "model.n_heads=2",
                             "model.ffn_dim=64", "moe.expert_dim=32", "data.seq_len=32", "data.batch_size=2",
                             "data.max_bytes=100000", "train.steps=4", "train.eval_batches=1",
                             'metrics.wandb_mode="disabled"', "checkpoint.enabled=false", "diloco.enabled=true",
                             "diloco.sync_every=2", "diloco.quant_bits=4", f"diloco.overlap={overlap}"])
    with pytest.raises(RuntimeError, match=r"DiLoCo: the exchange of fragments \[0, 1\] failed: codes do not fit"):
        run(cfg, DistEnv(0, 0, 1, 1, "single"))


def test_only_a_member_of_the_last_group_leads_whatever_the_others_claim():
    """Who may lead comes from the store's list of the last group's members, not from the rows."""
    from expertmesh.dist.diloco import choose_lead

    # (step, outer steps, digest, says it was a member)
    members_and_a_liar = torch.tensor([[40, 10, 1.5, 1], [40, 10, 1.5, 1], [999, 500, 7.0, 1]], dtype=torch.float64)
    assert choose_lead(members_and_a_liar, previous=[0, 1]) == 0
    behind = torch.tensor([[12, 3, 1.0, 1], [40, 10, 2.0, 1], [8, 2, 0.5, 0]], dtype=torch.float64)
    assert choose_lead(behind, previous=[0, 1]) == 1  # among members: the furthest along
    restarted = torch.tensor([[40, 10, 1.0, 0], [30, 9, 2.0, 1], [999, 500, 7.0, 1]], dtype=torch.float64)
    assert choose_lead(restarted, previous=[0, 1]) == 1  # a member still running before one that restarted
    all_restarted = torch.tensor([[30, 9, 1.0, 0], [40, 10, 2.0, 0], [999, 500, 7.0, 1]], dtype=torch.float64)
    assert choose_lead(all_restarted, previous=[0, 1]) == 1
    first_forming = torch.tensor([[4, 1, 1.0, 0], [8, 2, 2.0, 0]], dtype=torch.float64)
    assert choose_lead(first_forming, previous=[]) == 1  # no group before: the furthest along


def test_a_secret_file_that_is_missing_or_short_is_refused(tmp_path):
    from expertmesh.dist.elastic import read_secret

    with pytest.raises(ValueError, match=r"diloco.secret_file='.*nothing' cannot be read: No such file"):
        read_secret(str(tmp_path / "nothing"))
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ValueError, match="holds 3 bytes; a secret needs at least 16"):
        read_secret(str(tmp_path / "short"))
    (tmp_path / "ok").write_text("0123456789abcdef0123\n")
    assert read_secret(str(tmp_path / "ok")) == b"0123456789abcdef0123" and read_secret("") is None
