"""Streaming DiLoCo on real gloo workers: plain training as its special case, workers that agree
on the global weights after every sync, and a mid-cycle resume that reproduces the run."""

import io
import math
import shutil

import pytest
import torch
from combinations import COMPILED, DILOCO_AS_PLAIN, DILOCO_PLAIN_FEATURES, DILOCO_WORKERS, TOPK_EXCHANGE, TOPK_LAYOUTS
from helpers import assert_compiled, read_metrics

from expertmesh import config
from expertmesh.dist.env import DistEnv
from expertmesh.train.loop import run

pytestmark = pytest.mark.distributed


def _train(rank, world, overrides):
    run(config.load(None, overrides), DistEnv(rank, rank, world, world, "torchrun"))
    return rank


def test_one_worker_h1_plain_outer_step_is_plain_training(tiny_overrides, tmp_path):
    """With recomputation, capacity dropping, bias balancing, PR-MoE, a shared expert and accumulation on."""
    common = tiny_overrides + ["train.steps=6", "metrics.log_every=1", "checkpoint.enabled=false",
                               *DILOCO_PLAIN_FEATURES]
    one = DistEnv(0, 0, 1, 1, "single")
    run(config.load(None, common + ["train.name=plain"]), one)
    run(config.load(None, common + ["train.name=diloco", *DILOCO_AS_PLAIN]), one)
    plain, diloco = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "diloco")
    assert plain[1]["dropped_tokens"] > 0
    for step in range(1, 7):
        assert diloco[step]["loss_avg"] == pytest.approx(plain[step]["loss_avg"], rel=1e-6), step
        assert diloco[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=1e-5), step
    assert diloco[6]["diloco"]["outer_steps"] == 12  # two fragments (blocks, the rest) a step


def _two_workers_by_hand(overrides):
    """A tiny MoE model, the same on both workers, and DiLoCo over the world group with H = 1."""
    import torch.distributed as dist

    from expertmesh.dist.comm_stats import Comm
    from expertmesh.dist.diloco import DiLoCo
    from expertmesh.models.transformer import Transformer

    cfg = config.load(None, ["model.dim=16", "model.n_layers=2", "model.n_heads=2", "model.ffn_dim=32",
                             "moe.num_experts=4", "moe.expert_dim=8", "diloco.enabled=true", "diloco.sync_every=1",
                             *overrides])
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():  # the same start on both workers
            p.normal_(0.0, 0.1)
    comm = Comm()
    return model, DiLoCo(model, cfg.model.n_layers, cfg.diloco, dist.group.WORLD, comm), comm


def _outer_steps_by_hand(rank, world):
    """Two workers, H = 1, one fragment of everything: each 'inner step' sets the local weights and the
    balancing biases by hand (worker-specific), then DiLoCo syncs. Returns what DiLoCo made of them."""
    model, d, _ = _two_workers_by_hand(["diloco.outer_lr=0.7", "diloco.outer_momentum=0.9", "diloco.nesterov=true"])
    start = d.global_copy[0].clone()
    gen = torch.Generator().manual_seed(100 + rank)
    biases = [b for b in d.biases[0]]
    seen = []
    for step in (1, 2, 3):
        local = d._flat(0) + 0.1 * torch.randn(d._flat(0).shape, generator=gen)  # this worker's inner steps
        d._write(0, local)
        with torch.no_grad():
            for b in biases:
                b.add_(torch.randn(b.shape, generator=gen))
        bias = torch.cat([b.detach().clone() for b in biases])
        d.after_step(step)
        seen.append((local, bias, d.global_copy[0].clone(), d._flat(0), d.global_bias[0].clone(),
                     torch.cat([b.detach().clone() for b in biases])))
    return start.tolist(), [[t.tolist() for t in row] for row in seen]  # tensors do not outlive the process


