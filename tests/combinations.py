"""The compatibility matrix's proofs: every run a test compares with a reference, described by its config.

A proof is a run (overrides, world size) that a test compares step by step with a reference run. It
proves each pair (a, b) where a is a feature the comparison puts to test (by default: on in the run and
off in the reference, as ep is against one process) and b any feature the run has on. `proven()` collects
the pairs; tests/unit/test_compatibility.py checks that with `config.REFUSED` they cover every pair of
`config.FEATURES`, and that the README's table is `matrix_markdown()`. The tests that run the proofs read
their layouts from here, so this list cannot claim a run no test makes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from expertmesh import config


@dataclass(frozen=True)
class Proof:
    where: str  # the test that compares, as the README names it
    world: int
    run: tuple[str, ...]
    ref: tuple[str, ...] = ()
    ref_world: int = 1
    tests: frozenset[str] = field(default_factory=frozenset)  # features put to test beyond run - ref

    def features(self) -> tuple[set[str], set[str]]:
        on = config.features_of(config.load(None, list(self.run)), self.world)
        ref = config.features_of(config.load(None, list(self.ref)), self.ref_world)
        return on, (on - ref) | set(self.tests)

    def pairs(self) -> set[frozenset[str]]:
        on, tested = self.features()
        return {frozenset({a, b}) for a in tested for b in on if a != b}


# ---- tests/distributed/test_parallel_layouts.py: each layout against one process (the same features) ----
LAYOUTS = {
    "dp2xep2": (4, ["parallel.ep=2", "data.batch_size=2"]),
    "ep4": (4, ["parallel.ep=4", "data.batch_size=2"]),
    "ep2xtp2": (4, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=4"]),
    "dp2xtp2": (4, ["parallel.tp=2", "data.batch_size=4"]),
    "dp2xep2xtp2": (8, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=2"]),
    # the other switches: replicated gradients, no sequence/vocab parallelism, recomputation
    "ep2xtp2-ddp-nosp-ac": (4, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=4", "parallel.dp_shard=false",
                                "parallel.sequence_parallel=false", "parallel.vocab_parallel=false",
                                'parallel.activation_checkpoint="full"']),
    # FSSDP: replicas planned from a 2-step window, owners moved every 2 steps (also at the
    # checkpoint); and with data parallelism over the owner shards, re-materialization, calibration
    "ep4-fssdp": (4, ["parallel.ep=4", "data.batch_size=2", 'moe.placement="fssdp"', "moe.fssdp.window=2",
                      "moe.fssdp.reshard_every=2"]),
    "dp2xep2-fssdp-remat": (4, ["parallel.ep=2", "data.batch_size=2", 'moe.placement="fssdp"',
                                "moe.fssdp.rematerialize=true", "moe.fssdp.calibrate=true"]),
}

# The architecture options real checkpoints use, under the layouts that split what they add: grouped-query
# heads of their own width with biases, QK-norm per head or over the whole projection (its squares summed
# over tp), half-split RoPE with YaRN, a dense first layer, grouped sigmoid routing with scaled weights and a
# gated shared expert; and multi-head latent attention.
_MHA = ["model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=12", "model.attn_bias=true", 'model.rope_style="half"',
        'model.rope_scaling="yarn"', "model.rope_factor=4.0", "model.rope_original_max_seq_len=16",
        "moe.first_k_dense=1", 'moe.score_func="sigmoid"', "moe.n_groups=2", "moe.topk_groups=1",
        "moe.routed_scaling_factor=2.0", "moe.shared_experts=1", "moe.shared_gate=true"]
VARIANTS = {
    "full": _MHA + ['model.qk_norm="full"', "moe.bias_update_rate=0.001"],
    "mla": ['model.attention="mla"', "model.n_heads=4", "model.q_lora_rank=8", "model.kv_lora_rank=16",
            "model.qk_rope_head_dim=8", "model.qk_nope_head_dim=8", "model.v_head_dim=12", 'model.rope_scaling="yarn"',
            "model.rope_factor=4.0", "model.rope_original_max_seq_len=16", "moe.shared_experts=1",
            "train.grad_accum=2"],
}
FEATURE_LAYOUTS = {"full-ep2xtp2": LAYOUTS["ep2xtp2"], "full-dp2xep2-fssdp": LAYOUTS["dp2xep2-fssdp-remat"],
                   "mla-ep2xtp2-ac": (4, [*LAYOUTS["ep2xtp2"][1], 'parallel.activation_checkpoint="full"']),
                   "mla-dp2xep2-fssdp": LAYOUTS["dp2xep2-fssdp-remat"]}

# bf16 against the same layout in fp32, with the features that change what crosses the wire or is recomputed
BF16_LAYOUTS = {
    "dp2xep2-capacity-bias-accum": (4, ["parallel.ep=2", "data.batch_size=1", "train.grad_accum=2",
                                        "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01"]),
    "ep2xtp2-ac-shared-residual": (4, [*LAYOUTS["ep2xtp2"][1], 'parallel.activation_checkpoint="full"',
                                       "moe.shared_experts=1", "moe.residual=true"]),
    "dp2xep2-fssdp": LAYOUTS["dp2xep2-fssdp-remat"],
}

# compiled (aot_eager) against the eager single process
COMPILE_LAYOUTS = {  # dp2 x ep2: FSDP over the 4 ranks for dense weights, recomputation around the graphs
    "dp2xep2-ac": (4, [*LAYOUTS["dp2xep2"][1], 'parallel.activation_checkpoint="full"']),
    "ep4-fssdp": LAYOUTS["ep4-fssdp"],
}
COMPILED = ["train.compile=true", 'train.compile_backend="aot_eager"']

# ---- tests/distributed/test_combinations.py: the load-balance and z-losses on, capacity dropping, bias ----
# Both are statistics of the tokens a rank routes (its data shard's micro-batch, whole sequences: under tp
# the layer gathers the sequence first), so the reference is one process reading the same micro-batches:
# the batch of one data rank, accumulated over (data ranks x accumulation) micro-batches per step.
_MODEL = ["moe.capacity_factor=1.0", "moe.bias_update_rate=0.01", "moe.residual=true", "moe.shared_experts=1"]
COMBINED = {  # name -> (world, run, reference run in one process)
    "dp2xep2-capacity-bias-accum": (4, ["parallel.ep=2", "data.batch_size=2", "train.grad_accum=2",
                                        "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01"],
                                    ["data.batch_size=2", "train.grad_accum=8", "moe.capacity_factor=1.0",
                                     "moe.bias_update_rate=0.01"]),
    "ep2xtp2-ac-capacity-bias-residual-shared-accum": (
        4, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=4", "train.grad_accum=2",
            'parallel.activation_checkpoint="full"', *_MODEL],
        ["data.batch_size=4", "train.grad_accum=4", *_MODEL]),
    "ep2xtp2-fssdp-ac-capacity-bias-residual-shared-accum": (
        4, ["parallel.ep=2", "parallel.tp=2", "data.batch_size=4", "train.grad_accum=2", 'moe.placement="fssdp"',
            "moe.fssdp.window=2", "moe.fssdp.reshard_every=2", 'parallel.activation_checkpoint="full"', *_MODEL],
        ["data.batch_size=4", "train.grad_accum=4", *_MODEL]),
}
# DiLoCo workers of ep2 x tp2 against workers of two replicated data-parallel ranks, which read the same
# micro-batches (fp32 exchange: 4-bit codes would depend on how the shards cut the weights)
_DILOCO = ["diloco.enabled=true", "parallel.dp_replicate=2", "diloco.sync_every=4", "diloco.fragments=2",
           "diloco.overlap=1", "data.batch_size=4", "train.grad_accum=2", *_MODEL]
DILOCO_COMBINED = {  # name -> (world, run, reference, reference world)
    "diloco-ep2xtp2-ac": (8, [*_DILOCO, "parallel.ep=2", "parallel.tp=2", 'parallel.activation_checkpoint="full"'],
                          [*_DILOCO, "parallel.dp_shard=false"], 4),
    # FSSDP inside the workers: owners fixed (DiLoCo keeps its state in their slots), replicas per worker
    "diloco-ep2-fssdp": (4, [*_DILOCO, "parallel.ep=2", 'moe.placement="fssdp"', "moe.fssdp.reshard_every=0",
                             "moe.fssdp.window=2"], [*_DILOCO, "parallel.dp_shard=false"], 4),
}

# ---- tests/distributed/test_draft_head.py: the in-loop draft head under layouts, against one process reading
# the same micro-batches (the ep x tp combination's own reference; the others a batch of 8, no load-balance
# loss, as test_parallel_layouts.py): name -> (world, run, reference, tolerances). The head is on in both: what
# is put to test is the head under the run's features. Tolerances (relative on the losses, absolute on top-1
# agreement and on the final head's weights), against what rounding alone gave here over 5 steps: fp32 at most
# 1.4e-7 on losses, 0 on top-1, 5.4e-6 on weights (Adam's first steps are near sign steps: a weight's rounding
# shows whole); bf16 7.0e-4, 4.2e-3 (one argmax of 240 flipped), 5.6e-3.
_NO_AUX = ["moe.aux_loss_coef=0.0"]
_FP32_TOL, _BF16_TOL = (1e-5, 1e-2, 5e-5), (5e-3, 3e-2, 3e-2)
DRAFT_HEAD_LAYOUTS = {
    "ep2xtp2-ac-capacity-bias-residual-shared-accum": (*COMBINED["ep2xtp2-ac-capacity-bias-residual-shared-accum"],
                                                       _FP32_TOL),
    "dp2xep2-ac-compiled": (4, [*LAYOUTS["dp2xep2"][1], 'parallel.activation_checkpoint="full"', *COMPILED, *_NO_AUX],
                            ["data.batch_size=8", *_NO_AUX], _FP32_TOL),
    "ep4-fssdp": (4, [*LAYOUTS["ep4-fssdp"][1], *_NO_AUX], ["data.batch_size=8", *_NO_AUX], _FP32_TOL),
    "dp2xtp2-bf16": (4, [*LAYOUTS["dp2xtp2"][1], 'train.mixed_precision="bf16"', *_NO_AUX],
                     ["data.batch_size=8", 'train.mixed_precision="bf16"', *_NO_AUX], _BF16_TOL),
}

# ---- tests/distributed/test_diloco.py: the sparse (topk) exchange under layouts, each exchange checked against
# a loop over its chunks (what each rank sent is a top-k of its error feedback + pseudo-gradient at 2 bits, and
# every rank's mean is the rank-order mean of what its outer group's members sent). Not against a dense run:
# which values are sent flips with the rounding of the training, which the layouts change.
TOPK_EXCHANGE = ['diloco.compress="topk"', "diloco.topk_fraction=0.02", "diloco.topk_chunk=512"]
_TOPK_WORKERS = ["diloco.enabled=true", "parallel.dp_replicate=2", "diloco.sync_every=4", "diloco.fragments=2",
                 "diloco.overlap=1"]
TOPK_LAYOUTS = {  # name -> overrides (2 workers of 2 ranks each)
    "ep2-fsdp-ac-accum": [*_TOPK_WORKERS, "parallel.ep=2", 'parallel.activation_checkpoint="full"',
                          "train.grad_accum=2", *_MODEL],
    # and the expert-sparse exchange (each rank's expert rows: its tp slices of every expert; a stage's experts;
    # its FSSDP owner slots)
    "tp2-bf16-expert-sparse": [*_TOPK_WORKERS, "parallel.tp=2", 'train.mixed_precision="bf16"',
                               "diloco.expert_sparse=true"],
    "pp2-expert-sparse": [*_TOPK_WORKERS, "parallel.pp=2", "parallel.pp_microbatches=2", "diloco.expert_sparse=true"],
    "ep2-fssdp-compiled-expert-sparse": [*_TOPK_WORKERS, "parallel.ep=2", 'moe.placement="fssdp"',
                                         "moe.fssdp.reshard_every=0", "moe.fssdp.window=2", *COMPILED,
                                         "diloco.expert_sparse=true"],
}

# ---- tests/distributed/test_diloco.py: DiLoCo with H = 1, outer lr 1, no momentum is plain training ----
DILOCO_AS_PLAIN = ["diloco.enabled=true", "diloco.sync_every=1", "diloco.outer_lr=1.0", "diloco.outer_momentum=0.0"]
DILOCO_PLAIN_FEATURES = ['parallel.activation_checkpoint="full"', "train.grad_accum=2", *_MODEL]
# ... and two workers: compiled equal to eager, bf16 within 2% of fp32
DILOCO_WORKERS = ["parallel.dp_replicate=2", "diloco.enabled=true", "diloco.sync_every=2", "diloco.fragments=2",
                  "diloco.overlap=0", "diloco.quant_bits=4"]

# ---- tests/unit/test_compile.py: inductor-compiled training equals eager, in fp32; aot_eager in bf16 ----
COMPILE_FEATURES = ["moe.every=1", *_MODEL, "train.grad_accum=2"]

# ---- tests/distributed/test_pipeline.py: pipelines against one process reading the same micro-batches ----
_V2 = ["parallel.pp_stages_per_rank=2", "parallel.pp_microbatches=4"]
PIPELINE_LAYOUTS = {  # name -> (world, overrides, the reference's grad_accum: micro-batches x data ranks)
    "pp2": (2, ["parallel.pp=2", "parallel.pp_microbatches=2"], 2),
    "pp2xtp2": (4, ["parallel.pp=2", "parallel.tp=2", "parallel.pp_microbatches=2"], 2),
    "pp2xdp2xep2": (8, ["parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.pp_microbatches=2"], 8),
    "pp2-interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", *_V2], 4),
    "pp2-zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", *_V2], 4),
    "pp2-dualpipev": (2, ["parallel.pp=2", "parallel.pp_schedule=DualPipeV", *_V2], 4),
    # FSSDP inside the stages: replicas from a 2-step window, owners moved every 2 steps
    "pp2xep2-fssdp": (4, ["parallel.pp=2", "parallel.ep=2", "parallel.pp_microbatches=2", 'moe.placement="fssdp"',
                          "moe.fssdp.window=2", "moe.fssdp.reshard_every=2"], 4),
    # the blocks compiled (aot_eager) inside the stages, against the eager process
    "pp2-compiled": (2, ["parallel.pp=2", "parallel.pp_microbatches=2", *COMPILED], 2),
}
PIPELINE_COMMON = ["model.n_layers=4", "moe.every=1", "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001",
                   "moe.bias_update_rate=0.01"]
# pp2 x ep2 with the layer's machinery, recomputation and accumulation (the reference has them too, with 2 x the
# micro-batches); pp2 x ep2 alone is the FSSDP layout's and this one's common part
PIPELINE_FEATURES = ['parallel.activation_checkpoint="full"', "moe.capacity_factor=1.0", "moe.residual=true",
                     "moe.shared_experts=1"]
PIPELINE_COMBINED = {  # name -> (world, run, reference's grad_accum, reference's features, reference's world)
    "pp2xep2-ac-capacity-residual-shared-accum": (
        4, ["parallel.pp=2", "parallel.ep=2", "parallel.pp_microbatches=2", "train.grad_accum=2", *PIPELINE_FEATURES],
        8, PIPELINE_FEATURES, 1)}
# two DiLoCo workers of pp2 against two DiLoCo workers of one rank each (they read the same micro-batches)
_PP_DILOCO = ["diloco.enabled=true", "parallel.dp_replicate=2", "diloco.sync_every=4", "diloco.fragments=2",
              "diloco.overlap=1"]
PIPELINE_COMBINED["pp2-diloco"] = (4, ["parallel.pp=2", "parallel.pp_microbatches=2", *_PP_DILOCO], 2,
                                   [*_PP_DILOCO, "parallel.dp_shard=false"], 2)
PIPELINE_BF16 = ['train.mixed_precision="bf16"']  # pp2 in bf16 against one process in bf16: losses within 2%

# ---- tests/distributed/test_triton_backend.py: moe.backend="triton" (Triton's interpreter on the CPU ranks) against
# the same run on the C++ backend, step by step (test_combinations.py's comparison). name -> (world, run, reference,
# reference world, (relative tolerance of losses, of gradient norms)). Measured here over 5 steps, Triton against
# C++: fp32 at most 6.2e-8 in loss and 1.6e-8 in gradient norm (sums in another order: allowed 1e-5 and 1e-4, as the
# combinations); bf16 0 and 5.1e-12 (both accumulate in fp32 and round once), but a CPU whose bf16 GEMMs sum in
# another order (AMX) moves that to the bf16 noise the draft head's layouts measured (7.0e-4 on losses): allowed
# 3e-3 and 2e-2.
TRITON = ['moe.backend="triton"']
_FP32, _BF16 = (1e-5, 1e-4), (3e-3, 2e-2)
_TRITON_RUNS = {
    "triton-ep2xtp2-fssdp-ac-capacity-bias-residual-shared-accum": (
        4, COMBINED["ep2xtp2-fssdp-ac-capacity-bias-residual-shared-accum"][1], 1, _FP32),
    "triton-compiled-bf16-draft_head": (1, [*COMPILE_FEATURES, *COMPILED, 'train.mixed_precision="bf16"',
                                            "draft_head.enabled=true"], 1, _BF16),
    "triton-pp2": (2, [*PIPELINE_LAYOUTS["pp2"][1], *_MODEL], 2, _FP32),
    "triton-diloco-topk": (2, [*_TOPK_WORKERS, *TOPK_EXCHANGE, *_MODEL], 2, _FP32),
}
TRITON_COMBINED = {name: (world, [*run, *TRITON], run if ref_world > 1 else
                          COMBINED["ep2xtp2-fssdp-ac-capacity-bias-residual-shared-accum"][2], ref_world, tol)
                   for name, (world, run, ref_world, tol) in _TRITON_RUNS.items()}
TRITON_COMBINED["triton-compiled-bf16-draft_head"] = (1, [*_TRITON_RUNS["triton-compiled-bf16-draft_head"][1], *TRITON],
                                                      _TRITON_RUNS["triton-compiled-bf16-draft_head"][1], 1, _BF16)

# ---- tests/unit/test_model.py: the MoE layer against a loop over tokens and experts ----
LAYER_FEATURES = list(_MODEL)


def proofs() -> list[Proof]:
    out = []
    for name, (world, layout) in LAYOUTS.items():
        out.append(Proof(f"layouts {name}", world, tuple(layout)))
    for name, (world, layout) in FEATURE_LAYOUTS.items():
        variant = tuple(VARIANTS[name.split("-")[0]])
        out.append(Proof(f"layouts {name}", world, (*variant, *layout), variant))
    for name, (world, layout) in BF16_LAYOUTS.items():
        out.append(Proof(f"layouts bf16 {name}", world, (*layout, 'train.mixed_precision="bf16"'), tuple(layout),
                         world))
    for name, (world, layout) in COMPILE_LAYOUTS.items():
        out.append(Proof(f"layouts compiled {name}", world, (*layout, *COMPILED)))
    for name, (world, run, ref) in COMBINED.items():  # the accumulation differs from the reference's too
        out.append(Proof(f"combos {name}", world, tuple(run), tuple(ref), tests=frozenset({"accum"})))
    for name, (world, run, ref, ref_world) in DILOCO_COMBINED.items():
        out.append(Proof(f"combos {name}", world, tuple(run), tuple(ref), ref_world))
    for name, (world, layout, _) in PIPELINE_LAYOUTS.items():
        out.append(Proof(f"pipeline {name}", world, (*PIPELINE_COMMON, *layout), tuple(PIPELINE_COMMON)))
    for name, (world, layout, _, extra, ref_world) in PIPELINE_COMBINED.items():
        out.append(Proof(f"pipeline {name}", world, (*PIPELINE_COMMON, *layout), (*PIPELINE_COMMON, *extra),
                         ref_world, tests=frozenset({"accum"} if "train.grad_accum=2" in layout else ())))
    world, layout, _ = PIPELINE_LAYOUTS["pp2"]
    out.append(Proof("pipeline bf16", world, (*PIPELINE_COMMON, *layout, *PIPELINE_BF16),
                     (*PIPELINE_COMMON, *PIPELINE_BF16)))
    for name, layout in TOPK_LAYOUTS.items():  # the same workers exchanging dense fp32: what is put to test is topk
        out.append(Proof(f"diloco topk exchange {name}", 4, (*layout, *TOPK_EXCHANGE), tuple(layout), 4))
    for name, (world, run, ref, _) in DRAFT_HEAD_LAYOUTS.items():
        out.append(Proof(f"draft_head {name}", world, (*run, "draft_head.enabled=true"),
                         (*ref, "draft_head.enabled=true"), tests=frozenset({"draft_head"})))
    for name, (world, run, ref, ref_world, _) in TRITON_COMBINED.items():  # with "accum": the reference accumulates
        out.append(Proof(f"triton {name}", world, tuple(run), tuple(ref), ref_world,  # other micro-batches
                         tests=frozenset({"accum"} if name.endswith("accum") else ())))
    out.append(Proof("diloco as plain training", 1, (*DILOCO_AS_PLAIN, *DILOCO_PLAIN_FEATURES),
                     tuple(DILOCO_PLAIN_FEATURES)))
    out.append(Proof("diloco compiled", 2, (*DILOCO_WORKERS, *COMPILED), tuple(DILOCO_WORKERS), 2))
    out.append(Proof("diloco bf16", 2, (*DILOCO_WORKERS, 'train.mixed_precision="bf16"'), tuple(DILOCO_WORKERS), 2))
    out.append(Proof("compile", 1, (*COMPILE_FEATURES, "train.compile=true"), tuple(COMPILE_FEATURES)))
    out.append(Proof("compile bf16", 1, (*COMPILE_FEATURES, *COMPILED, 'train.mixed_precision="bf16"'),
                     (*COMPILE_FEATURES, 'train.mixed_precision="bf16"')))
    # the loop reference has none of the layer's machinery: each feature on is under test
    out.append(Proof("layer loop", 1, tuple(LAYER_FEATURES), tests=frozenset({"capacity", "bias", "pr-moe",
                                                                                "shared"})))
    return out


def proven() -> dict[frozenset[str], list[str]]:
    """pair -> the proofs that test it, in order."""
    out: dict[frozenset[str], list[str]] = {}
    for p in proofs():
        for pair in sorted(p.pairs(), key=sorted):
            out.setdefault(pair, []).append(p.where)
    return out


def matrix_markdown() -> str:
    """The README's table: each cell the first proof of the pair, or "refused"."""
    names = list(config.FEATURES)
    done = proven()
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        cells = []
        for b in names:
            pair = frozenset({a, b})
            cells.append("—" if a == b else "refused" if pair in config.REFUSED else
                         done[pair][0].split(" ")[0] if pair in done else "**missing**")
        lines.append(f"| {a} (`{config.FEATURES[a][0]}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_pairs() -> list[frozenset[str]]:
    return [frozenset(p) for p in itertools.combinations(config.FEATURES, 2)]
