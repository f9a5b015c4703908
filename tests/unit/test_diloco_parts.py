"""DiLoCo pieces that need no process group: fragments, schedule, config checks, the quantizer."""

import pytest
import torch

from expertmesh import config
from expertmesh.config import ConfigError
from expertmesh.dist.comm_stats import Comm
from expertmesh.dist.compress import dequantize, quantize, quantized_all_reduce_mean, wire_bytes_per_value
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