def test_outer_nesterov_and_bias_averaging_equal_a_hand_computed_update(run_distributed):
    """Three syncs with momentum 0.9 and outer lr 0.7: the global copy follows Nesterov-SGD on the mean
    pseudo-gradient computed here by hand, each worker's local weights become it, and the balancing
    biases (never averaged before: the workers drifted apart) become the workers' mean on both."""
    (start, w0), (_, w1) = run_distributed(_outer_steps_by_hand, 2)
    w0, w1 = ([[torch.tensor(t) for t in row] for row in w] for w in (w0, w1))
    glob, momentum = torch.tensor(start), torch.zeros(len(start))
    for (l0, b0, g0, f0, gb0, nb0), (l1, b1, g1, f1, gb1, nb1) in zip(w0, w1, strict=True):
        delta = ((glob - l0) + (glob - l1)) / 2
        momentum = 0.9 * momentum + delta
        glob = glob - 0.7 * (delta + 0.9 * momentum)
        for g, f in ((g0, f0), (g1, f1)):
            torch.testing.assert_close(g, glob, rtol=1e-5, atol=1e-6)
            assert torch.equal(f, g)  # tau = 0: the local weights are the global copy
        assert not torch.equal(b0, b1) and b0.numel() == 2 * 4  # two MoE layers, four experts
        for gb, nb in ((gb0, nb0), (gb1, nb1)):
            torch.testing.assert_close(gb, (b0 + b1) / 2)
            assert torch.equal(nb, gb)


def _expert_sparse_by_hand(rank, world, extra=()):
    """Two workers, H = 1, fp32, outer lr 1, no momentum: worker 0's tokens reached experts {0, 1} of every
    MoE layer, worker 1's {1, 2}, nobody's expert 3; every weight (an untrained expert's too: decay, moments)
    moved locally. Returns each parameter before and after the sync, and the exchange's stats."""
    model, d, comm = _two_workers_by_hand(["diloco.outer_lr=1.0", "diloco.outer_momentum=0.0",
                                           "diloco.expert_sparse=true", *extra])
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(100 + rank)
    trained = [0, 1] if rank == 0 else [1, 2]
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
            p.grad = torch.zeros_like(p)
            if ".experts." in n:
                p.grad[trained] = 1.0
    local = {n: p.detach().clone() for n, p in model.named_parameters()}
    comm.take()
    d.after_step(1)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    buf = io.BytesIO()  # tensors do not outlive the process: their bytes do
    torch.save({"start": start, "local": local, "after": after, "stats": d.stats(1)}, buf)
    return buf.getvalue()


def test_expert_sparse_exchange_equals_a_hand_computed_mean(run_distributed):
    """Each expert's new weights are the mean over the workers whose tokens reached it (expert 1: both; 0 and
    2: one; 3: none, so it keeps its global weights); every other weight the mean over both. The bytes are
    the values of the experts some worker trained and of the rest, and one count per expert row."""
    w0, w1 = (torch.load(io.BytesIO(b), weights_only=True) for b in run_distributed(_expert_sparse_by_hand, 2))
    start = w0["start"]
    for n, g in start.items():
        assert torch.equal(g, w1["start"][n])
        d0, d1 = g - w0["local"][n], g - w1["local"][n]
        want = g - (d0 + d1) / 2
        if ".experts." in n:
            want[0], want[2], want[3] = g[0] - d0[0], g[2] - d1[2], g[3]
        for w in (w0, w1):
            torch.testing.assert_close(w["after"][n], want, rtol=1e-6, atol=1e-7, msg=n)
    expert = [n for n in start if ".experts." in n]
    assert len(expert) == 6 and w0["stats"]["expert_rows"] == 24 and w0["stats"]["expert_rows_sent"] == 18
    crossing = sum(g.numel() for n, g in start.items() if n not in expert) + sum(3 * start[n][0].numel()
                                                                                  for n in expert)
    # fp32 values, int32 counts, and the balancing biases (2 layers x 4 experts, fp32)
    assert w0["stats"]["bytes_last_sync"] == 4 * crossing + 4 * 24 + 4 * 8


def _sparse_means_by_hand(rank, world):
    import torch.distributed as dist

    from expertmesh.dist.comm_stats import Comm
    from expertmesh.dist.compress import sparse_all_reduce_mean

    x = [torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4)][rank]
    group = dist.new_group(list(range(world)))
    return [sparse_all_reduce_mean(x, group, Comm(), 0.5, 4, 2, "diloco", per_sender=p)[0].tolist()
            for p in (False, True)]


