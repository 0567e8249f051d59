"""FP8 (E4M3) quantizers for DeepSeek-V3's fine-grained recipe.

Shapes: M rows (tokens), K contraction dim, N output dim. A *tile* (tr, tc) is the block of
elements that shares one scale:
  (1, 128)    activations and output gradients, per token per 128 channels (forward, dgrad)
  (128, 1)    the same tensors re-tiled along tokens, for the weight-gradient GEMM (contracts over M)
  (128, 128)  weights
Scales are *dequantization* scales: x ~= fp8 * scale, scale = amax(tile) / 448 (amax clamped away
from zero so an all-zero tile does not divide by zero), optionally rounded up to a power of two
(exact rescaling, never overflows). Dims that are not multiples of the tile are zero-padded for the
amax (zeros do not change it) and the scale grid covers the padded shape; ``QTensor.data`` keeps
only the logical shape (so a cached activation costs exactly 1 B/elt) and kernels that need
tile-aligned operands pad it on the fly with ``padded_data()`` (zeros add nothing to a GEMM).
Per-tensor scaling (one scale for everything) is here only as the baseline the tiles must beat.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite E4M3 value
AMAX_EPS = 1e-12         # amax floor: scales stay > 0 for all-zero tiles (and tiny gradients survive)

ACT_TILE = (1, 128)      # activations / output grads, forward and dgrad
WGRAD_TILE = (128, 1)    # activations / output grads re-tiled for the weight-gradient GEMM
WEIGHT_TILE = (128, 128)


@dataclass
class QTensor:
    """A 2-D tensor in FP8 with one fp32 scale per tile.

    data  (M, K)                          float8_e4m3fn (may be a transposed view, see ``t``)
    scale (ceil(M/tr), ceil(K/tc))        float32
    shape (M, K)                          the logical shape
    """
    data: torch.Tensor
    scale: torch.Tensor
    tile: tuple[int, int]
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        """-> fp32 (M, K). The scale is broadcast over a (Mt, tr, Kt, tc) view of the padded data, not
        expanded with repeat_interleave: the same products in half the ops."""
        tr, tc = self.tile
        M, K = self.shape
        Mt, Kt = self.scale.shape
        d = self.data.float()
        if (Mt * tr, Kt * tc) != (M, K):
            d = F.pad(d, (0, Kt * tc - K, 0, Mt * tr - M))
        d = d.reshape(Mt, tr, Kt, tc) * self.scale.view(Mt, 1, Kt, 1)        # (Mt, tr, Kt, tc)
        return d.view(Mt * tr, Kt * tc)[:M, :K]

    def padded_data(self, row_mult: int | None = None) -> torch.Tensor:
        """-> fp8 (Mp, Kp) contiguous, zero-padded to whole tiles (rows to ``row_mult`` if given)."""
        M, K = self.shape
        Mp = _ceil_to(M, row_mult or self.tile[0])
        Kp = _ceil_to(K, self.tile[1])
        if (Mp, Kp) == (M, K):
            return self.data.contiguous()
        out = torch.zeros(Mp, Kp, dtype=self.data.dtype, device=self.data.device)
        out[:M, :K] = self.data
        return out

    def t(self) -> QTensor:
        """Transposed view (no copy): a (128,1)-tiled (M,K) becomes a (1,128)-tiled (K,M)."""
        return QTensor(self.data.t(), self.scale.t(), (self.tile[1], self.tile[0]),
                       (self.shape[1], self.shape[0]))

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def compute_scale(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """amax (any shape) -> dequant scale amax/448, clamped > 0; pow2 rounds *up* to 2^k so that
    x/scale still fits in [-448, 448] and the scaling itself is exact in binary. The rounding works on
    the fp32 bits (all-ones added to the mantissa carries into the exponent unless the mantissa is
    zero), exact where exp2(ceil(log2(s))) was not (log2 rounds s just above 2^k down to k), and the
    rule the Triton quantizers (model/kernels/fp8_quant.py) repeat bit for bit."""
    s = amax.float().clamp_min(AMAX_EPS) / FP8_MAX
    if pow2:
        s = ((s.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return s


def quantize(x: torch.Tensor, tile: tuple[int, int], pow2: bool = False) -> QTensor:
    """x (M, K) any float dtype -> QTensor with one scale per (tr, tc) tile (online amax)."""
    if x.dim() != 2:
        raise ValueError(f"quantize expects a 2-D tensor, got shape {tuple(x.shape)}")
    M, K = x.shape
    tr, tc = tile
    Mp, Kp = _ceil_to(max(M, 1), tr), _ceil_to(max(K, 1), tc)
    xf = x.float()
    if (Mp, Kp) != (M, K):
        xf = F.pad(xf, (0, Kp - K, 0, Mp - M))                               # zeros: amax unchanged
    blocks = xf.view(Mp // tr, tr, Kp // tc, tc)                             # (Mt, tr, Kt, tc)
    amax = blocks.abs().amax(dim=(1, 3))                                     # (Mt, Kt)
    scale = compute_scale(amax, pow2)
    q = (blocks / scale.view(Mp // tr, 1, Kp // tc, 1)).clamp_(-FP8_MAX, FP8_MAX)   # clamp: rounding safety
    return QTensor(q.view(Mp, Kp)[:M, :K].to(FP8_DTYPE).contiguous(), scale, tile, (M, K))


def quantize_act(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """(M, K) activations, 1x128 tiles along K."""
    return quantize(x, ACT_TILE, pow2)


def quantize_weight(w: torch.Tensor, pow2: bool = False) -> QTensor:
    """(N, K) weight (nn.Linear layout), 128x128 blocks."""
    return quantize(w, WEIGHT_TILE, pow2)


def quantize_wgrad(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """(M, K) activations re-tiled 128x1 (along tokens) for the weight-gradient GEMM."""
    return quantize(x, WGRAD_TILE, pow2)


def quantize_dual(x: torch.Tensor, pow2: bool = False) -> tuple[QTensor, QTensor]:
    """(M, K) -> (1x128, 128x1) tiles of the same tensor: an output gradient feeds the dgrad and the wgrad."""
    return quantize_act(x, pow2), quantize_wgrad(x, pow2)


def retile_wgrad(q: QTensor, pow2: bool = False) -> QTensor:
    """A cached 1x128 QTensor -> 128x1 tiles: dequantize then re-quantize, as DeepSeek-V3 does
    in backward (its report: "read out, dequantized, transposed, re-quantized into 128x1 tiles")."""
    return quantize_wgrad(q.dequantize(), pow2)


def quantize_experts(w: torch.Tensor, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts' weights in one pass: w (E, K, M) -> data (E, K, M) fp8, scale (E, Kt, Mt), one
    scale per 128x128 block of each expert (the same ops as ``quantize`` per expert, so the same bits)."""
    E, K, M = w.shape
    Kp, Mp = _ceil_to(max(K, 1), 128), _ceil_to(max(M, 1), 128)
    wf = F.pad(w.detach().float(), (0, Mp - M, 0, Kp - K))                  # (E, Kp, Mp), zeros: amax unchanged
    blocks = wf.view(E, Kp // 128, 128, Mp // 128, 128)                      # (E, Kt, 128, Mt, 128)
    scale = compute_scale(blocks.abs().amax(dim=(2, 4)), pow2)               # (E, Kt, Mt)
    q = (blocks / scale[:, :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
    return q.view(E, Kp, Mp)[:, :K, :M].to(FP8_DTYPE).contiguous(), scale


def dequantize_experts(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quantize_experts' output -> fp32 (E, Kp, Mp), zero-padded to whole 128x128 blocks."""
    E, K, M = data.shape
    Kt, Mt = scale.shape[1:]
    d = F.pad(data.float(), (0, Mt * 128 - M, 0, Kt * 128 - K)).view(E, Kt, 128, Mt, 128)
    return (d * scale[:, :, None, :, None]).view(E, Kt * 128, Mt * 128)


def dequantize_act_padded(q: QTensor) -> torch.Tensor:
    """A 1x128-tiled QTensor (M, K) -> fp32 (M, Kp), zero-padded to whole tiles. No repeat_interleave
    (whose count a GPU would read back): the scale is broadcast over a (M, Kt, 128) view."""
    M, K = q.shape
    Kt = q.scale.shape[1]
    d = F.pad(q.data.float(), (0, Kt * 128 - K)).view(M, Kt, 128)
    return (d * q.scale[:, :, None]).view(M, Kt * 128)


@dataclass
class Segments:
    """Where each expert's rows lie in a (N, .) tensor sorted by expert, all on the device.

    start, end  (E,) int64  first row and one past the last row of each expert
    tile_first  (E,) int64  index of the expert's first 128-row tile (tiles never span two experts)
    tile_of_row (N,) int64  the 128-row tile of every row (None where only the bounds are needed)
    n_tiles     int         an upper bound of the tile count known on the host: N // 128 + E
    """
    start: torch.Tensor
    end: torch.Tensor
    tile_first: torch.Tensor
    tile_of_row: torch.Tensor | None
    n_tiles: int


def segments(counts: torch.Tensor, n_rows: int, rows_per_tile: int = 128, with_rows: bool = True) -> Segments:
    """counts (E,) rows per expert (summing to n_rows) -> Segments, without reading counts on the host
    (repeat_interleave is told its output size). ``with_rows=False`` leaves tile_of_row None: the Triton
    quantizer (model/kernels/fp8_quant.py) walks the segments and never needs it."""
    E = counts.shape[0]
    counts = counts.long()
    end = counts.cumsum(0)
    start = end - counts
    tiles = (counts + rows_per_tile - 1) // rows_per_tile
    tile_first = tiles.cumsum(0) - tiles
    if not with_rows:
        return Segments(start, end, tile_first, None, n_rows // rows_per_tile + E)
    expert = torch.repeat_interleave(torch.arange(E, device=counts.device), counts, output_size=n_rows)   # (N,)
    row = torch.arange(n_rows, device=counts.device)
    tile_of_row = tile_first[expert] + (row - start[expert]) // rows_per_tile
    return Segments(start, end, tile_first, tile_of_row, n_rows // rows_per_tile + E)


def quantize_segments(x: torch.Tensor, seg: Segments, pow2: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, K) sorted by expert -> data (N, K) fp8, scale (seg.n_tiles, K): 128x1 tiles along tokens
    that restart at every expert's first row (what ``quantize_wgrad`` gives per expert segment), in one pass.
    Unused tile slots keep the floor scale and are never read."""
    xf = x.detach().float()
    amax = torch.zeros(seg.n_tiles, x.shape[1], dtype=torch.float32, device=x.device)
    # (T, K): max |x| per tile and column; index_reduce_ is 30x faster than scatter_reduce_ here on CPU
    with warnings.catch_warnings():                                          # torch marks it beta
        warnings.simplefilter("ignore")
        amax.index_reduce_(0, seg.tile_of_row, xf.abs(), "amax")
    scale = compute_scale(amax, pow2)
    q = (xf / scale[seg.tile_of_row]).clamp_(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale


def dequantize_segments(data: torch.Tensor, scale: torch.Tensor, seg: Segments) -> torch.Tensor:
    """quantize_segments' output -> fp32 (N, K)."""
    return data.float() * scale[seg.tile_of_row]


def quantize_tensorwise(x: torch.Tensor, pow2: bool = False) -> QTensor:
    """(M, K) with a single scale: the baseline that outliers ruin."""
    M, K = x.shape
    scale = compute_scale(x.detach().abs().amax(), pow2).reshape(1, 1)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return QTensor(q, scale, (M, K), (M, K))


def rel_err(approx: torch.Tensor, ref: torch.Tensor) -> float:
    """||approx - ref||_F / ||ref||_F, in fp64."""
    a, r = approx.double(), ref.double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))
