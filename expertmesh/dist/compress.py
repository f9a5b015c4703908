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

from expertmesh.dist.comm_stats import Comm, group_size


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