def test_topk_sums_are_divided_by_the_workers_or_by_each_values_senders(run_distributed):
    """Three workers, one chunk of 4, 2 values each at 2 bits (a value of the chunk's largest magnitude is sent
    as 0.75 of it): worker 0 sends +-0.75 at slots 0 and 3, worker 1 0.75 at 0 and 1, worker 2 (all zeros)
    nothing. Over the workers: the sums / 3; per sender: slot 0 / 2, slots 1 and 3 whole, slot 2 none (0)."""
    for workers, senders in run_distributed(_sparse_means_by_hand, 3):  # every value here is exact in fp32
        assert workers == [0.5, 0.25, 0.0, -0.25]
        assert senders == [0.75, 0.75, 0.0, -0.75]


def test_expert_sparse_topk_means_over_trainers_and_over_senders_agree(run_distributed):
    """Expert-sparse top-k sending every value (fraction 1, 8 bits): a trained row's sum divided by the workers
    that trained it (diloco.topk_average="workers", rescaled) equals it divided by the workers that sent each
    value ("senders", not rescaled again), and an untrained expert keeps its global weights in both. Chunks of
    16 lie within one expert row (every tensor's size is a multiple of 16), so a row a worker did not train is
    a chunk of zeros (scale 0: sent as zeros, so not a sender; the codes have no zero besides)."""
    topk = ['diloco.compress="topk"', "diloco.topk_fraction=1.0", "diloco.topk_chunk=16", "diloco.topk_bits=8"]
    runs = {avg: torch.load(io.BytesIO(run_distributed(_expert_sparse_by_hand, 2,
                                                       (*topk, f'diloco.topk_average="{avg}"'))[0]),
                            weights_only=True) for avg in ("workers", "senders")}
    workers, senders = runs["workers"], runs["senders"]
    for n, g in workers["start"].items():
        # the two means differ in one rounding (sum / W * (W / trainers) against sum / senders): a few ulp
        torch.testing.assert_close(senders["after"][n], workers["after"][n], rtol=1e-6, atol=1e-7, msg=n)
        assert not torch.equal(workers["after"][n], g) or ".experts." in n, n
        if ".experts." in n:
            assert torch.equal(workers["after"][n][3], g[3]) and torch.equal(senders["after"][n][3], g[3]), n
            assert not torch.equal(senders["after"][n][0], g[0]), n


TOPK = ['diloco.compress="topk"', "diloco.topk_fraction=0.02", "diloco.topk_chunk=512", "diloco.outer_momentum=0.0",
        "diloco.outer_lr=1.0"]


@pytest.mark.parametrize("bits, overlap, compress", [(0, 0, []), (4, 1, []), (0, 1, TOPK)],
                         ids=["fp32", "4bit-overlap", "topk-overlap"])
def test_workers_agree_on_the_global_copy_after_every_sync(run_distributed, tiny_overrides, tmp_path, bits, overlap,
                                                           compress):
    common = tiny_overrides + ["train.steps=8", "metrics.log_every=1", "checkpoint.every=4", "checkpoint.keep=2",
                               "parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=4",
                               "diloco.fragments=2", f"diloco.quant_bits={bits}", f"diloco.overlap={overlap}",
                               "moe.bias_update_rate=0.003", *compress]
    run_distributed(_train, 2, common)
    rec = read_metrics(tmp_path / "default")
    assert rec[8]["diloco"]["bytes_last_sync"] > 0 and rec[8]["diloco"]["outer_steps"] >= 3
    sent = [r["comm_bytes_per_step"] for r in rec.values()]
    assert sum(s.get("diloco", 0) for s in sent) > 0
    assert not any("dense_dp" in s for s in sent)  # no gradient crosses workers
    for step in (4, 8):
        w0, w1 = (torch.load(tmp_path / "default" / f"step-{step}" / f"rank-{r}.pt", weights_only=True)["diloco"]
                  for r in (0, 1))
        for a, b in zip(w0["global_copy"] + w0["global_bias"], w1["global_copy"] + w1["global_bias"], strict=True):
            assert torch.equal(a, b)
        assert any(not torch.equal(a, b) for a, b in zip(w0["local"], w1["local"], strict=True)) or overlap == 0
        assert w0["global_bias"][1].abs().sum() > 0 or overlap  # the MoE layer 1 is in fragment 1: synced at 4, 8
        if compress and step == 8:  # each worker's own error feedback (every fragment has synced once by 8): what
            # it has not sent, different on each
            assert all(e.abs().sum() > 0 for e in w0["error"]) and not torch.equal(w0["error"][0], w1["error"][0])
    if compress:  # 2% of the values at 2 bits + a 9-bit offset, one fp32 scale per 512: 8x fewer than fp32 at least
        n = sum(t.numel() for t in w0["global_copy"])
        assert 0 < rec[8]["diloco"]["bytes_last_sync"] < n * 4 / 8


