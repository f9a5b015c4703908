"""Blockwise 4- and 8-bit quantization, and an all-reduce whose wire carries codes, not fp32.

Quantization is symmetric per block of `block` values: scale = absmax / qmax with
qmax = 2^(bits-1) - 1, code = round(x / scale) in [-qmax, qmax]. The round-trip error of a value
is at most scale / 2 (half a step of its block). 4-bit codes are stored two per byte.

`quantized_all_reduce_mean` averages a flat fp32 tensor over a group of W ranks in the
reduce-scatter / all-gather pattern, quantized both ways:
  1. each rank quantizes its tensor and sends chunk r's codes and scales to rank r (all-to-all);
  2. rank r dequantizes the W versions of chunk r, sums them in fp32, divides by W, requantizes;
  3. the averaged chunks' codes and scales are all-gathered and dequantized everywhere.
Every rank ends with the same values. What crosses the wire is (bits/8 + 4/block) bytes per value
each way, against 4 bytes for fp32; the collective wrapper counts it.
"""

from __future__ import annotations

import torch

from expertmesh.dist.comm_stats import Comm, group_rank, group_size


def _qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: 4 or 8 are supported")
    return 2 ** (bits - 1) - 1


def quantize(x: torch.Tensor, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat fp32 `x` whose length is a multiple of `block` (and even for 4 bits) -> (uint8 codes, fp32
    scales [numel / block])."""
    qmax = _qmax(bits)
    if x.dim() != 1 or x.numel() % block or (bits == 4 and x.numel() % 2):
        raise ValueError(f"quantize wants a flat tensor whose length is a multiple of block={block} "
                         f"(and even for 4 bits); got shape {tuple(x.shape)}")
    blocks = x.float().view(-1, block)
    scales = blocks.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(blocks / safe[:, None]).clamp_(-qmax, qmax).to(torch.int16) + qmax  # 0 .. 2*qmax
    q = q.to(torch.uint8).view(-1)
    if bits == 4:
        q = q[0::2] | (q[1::2] << 4)
    return q, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    qmax = _qmax(bits)
    if bits == 4:
        codes = torch.stack((codes & 0xF, codes >> 4), dim=1).view(-1)
    values = codes.to(torch.float32) - qmax
    return (values.view(-1, block) * scales[:, None]).view(-1)


def wire_bytes_per_value(bits: int, block: int) -> float:
    return bits / 8 + 4 / block


def quantized_all_reduce_mean(x: torch.Tensor, group, comm: Comm, bits: int, block: int, label: str) -> torch.Tensor:
    """Mean of flat fp32 `x` over `group` (None: a group of one, returns the round-tripped x)."""
    W = group_size(group)
    n = x.numel()
    unit = W * block * 2  # every chunk a whole number of (even-sized) blocks
    padded = torch.zeros(-(-n // unit) * unit, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    chunk = padded.numel() // W
    codes, scales = quantize(padded, bits, block)
    codes_in, scales_in = torch.empty_like(codes), torch.empty_like(scales)
    comm.all_to_all_single(codes_in, codes, None, None, group, label)
    comm.all_to_all_single(scales_in, scales, None, None, group, label)
    code_len, scale_len = codes.numel() // W, scales.numel() // W
    mine = sum(dequantize(codes_in[r * code_len:(r + 1) * code_len], scales_in[r * scale_len:(r + 1) * scale_len],
                          bits, block) for r in range(W)) / W
    assert mine.numel() == chunk
    my_codes, my_scales = quantize(mine, bits, block)
    all_codes, all_scales = torch.empty_like(codes), torch.empty_like(scales)
    comm.all_gather_into_tensor(all_codes, my_codes, group, label)
    comm.all_gather_into_tensor(all_scales, my_scales, group, label)
    return dequantize(all_codes, all_scales, bits, block)[:n].view_as(x)


# SparseLoCo-class compression: per chunk of `chunk` values, the k largest in magnitude, each sent as its
# offset in the chunk (ceil(log2(chunk)) bits: 12 for 4096) and a `bits`-bit code (sign + magnitude level)
# against one fp32 scale (the chunk's largest sent magnitude). A code's value is sign * (level + 1/2) / L * scale,
# L = 2^(bits-1) levels: 2 bits send +-scale/4 or +-3*scale/4. What a code does not carry is the sender's to keep
# (error feedback).

_TOPK_BITS = (2, 4, 8)


def topk_k(fraction: float, chunk: int) -> int:
    return max(1, min(chunk, round(fraction * chunk)))


def offset_bits(chunk: int) -> int:
    return max(1, (chunk - 1).bit_length())


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers below 2^bits -> a uint8 stream of `bits` bits each (value i's bit j is the
    stream's bit i * bits + j, least significant first)."""
    shifts = torch.arange(bits, device=values.device)
    stream = ((values.reshape(-1, 1).long() >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)]).view(-1, 8)
    return (stream << torch.arange(8, device=values.device, dtype=torch.uint8)).sum(dim=1).to(torch.uint8)


