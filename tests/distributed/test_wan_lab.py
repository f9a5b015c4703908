"""Two sites over a shaped link (benchmarks/wanlab.py): a Streaming DiLoCo run, a worker per site, trains
to the end through the link, and what the link carried is what our counters say crossed it, plus the
transport's own overhead; elastic workers, one per site, survive a cut of the link. Needs root and iproute2
(as CI has); skipped, with the reason, elsewhere."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import read_metrics, same_global_state

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from wanlab import ELASTIC, Lab, available, counted_bytes  # noqa: E402

WHY_NOT = available()
pytestmark = [pytest.mark.distributed, pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "-")]

STEPS = 8


@pytest.mark.parametrize("compress", [["diloco.quant_bits=4"], ['diloco.compress="topk"', "diloco.topk_chunk=512"]],
                         ids=["4bit", "topk"])
def test_bytes_over_a_shaped_link_are_what_the_counters_say(tmp_path, compress):
    # the default model (1.9M parameters): what the exchanges send dwarfs the run's fixed traffic
    overrides = [f'train.run_dir="{tmp_path}"', "data.max_bytes=400000", "train.eval_batches=1",
                 'metrics.wandb_mode="disabled"', f"train.steps={STEPS}", "metrics.log_every=1",
                 "checkpoint.enabled=false",
                 "parallel.dp_replicate=2", "parallel.dp_shard=false", "diloco.enabled=true", "diloco.sync_every=4",
                 "diloco.fragments=2", "diloco.overlap=1", *compress]
    with Lab() as lab:
        lab.shape(20)
        before = lab.link_bytes()
        log = tmp_path / "log.txt"
        with log.open("w") as out:
            codes = [p.wait(timeout=300) for p in lab.launch(overrides, stdout=out, stderr=subprocess.STDOUT)]
        after = lab.link_bytes()
    assert codes == [0, 0], log.read_text()[-6000:]
    link = sum(after[s] - before[s] for s in after)
    # every rank's outer exchange crosses the link; the four ranks send alike (fixed-size codes)
    counted = 4 * counted_bytes(tmp_path / "default", "diloco")
    assert counted > 0
    # the link adds Ethernet, IP and TCP headers (~5% of full frames), acknowledgements, the rendezvous and the
    # per-step control collectives over the world (measured: ~110 KB for 8 steps of the tiny model)
    assert counted < link < 1.08 * counted + 250_000, json.dumps({"link": link, "counted": counted})


def test_elastic_workers_at_two_sites_survive_a_cut_link(tiny_overrides, tmp_path):
    """Worker 0 at site a (with the store), worker 1 at site b. Both hold after step 8 while the link is cut,
    then go on: the next exchange fails after diloco.timeout_s, worker 0 re-forms alone, worker 1 cannot reach
    the store and trains detached (both hold after step 20 until each has logged that; then the link comes
    back). Worker 1 finds the store again at a sync and asks to rejoin (worker 0 holds after step 28 until it
    has), joins, takes worker 0's state (it was not in the last group that connected; its own error feedback
    starts again from zero), and both finish step 40 with the same global state and eval loss."""
    run = tmp_path / "default"
    # with SparseLoCo's exchange: worker 1 drops its own error feedback with its detached weights when it joins
    common = tiny_overrides + ["train.steps=40", "metrics.log_every=1", "checkpoint.every=20", *ELASTIC,
                               'diloco.compress="topk"', "diloco.quant_bits=0", "diloco.topk_chunk=512"]
    with Lab() as lab:
        codes, text = lab.elastic_pair(tmp_path, common, lab.cut_events(run, tmp_path, 8, 20, 28))
    assert codes == [0, 0], (text[0][-3000:], text[1][-3000:])
    assert "DiLoCo: took the global state of worker 0" in text[1], text[1][-3000:]
    last = {w: read_metrics(run / f"worker{w}")[40] for w in (0, 1)}
    assert last[0]["diloco"]["workers"] == last[1]["diloco"]["workers"] == 2
    assert not last[1]["diloco"]["detached"] and last[0]["diloco"]["left"] >= 1
    assert last[0]["eval_loss"] == last[1]["eval_loss"]
    same_global_state(run, (0, 1), 40, ranks=1)
    errors = [torch.load(run / f"worker{w}" / "step-40" / "rank-0.pt", weights_only=True)["diloco"]["error"]
              for w in (0, 1)]
    assert all(e.abs().sum() > 0 for es in errors for e in es)  # each worker's own, accumulating again
    assert not torch.equal(errors[0][0], errors[1][0])