@pytest.mark.parametrize("compress", [["diloco.quant_bits=4", "diloco.expert_sparse=true"], TOPK],
                         ids=["4bit-expert-sparse", "topk"])
def test_mid_cycle_resume_reproduces_the_run(run_distributed, tiny_overrides, tmp_path, compress):
    """With topk the error feedback (and that of the exchange in flight) is checkpointed, with expert_sparse the
    expert rows trained since each fragment's last exchange: the rerun is exact."""
    common = tiny_overrides + ["train.steps=8", "metrics.log_every=1", "checkpoint.every=3", "checkpoint.keep=3",
                               "parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=4",
                               "diloco.fragments=2", "diloco.overlap=1", *compress]
    run_distributed(_train, 2, common)
    first = {s: r["loss"] for s, r in read_metrics(tmp_path / "default").items()}
    for step in (6, 8):  # as if killed after the step-3 checkpoint: mid-cycle, an exchange in flight
        shutil.rmtree(tmp_path / "default" / f"step-{step}", ignore_errors=True)
    run_distributed(_train, 2, common)
    again = {s: r["loss"] for s, r in read_metrics(tmp_path / "default").items()}
    assert again == first and sorted(again) == list(range(1, 9))


def _train_recording_exchanges(rank, world, runs, out_dir):
    """Trains each (name, overrides) run, saving every sparse exchange this rank made: its outer group, its
    input (error feedback + pseudo-gradient), what it sent and the mean it got."""
    import torch.distributed as dist

    import expertmesh.dist.diloco as diloco

    real = diloco.sparse_all_reduce_mean
    for name, overrides in runs:
        calls = []

        def recording(x, group, comm, fraction, chunk, bits, label, per_sender=False, calls=calls):
            assert not per_sender  # the layouts average over the workers: the mean checked below
            mean, sent = real(x, group, comm, fraction, chunk, bits, label, per_sender=per_sender)
            calls.append({"members": dist.get_process_group_ranks(group), "x": x.clone(), "sent": sent.clone(),
                          "mean": mean.clone(), "fraction": fraction, "chunk": chunk, "bits": bits})
            return mean, sent

        diloco.sparse_all_reduce_mean = recording
        try:
            _train(rank, world, overrides)
        finally:
            diloco.sparse_all_reduce_mean = real
        torch.save(calls, out_dir / f"{name}-rank{rank}.pt")
    return rank


def _assert_a_topk_of(x: torch.Tensor, sent: torch.Tensor, fraction: float, chunk: int, bits: int) -> None:
    """`sent` is what the documented code carries of `x`, chunk by chunk: the k largest magnitudes (any of
    tied ones), each as sign * (floor(|v| / scale * L) + 1/2) / L * scale, L = 2^(bits-1), scale the chunk's
    largest sent magnitude; nothing else."""
    k, L = max(1, min(chunk, round(fraction * chunk))), 2 ** (bits - 1)
    for c0 in range(0, x.numel(), chunk):
        xs, ss = x[c0:c0 + chunk].abs(), sent[c0:c0 + chunk]
        chosen = ss != 0
        m = int(chosen.sum())
        if m < k:  # only a short last chunk (padded with zeros) or an all-zero selection sends fewer
            assert xs.numel() < chunk or xs.topk(k).values.max() == 0, (c0, m, k)
            assert m == 0 or xs[~chosen].max() == 0, c0
        else:
            assert m == k, (c0, m, k)
        if not m:
            continue
        assert m == xs.numel() or xs[chosen].min() >= xs[~chosen].max(), c0
        scale = xs[chosen].max()
        v = x[c0:c0 + chunk][chosen]
        sign = torch.where(v < 0, -1.0, 1.0)
        level = (v.abs() / scale * L).floor().clamp(max=L - 1)
        assert torch.equal(ss[chosen], sign * (level + 0.5) / L * scale), c0