def unpack_bits(stream: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` values of `pack_bits`'s stream (int64)."""
    flat = ((stream.reshape(-1, 1) >> torch.arange(8, device=stream.device, dtype=torch.uint8)) & 1).reshape(-1)
    return (flat[:n * bits].view(n, bits).long() << torch.arange(bits, device=stream.device)).sum(dim=1)


def topk_compress(x: torch.Tensor, fraction: float, chunk: int, bits: int):
    """Flat fp32 `x` -> (packed offsets, packed codes, fp32 scales [C]), C = ceil(n / chunk), k per chunk."""
    if bits not in _TOPK_BITS or not 2 <= chunk <= 32768:
        raise ValueError(f"topk_compress: bits={bits} must be one of {_TOPK_BITS} and chunk={chunk} in [2, 32768]")
    n, k = x.numel(), topk_k(fraction, chunk)
    chunks = -(-n // chunk)
    padded = torch.zeros(chunks * chunk, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1)
    rows = padded.view(chunks, chunk)
    idx = rows.abs().topk(k, dim=1, sorted=False).indices
    vals = rows.gather(1, idx)
    scales = vals.abs().amax(dim=1)
    L = 2 ** (bits - 1)
    level = (vals.abs() / torch.where(scales > 0, scales, torch.ones_like(scales))[:, None] * L).floor()
    codes = level.clamp_(0, L - 1).long() | ((vals < 0).long() << (bits - 1))
    return pack_bits(idx, offset_bits(chunk)), pack_bits(codes, bits), scales


def topk_values(packed: torch.Tensor, scales: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """The [C, k] values that `topk_compress`'s codes stand for."""
    L = 2 ** (bits - 1)
    codes = unpack_bits(packed, bits, scales.numel() * k).view(-1, k)
    sign = 1.0 - 2.0 * ((codes >> (bits - 1)) & 1).float()
    return sign * ((codes & (L - 1)).float() + 0.5) / L * scales[:, None]


def topk_decompress(offsets: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, n: int, chunk: int, bits: int,
                    k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense fp32 [n] holding the sent values (added into `out`, a padded [C * chunk] buffer, when given)."""
    chunks = scales.numel()
    idx = unpack_bits(offsets, offset_bits(chunk), chunks * k).view(chunks, k)
    dense = torch.zeros(chunks * chunk, dtype=torch.float32, device=scales.device) if out is None else out
    dense.view(chunks, chunk).scatter_add_(1, idx, topk_values(packed, scales, k, bits))
    return dense[:n] if out is None else dense


def sparse_all_reduce_mean(x: torch.Tensor, group, comm: Comm, fraction: float, chunk: int, bits: int,
                           label: str, per_sender: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over `group` of every rank's compressed `x`, and what this rank's own contribution carried (dense):
    the caller keeps `x - sent` as its error feedback. The contributions are all-gathered (fixed sizes: k per
    chunk) and summed in rank order, so every rank ends with the same values. `per_sender`: each value's sum
    is divided by the number of ranks that sent it (none: 0) instead of by the group's size."""
    W, n, k = group_size(group), x.numel(), topk_k(fraction, chunk)
    if n == 0:  # a rank whose shards of the fragment are empty (so are its peers': the same place in each worker)
        return x.clone(), x.clone()
    offsets, packed, scales = topk_compress(x, fraction, chunk, bits)
    own = topk_decompress(offsets, packed, scales, n, chunk, bits, k,
                          out=torch.zeros(scales.numel() * chunk, dtype=torch.float32, device=x.device))
    sent = own[:n]
    if W == 1:
        return sent.clone().view_as(x), sent.view_as(x)
    parts = []
    for t in (offsets, packed, scales):
        out = t.new_empty(W * t.numel())
        comm.all_gather_into_tensor(out, t, group, label)
        parts.append(out.view(W, -1))
    me = group_rank(group)
    total = torch.zeros_like(own)
    senders = torch.zeros_like(own) if per_sender else None
    for r in range(W):  # in rank order on every rank; a rank's sent values land on distinct slots of zeros, so
        # adding its dense part equals scattering them into the sum
        part = own if r == me else topk_decompress(parts[0][r], parts[1][r], parts[2][r], n, chunk, bits, k,
                                                   out=torch.zeros_like(own))
        total += part
        if senders is not None:
            senders += part != 0
    if senders is not None:
        return (total[:n] / senders[:n].clamp_min(1)).view_as(x), sent.view_as(x)
    return (total[:n] / W).view_as(x), sent.view_as(x)
