"""The MoE layer's GPU kernels in Triton: dispatch, combine, their backwards, the grouped expert GEMMs, and a
fused MoE forward (FlashMoE's shape: gather, up/gate, SwiGLU, down and the weighted scatter-add in one kernel).

Legend: T tokens, K experts per token, S = T K routing slots, E experts, D model dim, F expert hidden dim,
R rows of the dispatched matrix (here R = S: see below), N rows actually routed (slots not dropped).

Without a GPU, Triton's interpreter (`TRITON_INTERPRET=1`, set on import when CUDA is absent) runs the same
kernel source on CPU tensors; the tests prove every kernel that way against the C++ ops and float64 loops
(tests/unit/test_triton_ops.py). On a GPU the source is compiled as usual.

No host sync. The number of routed rows N is data-dependent, so dispatch returns S rows, the first N grouped by
expert (the order of the C++ and reference ops: stable, token order inside an expert) and the rest zero; the
counts and offsets stay on the device, and every kernel reads them there (the grouped GEMMs launch R / BM + E
programs, each finding its expert and row tile from the experts' cumulative tile counts; the spare ones
return at once). Expert parallelism needs its split sizes
on the host anyway; its all-to-all sends only the routed rows (parallel/fssdp.py).

Rounding. Every kernel multiplies and accumulates in fp32 and rounds once to the output's dtype. bf16
outputs are rounded to nearest-even in the kernel by bit arithmetic (`_to_out`), because the interpreter's
own float-to-bf16 cast truncates: so the interpreter and the GPU round alike, and as torch does.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the kernels run on CPU tensors through Triton's interpreter (moe/ops.py sets
    os.environ.setdefault("TRITON_INTERPRET", "1")  # it first: the flag must precede triton's own import)

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # `pip install triton` (the `dev` extra has it)
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if HAVE_TRITON and INTERPRET and type(tl.cumsum).__name__ == "JITFunction":
    raise ImportError("triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run these "
                      "kernels on the CPU: set TRITON_INTERPRET=1 in the environment (or import expertmesh first)")


def _require() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("moe.backend='triton' needs the triton package (pip install triton; the dev extra)")


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# Launch tiles: rows per program, and the widest column block. The GPU's are the usual sizes; under the interpreter
# every program costs milliseconds of Python, so there larger tiles mean fewer of them (tests/unit/test_triton_ops.py
# sets the GPU's, to cross the tile edges the GPU crosses).
GPU_TILES = {"rows": 16, "gmm_rows": 64, "fused_rows": 32, "cols": 128, "gmm_cols": 64, "fused_f": 32}
BIG_TILES = {"rows": 128, "gmm_rows": 128, "fused_rows": 128, "cols": 256, "gmm_cols": 256, "fused_f": 256}
TILES = BIG_TILES if INTERPRET else GPU_TILES


if HAVE_TRITON:

    @triton.jit
    def _to_out(x, OUT_BF16: tl.constexpr):
        """fp32 -> the output's dtype; bf16 rounded to nearest-even (torch's rule) by bit arithmetic."""
        if OUT_BF16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x

    @triton.jit
    def _rank_kernel(idx_ptr, rank_ptr, counts_ptr, S, BLOCK: tl.constexpr):
        """Program e: each slot routed to expert e gets its rank among them (slot order), and counts[e]."""
        e = tl.program_id(0)
        running = tl.zeros((), dtype=tl.int32)
        for start in range(0, S, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < S
            hit = (tl.load(idx_ptr + offs, mask=inside, other=-1) == e).to(tl.int32)
            tl.store(rank_ptr + offs, running + tl.cumsum(hit, 0) - 1, mask=inside & (hit == 1))
            running += tl.sum(hit, 0)
        tl.store(counts_ptr + e, running)

    @triton.jit
    def _row_map_kernel(idx_ptr, rank_ptr, offs_ptr, row_map_ptr, slot_of_row_ptr, S, E, BLOCK: tl.constexpr):
        """row_map[s] = offset[expert] + rank (-1 for a dropped slot, or an id outside [0, E)); slot_of_row, its
        inverse."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < S
        e = tl.load(idx_ptr + offs, mask=inside, other=-1)
        kept = inside & (e >= 0) & (e < E)
        row = tl.load(offs_ptr + e, mask=kept, other=0) + tl.load(rank_ptr + offs, mask=kept, other=0)
        tl.store(row_map_ptr + offs, tl.where(kept, row, -1).to(tl.int64), mask=inside)
        tl.store(slot_of_row_ptr + row, offs, mask=kept)

    @triton.jit
    def _gather_rows_kernel(x_ptr, slot_of_row_ptr, out_ptr, R, D, K, stride_x, stride_out,
                            BR: tl.constexpr, BD: tl.constexpr):
        """out[r] = x[slot_of_row[r] // K]; rows with no slot (past N) are zero."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        slot = tl.load(slot_of_row_ptr + rows, mask=rows < R, other=-1)
        tok = tl.where(slot >= 0, slot // K, 0)
        m = (slot >= 0)[:, None] & (cols < D)[None, :]
        v = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_x + cols[None, :], mask=m, other=0)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :], v,
                 mask=(rows < R)[:, None] & (cols < D)[None, :])

    @triton.jit
    def _gather_sum_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, T, K, D, stride_y, stride_out,
                           HAS_W: tl.constexpr, OUT_BF16: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        """out[t] = sum_k w[t, k] y[row_map[t, k]] in fp32, k in order (combine); without w, the plain sum
        (dispatch's backward)."""
        toks = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.program_id(1) * BD + tl.arange(0, BD)
        tin, cin = toks < T, cols < D
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for k in range(K):
            row = tl.load(row_map_ptr + toks * K + k, mask=tin, other=-1)
            y = tl.load(y_ptr + tl.where(row >= 0, row, 0)[:, None] * stride_y + cols[None, :],
                        mask=(row >= 0)[:, None] & cin[None, :], other=0).to(tl.float32)
            if HAS_W:
                w = tl.load(w_ptr + toks * K + k, mask=tin & (row >= 0), other=0).to(tl.float32)
                y = y * w[:, None]
            acc += y
        tl.store(out_ptr + toks[:, None].to(tl.int64) * stride_out + cols[None, :], _to_out(acc, OUT_BF16),
                 mask=tin[:, None] & cin[None, :])

    @triton.jit
    def _combine_backward_kernel(grad_ptr, y_ptr, row_map_ptr, w_ptr, grad_y_ptr, grad_w_ptr, S, K, D,
                                 stride_g, stride_y, stride_gy, OUT_BF16: tl.constexpr, BS: tl.constexpr,
                                 BD: tl.constexpr):
        """Per slot s = (t, k) routed to row r: grad_y[r] = w[s] grad_out[t]; grad_w[s] = <grad_out[t], y[r]>."""
        slots = tl.program_id(0) * BS + tl.arange(0, BS)
        sin = slots < S
        row = tl.load(row_map_ptr + slots, mask=sin, other=-1)
        kept = row >= 0
        safe = tl.where(kept, row, 0).to(tl.int64)
        tok = (slots // K).to(tl.int64)
        w = tl.load(w_ptr + slots, mask=sin & kept, other=0).to(tl.float32)
        dot = tl.zeros((BS,), dtype=tl.float32)
        for d0 in range(0, D, BD):
            cols = d0 + tl.arange(0, BD)
            m = kept[:, None] & (cols < D)[None, :]
            g = tl.load(grad_ptr + tok[:, None] * stride_g + cols[None, :], mask=m, other=0).to(tl.float32)
            y = tl.load(y_ptr + safe[:, None] * stride_y + cols[None, :], mask=m, other=0).to(tl.float32)
            tl.store(grad_y_ptr + safe[:, None] * stride_gy + cols[None, :], _to_out(g * w[:, None], OUT_BF16), mask=m)
            dot += tl.sum(g * y, 1)
        tl.store(grad_w_ptr + slots, dot, mask=sin)

    @triton.jit
    def _dot(a, b, INTERPRET: tl.constexpr):
        """a @ b in fp32. On the GPU bf16 operands go to the tensor cores as they are (fp32 ones at full
        precision); the interpreter multiplies bf16 wrongly, so there both are widened first (products of
        bf16 values are exact in fp32: the same numbers)."""
        if INTERPRET:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b, out_dtype=tl.float32)

    @triton.jit
    def _tile(tiles_ptr, E, EB: tl.constexpr):
        """This program's (expert, row tile of that expert), from the inclusive cumulative tile counts of the
        experts (`tiles`); e = E when the program is past the last tile."""
        p = tl.program_id(0)
        es = tl.arange(0, EB)
        cum = tl.load(tiles_ptr + es, mask=es < E, other=2147483647)
        e = tl.sum((cum <= p).to(tl.int32), 0)
        before = tl.load(tiles_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
        return e, p - before

    @triton.jit
    def _gmm_kernel(x_ptr, w_ptr, out_ptr, offs_ptr, counts_ptr, tiles_ptr, E, KD, MD, sx_n, sx_k, sw_e, sw_k, sw_m,
                    so_n, OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr, EB: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):
        """out[rows of e] = x[rows of e] @ w[e]: program (p, j) computes the p-th row tile of all experts' tiles
        (`_tile`: expert e, its tile i), column tile j; programs past the last tile return at once."""
        e, i = _tile(tiles_ptr, E, EB)
        j = tl.program_id(1)
        if e >= E:
            return
        count = tl.load(counts_ptr + e)
        start = tl.load(offs_ptr + e).to(tl.int64)
        within = i * BM + tl.arange(0, BM)
        rows = start + within
        rin = within < count
        cols = j * BN + tl.arange(0, BN)
        cin = cols < MD
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, KD, BK):
            ks = k0 + tl.arange(0, BK)
            kin = ks < KD
            a = tl.load(x_ptr + rows[:, None] * sx_n + ks[None, :] * sx_k, mask=rin[:, None] & kin[None, :], other=0)
            b = tl.load(w_ptr + e.to(tl.int64) * sw_e + ks[:, None] * sw_k + cols[None, :] * sw_m,
                        mask=kin[:, None] & cin[None, :], other=0)
            acc += _dot(a, b, INTERPRET)
        tl.store(out_ptr + rows[:, None] * so_n + cols[None, :], _to_out(acc, OUT_BF16),
                 mask=rin[:, None] & cin[None, :])

    @triton.jit
    def _gmm_wgrad_kernel(x_ptr, g_ptr, out_ptr, offs_ptr, counts_ptr, KD, MD, sx_n, sg_n, so_e, so_k,
                          OUT_BF16: tl.constexpr, INTERPRET: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                          BR: tl.constexpr):
        """out[e] = x[rows of e]^T @ g[rows of e] (zero for an expert without rows)."""
        e, i, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        count = tl.load(counts_ptr + e)
        start = tl.load(offs_ptr + e).to(tl.int64)
        ks = i * BK + tl.arange(0, BK)
        cols = j * BN + tl.arange(0, BN)
        kin, cin = ks < KD, cols < MD
        acc = tl.zeros((BK, BN), dtype=tl.float32)
        for r0 in range(0, count, BR):
            within = r0 + tl.arange(0, BR)
            rows = start + within
            rin = within < count
            a = tl.load(x_ptr + rows[:, None] * sx_n + ks[None, :], mask=rin[:, None] & kin[None, :], other=0)
            b = tl.load(g_ptr + rows[:, None] * sg_n + cols[None, :], mask=rin[:, None] & cin[None, :], other=0)
            acc += _dot(tl.trans(a), b, INTERPRET)
        tl.store(out_ptr + e.to(tl.int64) * so_e + ks[:, None] * so_k + cols[None, :], _to_out(acc, OUT_BF16),
                 mask=kin[:, None] & cin[None, :])

    @triton.jit
    def _fused_moe_kernel(x_ptr, slot_of_row_ptr, w_ptr, w1_ptr, w3_ptr, w2_ptr, out_ptr, offs_ptr, counts_ptr,
                          tiles_ptr, E, K, D, F, sx, s1_e, s1_d, s2_e, s2_f, so, H_BF16: tl.constexpr,
                          INTERPRET: tl.constexpr, EB: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                          BF: tl.constexpr):
        """Row tile i of expert e (`_tile`): the tile's tokens gathered from x (no dispatched matrix), SwiGLU
        through the expert's w1/w3 and w2 over F in blocks with the hidden tile kept on chip, each row times its
        routing weight added into its token's fp32 output row (atomically: a token's k slots may be in flight at
        once)."""
        e, i = _tile(tiles_ptr, E, EB)
        if e >= E:
            return
        count = tl.load(counts_ptr + e)
        within = i * BM + tl.arange(0, BM)
        rin = within < count
        slot = tl.load(slot_of_row_ptr + tl.load(offs_ptr + e).to(tl.int64) + within, mask=rin, other=0)
        tok = (slot // K).to(tl.int64)
        dims = tl.arange(0, BD)
        din = dims < D
        x = tl.load(x_ptr + tok[:, None] * sx + dims[None, :], mask=rin[:, None] & din[None, :], other=0)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        e64 = e.to(tl.int64)
        for f0 in range(0, F, BF):
            fs = f0 + tl.arange(0, BF)
            fin = fs < F
            m1 = din[:, None] & fin[None, :]
            gate = _dot(x, tl.load(w1_ptr + e64 * s1_e + dims[:, None] * s1_d + fs[None, :], mask=m1, other=0),
                        INTERPRET)
            up = _dot(x, tl.load(w3_ptr + e64 * s1_e + dims[:, None] * s1_d + fs[None, :], mask=m1, other=0),
                      INTERPRET)
            h = gate * tl.sigmoid(gate) * up
            w2 = tl.load(w2_ptr + e64 * s2_e + fs[:, None] * s2_f + dims[None, :], mask=fin[:, None] & din[None, :],
                         other=0)
            acc += _dot(_to_out(h, H_BF16), w2, INTERPRET)  # the hidden rounded as the composed path rounds it
        weight = tl.load(w_ptr + slot, mask=rin, other=0).to(tl.float32)
        tl.atomic_add(out_ptr + tok[:, None] * so + dims[None, :], acc * weight[:, None],
                      mask=rin[:, None] & din[None, :])


# ---------------------------------------------------------------------------------------------------------------
# Launchers (tensors in, tensors out; no autograd)


def route(topk_idx_TK: torch.Tensor, num_experts: int):
    """-> (row_map_TK int64, slot_of_row_S int32 (-1 past N), tokens_per_expert_E int64, offsets_E int32), all
    computed on the device."""
    _require()
    T, K = topk_idx_TK.shape
    S = T * K
    idx = topk_idx_TK.reshape(-1).to(torch.int32).contiguous()
    rank = torch.empty(S, dtype=torch.int32, device=idx.device)
    counts = torch.empty(num_experts, dtype=torch.int32, device=idx.device)
    block = _block(S, hi=1024)
    if num_experts:
        _rank_kernel[(num_experts,)](idx, rank, counts, S, BLOCK=block)
    offsets = (torch.cumsum(counts, 0, dtype=torch.int32) - counts) if num_experts else counts
    row_map = torch.empty(S, dtype=torch.int64, device=idx.device)
    slot_of_row = torch.full((S,), -1, dtype=torch.int32, device=idx.device)
    if S:
        _row_map_kernel[(triton.cdiv(S, block),)](idx, rank, offsets, row_map, slot_of_row, S, num_experts,
                                                  BLOCK=block)
    return row_map.view(T, K), slot_of_row, counts.to(torch.int64), offsets


def gather_rows(x_TD: torch.Tensor, slot_of_row_S: torch.Tensor, K: int) -> torch.Tensor:
    R, D = slot_of_row_S.shape[0], x_TD.shape[1]
    x_TD = x_TD.contiguous()
    out = torch.empty(R, D, dtype=x_TD.dtype, device=x_TD.device)
    if R and D:
        BR, BD = TILES["rows"], _block(D, hi=TILES["cols"])
        _gather_rows_kernel[(triton.cdiv(R, BR), triton.cdiv(D, BD))](x_TD, slot_of_row_S, out, R, D, K,
                                                                      x_TD.stride(0), out.stride(0), BR=BR, BD=BD)
    return out


def gather_sum(y_RD: torch.Tensor, row_map_TK: torch.Tensor, w_TK: torch.Tensor | None, out_dtype) -> torch.Tensor:
    T, K = row_map_TK.shape
    D = y_RD.shape[1]
    y_RD, row_map = y_RD.contiguous(), row_map_TK.contiguous()
    out = torch.empty(T, D, dtype=out_dtype, device=y_RD.device)
    if T and D:
        BT, BD = TILES["rows"], _block(D, hi=TILES["cols"])
        w = w_TK.contiguous() if w_TK is not None else row_map  # unread without HAS_W
        _gather_sum_kernel[(triton.cdiv(T, BT), triton.cdiv(D, BD))](
            y_RD, row_map, w, out, T, K, D, y_RD.stride(0), out.stride(0), HAS_W=w_TK is not None,
            OUT_BF16=out_dtype == torch.bfloat16, BT=BT, BD=BD)
    return out


def combine_backward(grad_TD: torch.Tensor, y_RD: torch.Tensor, row_map_TK: torch.Tensor, w_TK: torch.Tensor):
    T, K = row_map_TK.shape
    S, D = T * K, y_RD.shape[1]
    grad_TD, y_RD, row_map, w = (t.contiguous() for t in (grad_TD, y_RD, row_map_TK, w_TK))
    grad_y = torch.zeros_like(y_RD)  # rows no slot reads (past N) get no gradient
    grad_w = torch.empty(T, K, dtype=torch.float32, device=y_RD.device)
    if S:
        BS = TILES["rows"]
        _combine_backward_kernel[(triton.cdiv(S, BS),)](
            grad_TD, y_RD, row_map, w, grad_y, grad_w, S, K, D, grad_TD.stride(0), y_RD.stride(0), grad_y.stride(0),
            OUT_BF16=y_RD.dtype == torch.bfloat16, BS=BS, BD=_block(D, hi=TILES["cols"]))
    return grad_y, grad_w.to(w_TK.dtype)


def _tiles(counts_E: torch.Tensor, BM: int, R: int) -> tuple[torch.Tensor, int]:
    """The experts' inclusive cumulative row-tile counts (on the device) and a grid that covers every tile
    whatever the counts: sum_e ceil(c_e / BM) <= R / BM + E."""
    E = counts_E.shape[0]
    tiles = torch.cumsum((counts_E.to(torch.int32) + BM - 1) // BM, 0, dtype=torch.int32)
    return tiles, min(triton.cdiv(R, BM) + E, E * triton.cdiv(R, BM))


def gmm(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Rows of expert e (`counts`, `offsets` on the device) times w[e]; other rows zero. Any strides of w (its
    transpose serves the backward)."""
    R, KD = x_RD.shape
    E, _, MD = w_EDF.shape
    x_RD = x_RD.contiguous()
    out = torch.zeros(R, MD, dtype=x_RD.dtype, device=x_RD.device)
    if R and E and MD:
        BM, BN, BK = TILES["gmm_rows"], _block(MD, hi=TILES["gmm_cols"]), _block(KD, hi=TILES["gmm_cols"])
        tiles, grid = _tiles(counts_E, BM, R)
        _gmm_kernel[(grid, triton.cdiv(MD, BN))](
            x_RD, w_EDF, out, offsets_E, counts_E.to(torch.int32), tiles, E, KD, MD, x_RD.stride(0), x_RD.stride(1),
            w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2), out.stride(0), OUT_BF16=out.dtype == torch.bfloat16,
            INTERPRET=INTERPRET, EB=triton.next_power_of_2(E), BM=BM, BN=BN, BK=BK)
    return out


def gmm_wgrad(x_RD: torch.Tensor, g_RM: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
              out_dtype) -> torch.Tensor:
    R, KD = x_RD.shape
    MD, E = g_RM.shape[1], counts_E.shape[0]
    x_RD, g_RM = x_RD.contiguous(), g_RM.contiguous()
    out = torch.empty(E, KD, MD, dtype=out_dtype, device=x_RD.device)
    if E and KD and MD:
        BK, BN = _block(KD, hi=TILES["gmm_cols"]), _block(MD, hi=TILES["gmm_cols"])
        _gmm_wgrad_kernel[(E, triton.cdiv(KD, BK), triton.cdiv(MD, BN))](
            x_RD, g_RM, out, offsets_E, counts_E.to(torch.int32), KD, MD, x_RD.stride(0), g_RM.stride(0),
            out.stride(0), out.stride(1), OUT_BF16=out_dtype == torch.bfloat16, INTERPRET=INTERPRET, BK=BK, BN=BN,
            BR=TILES["rows"])
    return out


def fused_moe(x_TD, slot_of_row_S, w_TK, w1_EDF, w3_EDF, w2_EFD, counts_E, offsets_E, K: int) -> torch.Tensor:
    """sum_k w[t, k] SwiGLU_{expert(t, k)}(x[t]) for every token, in one launch (fp32 out)."""
    T, D = x_TD.shape
    E, _, F = w1_EDF.shape
    x_TD, w_flat = x_TD.contiguous(), w_TK.reshape(-1).contiguous()
    w1_EDF, w3_EDF, w2_EFD = (w.contiguous() for w in (w1_EDF, w3_EDF, w2_EFD))
    out = torch.zeros(T, D, dtype=torch.float32, device=x_TD.device)
    R = slot_of_row_S.shape[0]
    if R and E:
        BM = TILES["fused_rows"]
        tiles, grid = _tiles(counts_E, BM, R)
        _fused_moe_kernel[(grid,)](
            x_TD, slot_of_row_S, w_flat, w1_EDF, w3_EDF, w2_EFD, out, offsets_E, counts_E.to(torch.int32), tiles, E,
            K, D, F, x_TD.stride(0), w1_EDF.stride(0), w1_EDF.stride(1), w2_EFD.stride(0), w2_EFD.stride(1),
            out.stride(0), H_BF16=w2_EFD.dtype == torch.bfloat16, INTERPRET=INTERPRET,
            EB=triton.next_power_of_2(E), BM=BM, BD=_block(D, hi=4096), BF=_block(F, hi=TILES["fused_f"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile (fakes of static shape: no data-dependent sizes), with autograd


if HAVE_TRITON:
    Tensor = torch.Tensor

    @torch.library.custom_op("expertmesh::triton_dispatch", mutates_args=())
    def dispatch(x_TD: Tensor, topk_idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """-> (x_sorted [S, D]: the N routed rows grouped by expert, then zeros; tokens_per_expert [E];
        row_map [T, K]; slot_of_row [S]; offsets [E])."""
        row_map, slot_of_row, counts, offsets = route(topk_idx_TK, num_experts)
        return gather_rows(x_TD, slot_of_row, topk_idx_TK.shape[1]), counts, row_map, slot_of_row, offsets

    @dispatch.register_fake
    def _(x_TD, topk_idx_TK, num_experts):
        T, K = topk_idx_TK.shape
        return (x_TD.new_empty(T * K, x_TD.shape[1]), topk_idx_TK.new_empty(num_experts, dtype=torch.int64),
                topk_idx_TK.new_empty(T, K, dtype=torch.int64), topk_idx_TK.new_empty(T * K, dtype=torch.int32),
                topk_idx_TK.new_empty(num_experts, dtype=torch.int32))

    @torch.library.custom_op("expertmesh::triton_gather_sum", mutates_args=())
    def gather_sum_op(y_RD: Tensor, row_map_TK: Tensor) -> Tensor:
        """Dispatch's backward: grad_x[t] = sum_k grad_sorted[row_map[t, k]]."""
        return gather_sum(y_RD, row_map_TK, None, y_RD.dtype)

    @gather_sum_op.register_fake
    def _(y_RD, row_map_TK):
        return y_RD.new_empty(row_map_TK.shape[0], y_RD.shape[1])

    def _dispatch_setup(ctx, inputs, output):
        ctx.save_for_backward(output[2])

    def _dispatch_backward(ctx, grad_sorted, *_):
        (row_map,) = ctx.saved_tensors
        return gather_sum_op(grad_sorted.contiguous(), row_map), None, None

    dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)

    @torch.library.custom_op("expertmesh::triton_combine", mutates_args=())
    def combine(y_RD: Tensor, row_map_TK: Tensor, w_TK: Tensor) -> Tensor:
        """out[t] = sum_k w[t, k] y[row_map[t, k]] (fp32 products and sums, k in order)."""
        return gather_sum(y_RD, row_map_TK, w_TK, y_RD.dtype)

    @combine.register_fake
    def _(y_RD, row_map_TK, w_TK):
        return y_RD.new_empty(row_map_TK.shape[0], y_RD.shape[1])

    @torch.library.custom_op("expertmesh::triton_combine_backward", mutates_args=())
    def combine_backward_op(grad_TD: Tensor, y_RD: Tensor, row_map_TK: Tensor, w_TK: Tensor) -> tuple[Tensor, Tensor]:
        return combine_backward(grad_TD, y_RD, row_map_TK, w_TK)

    @combine_backward_op.register_fake
    def _(grad_TD, y_RD, row_map_TK, w_TK):
        return torch.empty_like(y_RD), torch.empty_like(w_TK)

    def _combine_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _combine_backward(ctx, grad_TD):
        y_RD, row_map, w_TK = ctx.saved_tensors
        grad_y, grad_w = combine_backward_op(grad_TD.contiguous(), y_RD, row_map, w_TK)
        return grad_y, None, grad_w

    combine.register_autograd(_combine_backward, setup_context=_combine_setup)

    @torch.library.custom_op("expertmesh::triton_gmm", mutates_args=())
    def gmm_op(x_RD: Tensor, w_EDF: Tensor, counts_E: Tensor, offsets_E: Tensor) -> Tensor:
        """y[rows of e] = x[rows of e] @ w[e], rows past the experts' zero."""
        return gmm(x_RD, w_EDF, counts_E, offsets_E)

    @gmm_op.register_fake
    def _(x_RD, w_EDF, counts_E, offsets_E):
        return x_RD.new_empty(x_RD.shape[0], w_EDF.shape[-1])

    @torch.library.custom_op("expertmesh::triton_gmm_wgrad", mutates_args=())
    def gmm_wgrad_op(x_RD: Tensor, g_RF: Tensor, counts_E: Tensor, offsets_E: Tensor) -> Tensor:
        return gmm_wgrad(x_RD, g_RF, counts_E, offsets_E, x_RD.dtype)

    @gmm_wgrad_op.register_fake
    def _(x_RD, g_RF, counts_E, offsets_E):
        return x_RD.new_empty(counts_E.shape[0], x_RD.shape[1], g_RF.shape[1])

    def _gmm_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _gmm_backward(ctx, grad_RF):
        x_RD, w_EDF, counts, offsets = ctx.saved_tensors
        grad_RF = grad_RF.contiguous()
        grad_x = gmm_op(grad_RF, w_EDF.transpose(-2, -1), counts, offsets) if ctx.needs_input_grad[0] else None
        grad_w = gmm_wgrad_op(x_RD, grad_RF, counts, offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None, None

    gmm_op.register_autograd(_gmm_backward, setup_context=_gmm_setup)

    @torch.library.custom_op("expertmesh::triton_gather_rows", mutates_args=())
    def gather_rows_op(x_TD: Tensor, slot_of_row: Tensor, K: int) -> Tensor:
        return gather_rows(x_TD, slot_of_row, K)

    @gather_rows_op.register_fake
    def _(x_TD, slot_of_row, K):
        return x_TD.new_empty(slot_of_row.shape[0], x_TD.shape[1])

    @torch.library.custom_op("expertmesh::triton_fused_moe", mutates_args=())
    def fused_moe_op(x_TD: Tensor, row_map_TK: Tensor, slot_of_row: Tensor, w_TK: Tensor, w1: Tensor, w3: Tensor,
                     w2: Tensor, counts_E: Tensor, offsets_E: Tensor) -> Tensor:
        """The local MoE forward in one kernel (fp32 out [T, D]); `row_map_TK` serves the backward."""
        return fused_moe(x_TD, slot_of_row, w_TK, w1, w3, w2, counts_E, offsets_E, w_TK.shape[1])

    @fused_moe_op.register_fake
    def _(x_TD, row_map_TK, slot_of_row, w_TK, w1, w3, w2, counts_E, offsets_E):
        return x_TD.new_empty(x_TD.shape, dtype=torch.float32)

    def _fused_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _fused_backward(ctx, grad_TD):
        """The composed path's backward (its ops), recomputing the forward's dispatched rows and hidden
        activations, which the fused forward never kept."""
        x_TD, row_map, slot_of_row, w_TK, w1, w3, w2, counts, offsets = ctx.saved_tensors
        xs = gather_rows_op(x_TD, slot_of_row, w_TK.shape[1])
        gate, up = gmm_op(xs, w1, counts, offsets).float(), gmm_op(xs, w3, counts, offsets).float()
        sig = torch.sigmoid(gate)
        h = (gate * sig * up).to(xs.dtype)
        y = gmm_op(h, w2, counts, offsets)
        grad_y, grad_w = combine_backward_op(grad_TD.to(y.dtype).contiguous(), y, row_map, w_TK)
        grad_h = gmm_op(grad_y, w2.transpose(-2, -1), counts, offsets).float()
        grad_gate = (grad_h * up * sig * (1 + gate * (1 - sig))).to(xs.dtype)
        grad_up = (grad_h * gate * sig).to(xs.dtype)
        grad_xs = gmm_op(grad_gate, w1.transpose(-2, -1), counts, offsets) + \
            gmm_op(grad_up, w3.transpose(-2, -1), counts, offsets)
        return (gather_sum_op(grad_xs, row_map), None, None, grad_w, gmm_wgrad_op(xs, grad_gate, counts, offsets),
                gmm_wgrad_op(xs, grad_up, counts, offsets), gmm_wgrad_op(h, grad_y, counts, offsets), None, None)

    fused_moe_op.register_autograd(_fused_backward, setup_context=_fused_setup)