def test_topk_exchange_under_layouts_is_a_sparse_mean_of_what_each_worker_sent(run_distributed, tiny_overrides,
                                                                                 tmp_path):
    """Two workers of two ranks, exchanging top-k codes with overlap, under each layout of
    combinations.TOPK_LAYOUTS (ep with FSDP, recomputation, accumulation and the layer's features; tp in bf16;
    pp; FSSDP compiled): every exchange of every rank sent a top-k of its input at 2 bits, and got the
    rank-order mean of its outer group's contributions (exact: the same fp32 operations); the members of a group
    are one rank of each worker at the same place, and every run trains to the end."""
    common = tiny_overrides + ["train.steps=8", "metrics.log_every=4", "checkpoint.enabled=false", *TOPK_EXCHANGE]
    runs = [(name, common + [f"train.name={name}", *layout]) for name, layout in TOPK_LAYOUTS.items()]
    run_distributed(_train_recording_exchanges, 4, runs, tmp_path, timeout=420)
    for name, _ in runs:
        calls = {r: torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in range(4)}
        assert {len(c) for c in calls.values()} == {6}, name  # fragment 0, then 1 and the rest, twice in 8 steps
        for i in range(6):
            for r, rank_calls in calls.items():
                c = rank_calls[i]
                assert r in c["members"] and len(c["members"]) == 2, (name, r, c["members"])
                assert calls[[m for m in c["members"] if m != r][0]][i]["members"] == c["members"]
                assert c["sent"].abs().sum() > 0 or not c["x"].numel(), (name, r, i)
                _assert_a_topk_of(c["x"], c["sent"], c["fraction"], c["chunk"], c["bits"])
                total = torch.zeros_like(c["x"])
                for m in c["members"]:
                    total += calls[m][i]["sent"]
                assert torch.equal(c["mean"], total / 2), (name, r, i)
        assert all(calls[r][i]["x"].numel() for r in range(4) for i in range(6)) or "tp2" not in name
        rec = read_metrics(tmp_path / name)
        assert rec[8]["diloco"]["outer_steps"] >= 3 and math.isfinite(rec[8]["loss"]), name
        if "expert-sparse" in name and "pp2" not in name:  # rank 0 has expert rows in fragment 1's exchange (step
            # 8: 1 and the rest; under pp rank 0 holds the dense layer 0)
            assert rec[8]["diloco"]["expert_rows"] > 0, rec[8]["diloco"]


def _train_each(rank, world, runs):
    for overrides in runs:
        _train(rank, world, overrides)
    return rank


def test_diloco_composes_with_compile_and_bf16(run_distributed, tiny_overrides, tmp_path):
    """Two workers with overlapped 4-bit exchanges: compiled blocks (traced, aot_eager) train as eager ones,
    and bf16 stays within 2% of fp32 (the global copies and outer momentum stay fp32)."""
    common = tiny_overrides + ["train.steps=6", "metrics.log_every=1", "checkpoint.enabled=false", *DILOCO_WORKERS]
    variants = {"eager": [], "compiled": COMPILED, "bf16": ['train.mixed_precision="bf16"']}
    run_distributed(_train_each, 2, [common + [f"train.name={name}", *extra] for name, extra in variants.items()],
                    timeout=300)
    eager, compiled, bf16 = (read_metrics(tmp_path / name) for name in variants)
    assert eager[6]["diloco"]["outer_steps"] >= 5
    assert_compiled(compiled, max_graphs=4)  # a dense and a MoE block, with and without grad
    for step in range(1, 7):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=1e-5), step
        assert bf16[step]["loss"] == pytest.approx(eager[step]["loss"], rel=0.02), step


def test_evaluation_does_not_change_training_under_fsdp(run_distributed, tiny_overrides, tmp_path):
    """Two workers of dp2 with FSDP inside: evaluating the global model every 2 steps (never a checkpoint step)
    leaves every training loss as it is without evaluations (FSDP's root kept the global weights gathered)."""
    common = tiny_overrides + ["train.steps=6", "metrics.log_every=1", "checkpoint.enabled=false",
                               "parallel.dp_replicate=2", "parallel.dp=2", "diloco.enabled=true",
                               "diloco.sync_every=2", "diloco.outer_lr=0.5"]
    run_distributed(_train_each, 4, [common + ["train.name=eval2", "train.eval_every=2"],
                                     common + ["train.name=eval6", "train.eval_every=6"]], timeout=300)
    often, rarely = read_metrics(tmp_path / "eval2"), read_metrics(tmp_path / "eval6")
    assert [often[s]["loss"] for s in range(1, 7)] == [rarely[s]["loss"] for s in range(1, 7)]
