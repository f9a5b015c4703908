"""Two sites over a shaped link (benchmarks/wanlab.py): a Streaming DiLoCo run, a worker per site, trains
to the end through the link, and what the link carried is what our counters say crossed it, plus the
transport's own overhead. Needs root and iproute2 (as CI has); skipped, with the reason, elsewhere."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from wanlab import Lab, available, counted_bytes  # noqa: E402

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
