"""Fused Triton kernels for DRAW's selective attention (Gregor et al. 2015, Eqs. 19-29).

The maths (docs/conventions.md; 1-based pixels a = 1..W, b = 1..H, 1-based grid i = 1..N):
    gx = (W + 1) / 2 * (gx~ + 1),  gy = (H + 1) / 2 * (gy~ + 1)                  (22), (23)
    delta = (max(W, H) - 1) / max(N - 1, 1) * exp(log delta~)                      (24)
    mu_i = g + (i - N/2 - 0.5) * delta                                            (19), (20)
    F[i, a] = exp(-(a - mu_i)^2 / (2 sigma^2)) / Z[i],  Z = max(row sum, 1e-8)    (25), (26)
    read  = gamma * [F_Y x F_X^T, F_Y (x - sigmoid(canvas)) F_X^T]                (3), (27)
    glimpse = gamma * F_Y x F_X^T    (27)'s first half: x alone, no canvas (the classifier's read)
    write = canvas + (1 / gamma) F_Y^T w F_X                                       (8), (29)

What is fused: one launch per op and direction. Each program decodes the five raw parameters of its
batch item, builds the filterbank rows in registers (F_X and F_Y never touch global memory), forms
x_hat = x - sigmoid(canvas) on the fly, and streams its image once, in blocks of rows. The glimpse is
the read kernels with the constexpr HAS_CANVAS = False: the canvas and error-image work is compiled out.
write_read (a write, then the read of the new canvas: one DRAW step's write and the next step's read)
is the read kernels with HAS_WRITE = True: the write's work is compiled in, and each canvas block is
written and read in one pass (forward), its two gradients summed in registers (backward).

Minimal bytes per op (B images, C channels, H x W pixels, read grid N, write grid N^, s = bytes per
element; every input read once, every output written once) -- what these kernels move:
    read  forward : s * (2*B*C*H*W  + 2*B*C*N*N  + 5*B)      x, canvas, params in; glimpses out
    read  backward: s * (4*B*C*H*W  + 2*B*C*N*N  + 10*B)     x, canvas, dglimpses, params in;
                                                             dx, dcanvas, dparams out (dx only when
                                                             x requires grad: 3*B*C*H*W without it)
    glimpse fwd   : s * (B*C*H*W    + B*C*N*N    + 5*B)      x, params in; glimpse out
    glimpse bwd   : s * (2*B*C*H*W  + B*C*N*N    + 10*B)     x, dglimpse, params in; dx, dparams out
                                                             (dx only when x requires grad)
    write forward : s * (2*B*C*H*W  + B*C*N^*N^  + 5*B)      canvas, patch, params in; canvas out
    write backward: s * (B*C*H*W    + 2*B*C*N^*N^ + 10*B)    dcanvas_new, patch, params in; dpatch,
                                                             dparams out; dcanvas = dcanvas_new is
                                                             passed through without a copy
    write-read fwd: s * (3*B*C*H*W  + B*C*N^*N^ + 2*B*C*N*N + 10*B)   canvas, x, patch, both params in;
                                                             new canvas, glimpses out
    write-read bwd: s * (4*B*C*H*W  + 2*B*C*N^*N^ + 2*B*C*N*N + 20*B) dnew_canvas, dglimpses, x, new
                                                             canvas, patch, both params in; dcanvas,
                                                             dpatch, both dparams out (dx: 5*B*C*H*W)
With C > 1 the backward kernels also write and re-read per-channel parameter partials [B, C, 5]
(fp32/fp64), reduced over C by one small torch sum: deterministic, no atomics. With one channel they
write the parameter gradient itself, in the parameters' dtype: no sum, no cast, no launch after.

Program layout (every kernel): grid = (B, C); program (b, c) owns batch item b, channel c, all of
its rows. A program holds BLOCK_W columns of a row in registers and loops over the image in blocks of
BLOCK_H rows, with BLOCK_H chosen so that the largest broadcast temporary [BLOCK_H, BLOCK_N, BLOCK_W]
stays within a tile budget (_FORWARD_TILE, _BACKWARD_TILE). Up to _WHOLE_WIDTH columns BLOCK_W is the
whole width (next_power_of_2(W)); wider images are taken in COL_TILES column tiles, each streamed over
all rows (_COLUMN_TILE). Register use is therefore bounded for any H and any W.

Contractions (_mm, _mm_nt, _mm_tn), two ways, one kernel source: "sum" broadcasts and sums in the
compute dtype (any block size; fp64 always); "dot" is tl.dot in exact fp32 (input_precision "ieee":
FMAs, no TF32) on blocks padded to 16, which needs no cross-lane reductions. The launcher picks per
launch (contraction(); DRAW_TRITON_CONTRACTION=auto|sum|dot overrides it): "dot" from N >= 5, where the
sm_90 code runs 1.4-8x fewer warp instructions per pixel (bench/kernel_report.py).
The program layout above is the "sum" one; "dot" takes rows in blocks of at least 16 (_dot_launch_config).
The launchers choose the blocks, the warps (fewer where a batch of small images fills the GPU:
_batch_warps), one pipeline stage (_NUM_STAGES) and whether each row loop loads its next block while it
works on this one (_LOAD_AHEAD); DRAW_TRITON_LAUNCH replaces any of them for measuring (launch_overrides;
bench/tune_attention.py searches them).

Autograd: in eager code the ops are torch.autograd.Functions calling the launchers (the least host time
per call); under torch.compile they are torch.library custom ops, opaque to the compiler.

Precision: compute in fp64 when any input is fp64, else in fp32 (fp16/bf16 are loaded and upcast;
outputs are stored in their tensor's dtype). Inputs may be non-contiguous: every tensor is passed
with its strides, outputs are allocated contiguous.

Backward: the filterbanks are recomputed, not saved. The gradient reaches the raw parameters through
per-row moments of dF * F (see _add_row_moments), which a program accumulates while it streams its rows,
so no [N, W] or [N, H] gradient is ever stored.
"""

import contextlib
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from draw.kernels import _triton_interpreter as _interpreted
from draw.kernels.reference import LOG_SIGMA2_FLOOR, OFFSET_LIMIT, ROW_SUM_FLOOR, compute_dtype

__all__ = [
    "attention_read_backward",
    "attention_read_forward",
    "attention_write_backward",
    "attention_write_forward",
    "attention_write_read_backward",
    "attention_write_read_forward",
    "glimpse",
    "read",
    "write",
    "write_read",
]

_FLOOR = tl.constexpr(ROW_SUM_FLOOR)  # Z = max(row sum, 1e-8), as in kernels/reference.py
_OFFSET_LIMIT = tl.constexpr(OFFSET_LIMIT)  # |a - mu| at most this, as in kernels/reference.py
# log sigma^2 at least this (sigma^2 a normal number, 1 / (2 sigma^2) finite), as in kernels/reference.py
_LOG_SIGMA2_FLOOR_FP32 = tl.constexpr(LOG_SIGMA2_FLOOR[torch.float32])
_LOG_SIGMA2_FLOOR_FP64 = tl.constexpr(LOG_SIGMA2_FLOOR[torch.float64])
# Caps on the [BLOCK_H, BLOCK_N, BLOCK_W] broadcast temporaries, which set BLOCK_H. Chosen from ptxas
# register counts for sm_90 (triton 3.9, fp32): the backward kernels keep more [BLOCK_N, BLOCK_W]
# tiles live, so they take fewer rows per step. Triton's interpreter pays per operation, not per
# element, so under it the row blocks are larger (same code; set _INTERPRETER_TILE = 0 to use the
# GPU tiles there too, as one test does).
_FORWARD_TILE = 2048
_BACKWARD_TILE = 512
_INTERPRETER_TILE = 8192
# The contractions (_mm): "sum" broadcasts and sums (any block size; always for fp64); "dot" is tl.dot
# in exact fp32 on blocks padded to _DOT_MIN, in row blocks of _DOT_FORWARD_TILE elements forward and
# _DOT_MIN rows backward. "auto" (the default; DRAW_TRITON_CONTRACTION overrides it) takes "dot" where
# the compiled code is shorter: from ptxas / cuobjdump for sm_90 (bench/kernel_report.py), "dot" runs
# 1.4-8x fewer warp instructions per pixel from N >= 5 (BLOCK_N >= 8; at 256 columns in column tiles),
# "sum" fewer at N <= 4 (dot pads N to 16).
CONTRACTIONS = ("auto", "sum", "dot")
_DOT_MIN = 16
_DOT_MIN_N = 5
_DOT_FORWARD_TILE = 1024
# Column tiles: images up to _WHOLE_WIDTH[contraction] columns are one tile (BLOCK_W = the width
# padded to a power of two); wider ones are streamed in COL_TILES = ceil(W / BLOCK_W) tiles of
# _COLUMN_TILE[contraction, backward] columns, so that registers stop growing with the width. From
# ptxas / cuobjdump for sm_90 at 256x256, n 16 (bench/kernel_report.py): "dot" over the whole width
# spills 0.2-3 KB per thread inside its row loop, and in tiles of 128 (forward) / 64 (backward) columns
# nothing or 8 B (bf16: 20 B); "sum" over the whole width spills only in write backward (0.98-1.14 KB,
# 0.06 spill instructions per pixel), and tiling it would cost 1.6-1.9x the instructions, so it tiles only
# past 256 columns. A test shrinks both to tile small images.
_WHOLE_WIDTH = {"sum": 256, "dot": 128}
_COLUMN_TILE = {("sum", False): 256, ("sum", True): 256, ("dot", False): 128, ("dot", True): 64}
# The write-then-read backward (read backward with HAS_WRITE) keeps both ops' tiles live: at most this many
# columns at a time (_read_config).
_WRITE_READ_BACKWARD_WIDTH = 64
# Software-pipeline stages of every launch (Triton's default is 3). A program's row loop runs 2-7 times, too
# few for a pipeline to fill, and the stages' prefetched tiles cost registers: for sm_90 (bench/kernel_report.py,
# bench/results/kernel-report-sm90-*stages*.md), one stage takes fewer registers and up to 28 % fewer instructions
# per pixel in the "dot" kernels (triton 3.6, fp32: read forward at 3x54x54, N 12, 128 -> 116 registers; read
# backward 254 -> 194; the 28x28 write-read backward 255 with 20 B of spills -> 207, none; 100x100 read
# backward 248 B of spills -> none); "sum" kernels compile the same. On one H100 (bench/RESULTS.md,
# 2026-11-23, bench/tune_attention.py) 2-4 stages ran as fast or up to 1.23x slower at 28x28 and 1.1-2.1x
# slower at 3x54x54, N 12.
_NUM_STAGES = 1
# Row loops that load one block ahead (LOAD_AHEAD = 1: _block_and_next): each trip issues the next block's
# loads into registers before its own arithmetic, so a program has a load in flight while it computes; with 0
# it waits for each block's loads at the top of each trip. One stage (above) has no other prefetch. On one H100
# (bench/RESULTS.md, 2026-11-24, do_bench) at 16384x3x54x54 and 16384x1x100x100, N 12: read forward ran 1.08x and
# 1.38x as fast with 1, read forward + backward 1.25x and 1.30x, write-read forward + backward 1.06x and 1.15x,
# write forward + backward 1.02x and 1.03x; write forward, whose one load a trip feeds only an add before its
# store, 0.99x and 0.90x. So the read kernels (read, glimpse, write-read) and the write backward load ahead and
# the write forward does not. Loops of one trip (28x28 forward) keep 0 (_with_overrides).
_LOAD_AHEAD = {"read": 1, "write forward": 0, "write backward": 1}
# Warps where the batch fills the GPU. A program owns one (image, channel); on one H100 (bench/RESULTS.md,
# 2026-11-23) with 1,024 28x28 images, one warp per program ran every fused kernel 1.2-2.3x faster than
# the launchers' 4 or 8 (the mnist-paper CUDA-graph step: 52,379 -> 60,435 images/s), and with 100
# images slower (14,363 -> 12,248). So images within _SMALL_IMAGE rows and columns take the fewest warps
# (a power of two, down to 1) that keep _WARPS_PER_SM warps per multiprocessor busy: on 132 SMs 1 warp
# from 1,056 programs, 4 at 256, the launchers' own at 100 (_batch_warps).
_SMALL_IMAGE = 32
_WARPS_PER_SM = 8
# tl.dot reads of images _DOT_FOUR_WARPS_WIDTHS columns wide take 4 warps instead of 8: at 16384x3x54x54,
# N 12 on one H100 (bench/RESULTS.md, 2026-11-23) read forward ran 4.87 -> 2.88 ms, read backward 13.93 ->
# 11.45, write-read forward 6.08 -> 3.97, write-read backward 22.57 -> 16.18; for sm_90 (triton 3.6, one
# stage, bench/results/kernel-report-sm90-triton36-svhn-warps.md) 4 warps issue 9-13 % fewer warp
# instructions per pixel there. Narrower and wider images, and the write kernels, keep theirs (not
# measured; at 28x28 4 warps would spill 32 B in the read backward with dx).
_DOT_FOUR_WARPS_WIDTHS = range(33, 65)


# ---------------------------------------------------------------------------------------------
# Shared @triton.jit helpers: the filterbank maths (Eqs. 19-26) and its chain rule
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_attention_grid(params_ptr, stride_params_b, stride_params_k, pid_b, offs_n, height, width,
                         grid_span, N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Eqs. 19-24 for one batch item: raw (gx~, gy~, log sigma^2, log delta~, log gamma) -> grid.

    Returns mu_x, mu_y (the grid's centres, 1-based pixels), grid = i - N/2 - 0.5 for i = offs_n + 1,
    all [BLOCK_N], and the scalars delta, sigma^2, gamma. grid_span = max(W, H) - 1.
    """
    row = params_ptr + pid_b * stride_params_b
    gx_ = tl.load(row + 0 * stride_params_k).to(COMPUTE_DTYPE)
    gy_ = tl.load(row + 1 * stride_params_k).to(COMPUTE_DTYPE)
    log_sigma2 = tl.load(row + 2 * stride_params_k).to(COMPUTE_DTYPE)
    # sigma^2 a normal number (see LOG_SIGMA2_FLOOR): never 0 * inf = NaN; a NaN stays NaN, as in the reference
    if COMPUTE_DTYPE == tl.float64:
        log_sigma2 = tl.maximum(log_sigma2, _LOG_SIGMA2_FLOOR_FP64, propagate_nan=tl.PropagateNan.ALL)
    else:
        log_sigma2 = tl.maximum(log_sigma2, _LOG_SIGMA2_FLOOR_FP32, propagate_nan=tl.PropagateNan.ALL)
    log_delta_ = tl.load(row + 3 * stride_params_k).to(COMPUTE_DTYPE)
    log_gamma = tl.load(row + 4 * stride_params_k).to(COMPUTE_DTYPE)
    # Integers multiply a COMPUTE_DTYPE value first, so no constant is ever rounded to fp32.
    gx = (gx_ + 1) * (width + 1) * 0.5  # (22)
    gy = (gy_ + 1) * (height + 1) * 0.5  # (23)
    if N > 1:
        delta = tl.exp(log_delta_) * grid_span / (N - 1)  # (24)
    else:
        delta = tl.exp(log_delta_) * grid_span  # (24), N = 1: divisor 1
    grid = (offs_n + 1).to(COMPUTE_DTYPE) - N / 2 - 0.5  # [BLOCK_N]  i - N/2 - 0.5, i = 1..N
    mu_x = gx + grid * delta  # (19)
    mu_y = gy + grid * delta  # (20)
    return mu_x, mu_y, grid, delta, tl.exp(log_sigma2), tl.exp(log_gamma)


@triton.jit
def _gaussian_terms(mu, sigma2, offs_n, offs_pix, size, N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """Unnormalised filterbank rows of Eqs. 25-26 on the pixels offs_pix (0-based) of one axis.

    Returns gauss = exp(-(a - mu_i)^2 / (2 sigma^2)), offset = a - mu_i and exponent =
    (a - mu_i)^2 / (2 sigma^2), all [BLOCK_N, BLOCK_P], with a - mu_i kept within about +-OFFSET_LIMIT as the
    reference clamps it (a centre 1e20 pixels away with sigma^2 past 1e34 gives uniform rows, not 0 or
    inf / inf): mu_i is clamped to +-OFFSET_LIMIT, one clamp per grid row rather than per element (the
    offsets then differ from the reference's by the pixel's coordinate, 1e-15 of them). Where the clamp holds,
    the reference's gradient to mu is 0 and the kernels' F (a - mu) / sigma^2 (see _add_row_moments) is not,
    but F > 0 there needs sigma^2 > 1e36 / 1490, so each such term is below 2e-15. The mask
    zeroes grid rows i > N (BLOCK_N is a power of two) and pixels past the image edge; offset and exponent
    are also zeroed wherever gauss is 0, which changes no gradient (both only ever appear multiplied by F)
    but keeps 0 * inf out of the moments when sigma^2 is tiny or the centre is far away.
    """
    pixel = (offs_pix + 1).to(COMPUTE_DTYPE)  # [BLOCK_P]  a = 1..size
    centre = tl.minimum(tl.maximum(mu, -_OFFSET_LIMIT), _OFFSET_LIMIT)  # [BLOCK_N]
    offset = pixel[None, :] - centre[:, None]  # [BLOCK_N, BLOCK_P]
    exponent = offset * offset / (2 * sigma2)
    valid = (offs_n < N)[:, None] & (offs_pix < size)[None, :]
    gauss = tl.where(valid, tl.exp(-exponent), 0.0)
    live = gauss > 0
    return gauss, tl.where(live, offset, 0.0), tl.where(live, exponent, 0.0)


@triton.jit
def _gaussian_rows(mu, sigma2, offs_n, offs_pix, size, N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The unnormalised rows alone, [BLOCK_N, BLOCK_P] (see _gaussian_terms)."""
    gauss, _offset, _exponent = _gaussian_terms(mu, sigma2, offs_n, offs_pix, size, N, COMPUTE_DTYPE)
    return gauss


@triton.jit
def _row_sums(mu, sigma2, offs_n, size,
              N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """S[i] = sum_a gauss[i, a] over a whole axis, in blocks of BLOCK_P pixels: [BLOCK_N].

    The normaliser is Z = max(S, 1e-8); the gradient reaches S only where S >= 1e-8 (torch.clamp_min).
    """
    total = tl.zeros([BLOCK_N], dtype=COMPUTE_DTYPE)
    for start in range(0, size, BLOCK_P):
        offs_pix = start + tl.arange(0, BLOCK_P)
        total += tl.sum(_gaussian_rows(mu, sigma2, offs_n, offs_pix, size, N, COMPUTE_DTYPE), axis=1)
    return total


@triton.jit
def _column_sums(mu_x, sigma2, offs_n, width, N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                 COL_TILES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """S[i] = sum_a gauss_x[i, a] over the whole width, in COL_TILES tiles of BLOCK_W columns: [BLOCK_N].

    Unrolled (static_range): one tile is straight code whose exps the compiler shares with the caller's
    first filterbank tile, and bench/kernel_report.py counts no loop here (it takes every loop with no
    loop inside for a row loop).
    """
    total = tl.zeros([BLOCK_N], dtype=COMPUTE_DTYPE)
    for tile in tl.static_range(COL_TILES):
        offs_w = tile * BLOCK_W + tl.arange(0, BLOCK_W)
        total += tl.sum(_gaussian_rows(mu_x, sigma2, offs_n, offs_w, width, N, COMPUTE_DTYPE), axis=1)
    return total


@triton.jit
def _column_tile(tile, mu_x, sigma2, z_x, offs_n, width, N: tl.constexpr, BLOCK_W: tl.constexpr,
                 COMPUTE_DTYPE: tl.constexpr):
    """Column tile `tile` of the image: its columns offs_w [BLOCK_W] (0-based), the mask of those inside
    the width, and F_X on them, [BLOCK_N(i), BLOCK_W] (Eq. 25, normalised by z_x over the whole width)."""
    offs_w = tile * BLOCK_W + tl.arange(0, BLOCK_W)
    f_x = _gaussian_rows(mu_x, sigma2, offs_n, offs_w, width, N, COMPUTE_DTYPE) / z_x[:, None]
    return offs_w, offs_w < width, f_x


@triton.jit
def _row_block(row_start, mask_w, mu_y, sigma2, z_y, offs_n, height, N: tl.constexpr, BLOCK_H: tl.constexpr,
               COMPUTE_DTYPE: tl.constexpr):
    """The backward kernels' block of rows from row_start: rows offs_h [BLOCK_H], the mask of the
    [BLOCK_H, BLOCK_W] tile inside the image (rows past H in the last block, columns past W), F_Y on
    the rows [BLOCK_N(j), BLOCK_H] (Eq. 26), and its offsets and exponents (_gaussian_terms)."""
    offs_h = row_start + tl.arange(0, BLOCK_H)
    mask = (offs_h < height)[:, None] & mask_w[None, :]
    gauss_y, offset_y, exponent_y = _gaussian_terms(mu_y, sigma2, offs_n, offs_h, height, N, COMPUTE_DTYPE)
    return offs_h, mask, gauss_y / z_y[:, None], offset_y, exponent_y


@triton.jit
def _image_block(base, stride_h, stride_w, row_start, offs_w, mask_w, height, BLOCK_H: tl.constexpr):
    """The [BLOCK_H, BLOCK_W] block of one image from row row_start, in the columns offs_w, as stored (0
    outside the image: rows past H, columns past W)."""
    offs_h = row_start + tl.arange(0, BLOCK_H)
    mask = (offs_h < height)[:, None] & mask_w[None, :]
    return tl.load(base + offs_h[:, None] * stride_h + offs_w[None, :] * stride_w, mask=mask, other=0.0)


@triton.jit
def _first_block(base, stride_h, stride_w, offs_w, mask_w, height, BLOCK_H: tl.constexpr, LOAD_AHEAD: tl.constexpr):
    """With LOAD_AHEAD (a row loop that loads one block ahead: _block_and_next), the loop's first block, loaded
    before the loop; without, a placeholder the loop carries unread."""
    if LOAD_AHEAD:
        block = _image_block(base, stride_h, stride_w, 0, offs_w, mask_w, height, BLOCK_H)
    else:
        block = 0.0
    return block


@triton.jit
def _block_and_next(ahead, base, stride_h, stride_w, row_start, offs_w, mask_w, height, BLOCK_H: tl.constexpr,
                    LOAD_AHEAD: tl.constexpr):
    """(the block of rows from row_start, what the loop carries to the next block). With LOAD_AHEAD, the block is
    `ahead`, loaded one trip before, and the next block's load is issued now, so that it is in flight while
    this block's arithmetic runs (past the last row its mask is empty and it reads nothing); without, the
    block is loaded now and `ahead` passes through."""
    if LOAD_AHEAD:
        block = ahead
        ahead = _image_block(base, stride_h, stride_w, row_start + BLOCK_H, offs_w, mask_w, height, BLOCK_H)
    else:
        block = _image_block(base, stride_h, stride_w, row_start, offs_w, mask_w, height, BLOCK_H)
    return block, ahead


@triton.jit
def _zero_moments(BLOCK_N: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """The five sums of _add_row_moments before any pixel: zeros, each [BLOCK_N]."""
    zero = tl.zeros([BLOCK_N], dtype=COMPUTE_DTYPE)
    return zero, zero, zero, zero, zero


@triton.jit
def _load_patch(patch_ptr, stride_wb, stride_wc, stride_wj, stride_wi, pid_b, pid_c, offs_n, N: tl.constexpr,
                COMPUTE_DTYPE: tl.constexpr):
    """The write patch w[b, c] as [BLOCK_N(j), BLOCK_N(i)], zero past N."""
    w_mask = (offs_n < N)[:, None] & (offs_n < N)[None, :]  # the padded tile's N x N entries
    w = tl.load(patch_ptr + pid_b * stride_wb + pid_c * stride_wc
                + offs_n[:, None] * stride_wj + offs_n[None, :] * stride_wi, mask=w_mask, other=0.0)
    return w.to(COMPUTE_DTYPE)


@triton.jit
def _write_setup(patch_ptr, params_ptr, stride_wb, stride_wc, stride_wj, stride_wi, stride_pb, stride_pk,
                 pid_b, pid_c, offs_n, height, width, grid_span, N: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, COL_TILES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr):
    """What the read kernels need of a write made in the same launch (HAS_WRITE), before their loops:
    its grid (Eqs. 19-24: mu_x, mu_y, grid, delta), its filterbank row sums S and normalisers
    Z = max(S, 1e-8) on each axis (25, 26), sigma^2, gamma and the patch w [BLOCK_N(j), BLOCK_N(i)]."""
    mu_x, mu_y, grid, delta, sigma2, gamma = _load_attention_grid(
        params_ptr, stride_pb, stride_pk, pid_b, offs_n, height, width, grid_span, N, COMPUTE_DTYPE)
    sum_x = _column_sums(mu_x, sigma2, offs_n, width, N, BLOCK_N, BLOCK_W, COL_TILES, COMPUTE_DTYPE)
    sum_y = _row_sums(mu_y, sigma2, offs_n, height, N, BLOCK_N, BLOCK_H, COMPUTE_DTYPE)
    w = _load_patch(patch_ptr, stride_wb, stride_wc, stride_wj, stride_wi, pid_b, pid_c, offs_n, N, COMPUTE_DTYPE)
    return (mu_x, mu_y, grid, delta, sum_x, tl.maximum(sum_x, _FLOOR), sum_y, tl.maximum(sum_y, _FLOOR), sigma2,
            gamma, w)


@triton.jit
def _add_row_moments(r, dfo, fo, dfe, fe, dfilter, filt, offset, exponent, own):
    """Add one pixel block's per-row sums that carry dL/dF [BLOCK_N, BLOCK_P] back to mu and log sigma^2.

    With F = e / Z, Z = max(S, floor), S = sum_a e, and e = exp(-t), t = (a - mu)^2 / (2 sigma^2):
        dL/de[i, a] = (dF[i, a] - gate_i * r_i) / Z_i,          r_i = sum_a dF[i, a] F[i, a]
        dL/dmu_i    = sum_a (dF - gate r) F (a - mu_i) / sigma^2
        dL/dlog s^2 = sum_i sum_a (dF - gate r) F t
    All five sums are additive over pixel blocks, so a program accumulates them as it streams:
    (r, sum dF F (a-mu), sum F (a-mu), sum dF F t, sum F t), each [BLOCK_N]. The sums of F alone
    (sum F (a-mu), sum F t) are added only where `own` is true: with column tiles a row block's dF_Y
    comes in shares, one per tile, but its F_Y must be counted once.
    """
    weighted = dfilter * filt
    r += tl.sum(weighted, axis=1)
    dfo += tl.sum(weighted * offset, axis=1)
    fo += tl.where(own, tl.sum(filt * offset, axis=1), 0.0)
    dfe += tl.sum(weighted * exponent, axis=1)
    fe += tl.where(own, tl.sum(filt * exponent, axis=1), 0.0)
    return r, dfo, fo, dfe, fe


@triton.jit
def _axis_gradients(r, dfilt_offset, filt_offset, dfilt_exponent, filt_exponent, gate, sigma2, grid):
    """Finish one axis's chain rule (see _add_row_moments): returns dL/dg (the centre gx or gy),
    the axis's share of dL/ddelta (through mu_i = g + grid_i delta) and of dL/dlog sigma^2.
    """
    gated_r = tl.where(gate, r, 0.0)  # gate = S >= floor: no gradient into S where the floor is active
    dmu = (dfilt_offset - gated_r * filt_offset) / sigma2  # [BLOCK_N]  dL/dmu_i (rows i > N are 0)
    dcentre = tl.sum(dmu, axis=0)
    ddelta = tl.sum(dmu * grid, axis=0)
    dlog_sigma2 = tl.sum(dfilt_exponent - gated_r * filt_exponent, axis=0)
    return dcentre, ddelta, dlog_sigma2


@triton.jit
def _store_param_grads(dparams_ptr, dgx, dgy, dlog_sigma2, ddelta, dlog_gamma, delta, height, width):
    """Chain (gx, gy, sigma^2, delta, gamma) -> raw params (Eqs. 22-24) and store the 5 values, rounded
    to dparams_ptr's type (the compute dtype for per-channel partials; params' own for one channel)."""
    tl.store(dparams_ptr + 0, _cast_for_store(dgx * (width + 1) * 0.5, dparams_ptr))  # d gx / d gx~ = (W + 1) / 2
    tl.store(dparams_ptr + 1, _cast_for_store(dgy * (height + 1) * 0.5, dparams_ptr))  # d gy / d gy~ = (H + 1) / 2
    tl.store(dparams_ptr + 2, _cast_for_store(dlog_sigma2, dparams_ptr))
    tl.store(dparams_ptr + 3, _cast_for_store(ddelta * delta, dparams_ptr))  # d delta / d log delta~ = delta
    tl.store(dparams_ptr + 4, _cast_for_store(dlog_gamma, dparams_ptr))  # already w.r.t. log gamma


@triton.jit
def _store_write_grads(grad_params_ptr, grad_patch_ptr, r_x, dfo_x, fo_x, dfe_x, fe_x,
                       r_y, dfo_y, fo_y, dfe_y, fe_y, sum_x, sum_y, sigma2, grid, delta, d_w, inv_gamma, offs_n,
                       height, width, N: tl.constexpr):
    """Finish a write's backward from its moments on each axis (_add_row_moments) and d_w = (F_Y G) F_X^T:
    store the parameter gradient (dlog gamma = -sum w * dpatch = -sum_i r_X[i]) and
    dpatch = (1 / gamma) (F_Y G) F_X^T of one program (b, c): 5 values at grad_params_ptr, and [N, N]
    (row-major) at grad_patch_ptr."""
    dgx, ddelta_x, dls_x = _axis_gradients(r_x, dfo_x, fo_x, dfe_x, fe_x, sum_x >= _FLOOR, sigma2, grid)
    dgy, ddelta_y, dls_y = _axis_gradients(r_y, dfo_y, fo_y, dfe_y, fe_y, sum_y >= _FLOOR, sigma2, grid)
    _store_param_grads(grad_params_ptr, dgx, dgy, dls_x + dls_y, ddelta_x + ddelta_y,
                       -tl.sum(r_x, axis=0), delta, height, width)
    w_mask = (offs_n < N)[:, None] & (offs_n < N)[None, :]
    tl.store(grad_patch_ptr + offs_n[:, None] * N + offs_n[None, :],
             _cast_for_store(inv_gamma * d_w, grad_patch_ptr), mask=w_mask)


# Triton's interpreter casts fp32 to bf16 by truncating the low 16 bits, where a GPU rounds to nearest even:
# under it _cast_for_store rounds by hand first, so that bf16 results on a CPU are the GPU's.
_ROUND_BF16_BY_HAND = tl.constexpr(_interpreted())


@triton.jit
def _cast_for_store(value, ptr):
    """Round value to ptr's element type, to nearest even; 16-bit types go through fp32 (fp64 -> bf16 is not
    a direct cast on every target, and Triton's interpreter gets it wrong)."""
    if ptr.dtype.element_ty.primitive_bitwidth == 16:
        value = value.to(tl.float32)
        if _ROUND_BF16_BY_HAND and ptr.dtype.element_ty == tl.bfloat16:
            bits = value.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to the nearest bf16, ties to even
            value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
    return value.to(ptr.dtype.element_ty)


@triton.jit
def _mm(a, b, CONTRACT: tl.constexpr):
    """a @ b for a [M, K], b [K, N] -> [M, N]. CONTRACT "sum" broadcasts and sums in the compute dtype;
    "dot" is tl.dot in exact fp32 (input_precision "ieee": FMAs, no TF32; every dimension >= 16).

    "sum" multiplies b's broadcast by a's, in that order: triton 3.6 rewrites the product the other way
    round, sum(a[:, :, None] * b[None, :, :], 1) with M, N >= 16, into a TF32 tl.dot (its
    CombineBroadcastMulReducePattern; triton-lang/triton#9831 makes its dot exact fp32 upstream), which
    lost precision (~1e-3) and, at K = 2, gave 4x the result on an H100 (bench/RESULTS.md).
    tests/test_triton_attention.py checks that no "sum" kernel keeps a tt.dot.
    """
    if CONTRACT == "sum":
        return tl.sum(b[None, :, :] * a[:, :, None], axis=1)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _mm_nt(a, b, CONTRACT: tl.constexpr):
    """a @ b^T for a [M, K], b [N, K] -> [M, N] (see _mm)."""
    if CONTRACT == "sum":
        return tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    else:
        return tl.dot(a, tl.trans(b), input_precision="ieee")


@triton.jit
def _mm_tn(a, b, CONTRACT: tl.constexpr):
    """a^T @ b for a [K, M], b [K, N] -> [M, N] (see _mm)."""
    if CONTRACT == "sum":
        return tl.sum(a[:, :, None] * b[:, None, :], axis=0)
    else:
        return tl.dot(tl.trans(a), b, input_precision="ieee")


# ---------------------------------------------------------------------------------------------
# Read, Eqs. 3 and 27: forward and backward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attention_read_forward_kernel(
    x_ptr, canvas_ptr, params_ptr, out_ptr, patch_ptr, write_params_ptr, new_canvas_ptr,
    height, width, grid_span,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_cb, stride_cc, stride_ch, stride_cw,
    stride_pb, stride_pk,
    stride_ob, stride_ok, stride_oc, stride_oj, stride_oi,
    stride_wb, stride_wc, stride_wj, stride_wi,
    stride_qb, stride_qk,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    COL_TILES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, HAS_CANVAS: tl.constexpr, CONTRACT: tl.constexpr,
    HAS_WRITE: tl.constexpr, NW: tl.constexpr, BLOCK_NW: tl.constexpr, CONTRACT_W: tl.constexpr,
    LOAD_AHEAD: tl.constexpr,
):
    # Program (b, c) owns out[b, :, c] = gamma * F_Y [x, x_hat] F_X^T, both [N, N] glimpses.
    # HAS_CANVAS = False is the glimpse of x alone: canvas_ptr is never read, out is [B, C, N, N]
    # (stride_ok unused) and only out[b, c] = gamma * F_Y x F_X^T is written.
    # HAS_WRITE = True (with a canvas) writes first: the canvas read is c_t = canvas + (1 / gamma_w)
    # F_Y,w^T w F_X,w (Eq. 29, patch w [B, C, NW, NW], write_params [B, 5]), stored into new_canvas
    # (contiguous [B, C, H, W]) as each block is formed, and rounded to its dtype before it is read.
    pid_b = tl.program_id(0).to(tl.int64)  # int64: b * stride can pass 2^31 for big batches
    pid_c = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)  # grid rows i (or j); rows >= N are masked inside the helpers
    mu_x, mu_y, _grid, _delta, sigma2, gamma = _load_attention_grid(
        params_ptr, stride_pb, stride_pk, pid_b, offs_n, height, width, grid_span, N, COMPUTE_DTYPE)
    z_x = tl.maximum(_column_sums(mu_x, sigma2, offs_n, width, N, BLOCK_N, BLOCK_W, COL_TILES, COMPUTE_DTYPE),
                     _FLOOR)
    z_y = tl.maximum(_row_sums(mu_y, sigma2, offs_n, height, N, BLOCK_N, BLOCK_H, COMPUTE_DTYPE), _FLOOR)

    if HAS_WRITE:
        offs_nw = tl.arange(0, BLOCK_NW)
        mu_xw, mu_yw, _grid_w, _delta_w, _sum_xw, z_xw, _sum_yw, z_yw, sigma2_w, gamma_w, w = _write_setup(
            patch_ptr, write_params_ptr, stride_wb, stride_wc, stride_wj, stride_wi, stride_qb, stride_qk,
            pid_b, pid_c, offs_nw, height, width, grid_span, NW, BLOCK_NW, BLOCK_H, BLOCK_W, COL_TILES, COMPUTE_DTYPE)
        new_base = new_canvas_ptr + (pid_b * tl.num_programs(1) + pid_c) * height * width

    x_base = x_ptr + pid_b * stride_xb + pid_c * stride_xc
    c_base = canvas_ptr + pid_b * stride_cb + pid_c * stride_cc
    glimpse_x = tl.zeros([BLOCK_N, BLOCK_N], dtype=COMPUTE_DTYPE)  # [j, i]
    glimpse_err = tl.zeros([BLOCK_N, BLOCK_N], dtype=COMPUTE_DTYPE)
    for tile in range(0, COL_TILES):  # the glimpse sums over column tiles and row blocks
        offs_w, mask_w, f_x = _column_tile(tile, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)
        if HAS_WRITE:
            _offs_w, _mask_w, f_xw = _column_tile(tile, mu_xw, sigma2_w, z_xw, offs_nw, width, NW, BLOCK_W,
                                                  COMPUTE_DTYPE)
            w_fx = _mm(w, f_xw, CONTRACT_W)  # w F_X,w: [BLOCK_NW(j), BLOCK_W]
        x_ahead = _first_block(x_base, stride_xh, stride_xw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD)
        c_ahead = _first_block(c_base, stride_ch, stride_cw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD and HAS_CANVAS)
        for row_start in range(0, height, BLOCK_H):  # f_x: [BLOCK_N(i), BLOCK_W]
            offs_h = row_start + tl.arange(0, BLOCK_H)
            mask = (offs_h < height)[:, None] & mask_w[None, :]  # rows past H (last block), cols past W
            gauss_y = _gaussian_rows(mu_y, sigma2, offs_n, offs_h, height, N, COMPUTE_DTYPE)
            f_y = gauss_y / z_y[:, None]  # [BLOCK_N(j), BLOCK_H]  (26)
            x, x_ahead = _block_and_next(x_ahead, x_base, stride_xh, stride_xw, row_start, offs_w, mask_w, height,
                                         BLOCK_H, LOAD_AHEAD)
            x = x.to(COMPUTE_DTYPE)  # [BLOCK_H, BLOCK_W]
            # (with a canvas, the statements run in the order the compiler was tuned on: loads first)
            if HAS_CANVAS:
                logits, c_ahead = _block_and_next(c_ahead, c_base, stride_ch, stride_cw, row_start, offs_w, mask_w,
                                                  height, BLOCK_H, LOAD_AHEAD)
                logits = logits.to(COMPUTE_DTYPE)
                if HAS_WRITE:  # c_t = c_{t-1} + (1 / gamma_w) F_Y,w^T w F_X,w  (29), (8)
                    f_yw = _gaussian_rows(mu_yw, sigma2_w, offs_nw, offs_h, height, NW, COMPUTE_DTYPE) / z_yw[:, None]
                    new_logits = _cast_for_store(logits + _mm_tn(f_yw, w_fx, CONTRACT_W) / gamma_w, new_canvas_ptr)
                    tl.store(new_base + offs_h[:, None] * width + offs_w[None, :], new_logits, mask=mask)
                    logits = new_logits.to(COMPUTE_DTYPE)  # the stored value, as a separate read would see it
                x_hat = tl.where(mask, x - 1 / (1 + tl.exp(-logits)), 0.0)  # (3) error image
            # rows of x F_X^T: [BLOCK_H, BLOCK_N(i)], then F_Y (x F_X^T): [BLOCK_N(j), BLOCK_N(i)]
            x_fx = _mm_nt(x, f_x, CONTRACT)
            if HAS_CANVAS:
                err_fx = _mm_nt(x_hat, f_x, CONTRACT)
            glimpse_x += _mm(f_y, x_fx, CONTRACT)
            if HAS_CANVAS:
                glimpse_err += _mm(f_y, err_fx, CONTRACT)

    offs_j = offs_n[:, None]
    offs_i = offs_n[None, :]
    out_mask = (offs_j < N) & (offs_i < N)  # the [BLOCK_N, BLOCK_N] tile is padded to a power of 2
    out_base = out_ptr + pid_b * stride_ob + pid_c * stride_oc + offs_j * stride_oj + offs_i * stride_oi
    tl.store(out_base, _cast_for_store(gamma * glimpse_x, out_ptr), mask=out_mask)  # (27)
    if HAS_CANVAS:
        tl.store(out_base + stride_ok, _cast_for_store(gamma * glimpse_err, out_ptr), mask=out_mask)


@triton.jit
def _attention_read_backward_kernel(
    x_ptr, canvas_ptr, params_ptr, grad_out_ptr, grad_x_ptr, grad_canvas_ptr, grad_params_ptr,
    patch_ptr, write_params_ptr, grad_new_canvas_ptr, grad_patch_ptr, grad_write_params_ptr,
    height, width, grid_span,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_cb, stride_cc, stride_ch, stride_cw,
    stride_pb, stride_pk,
    stride_gb, stride_gk, stride_gc, stride_gj, stride_gi,
    stride_wb, stride_wc, stride_wj, stride_wi,
    stride_qb, stride_qk,
    stride_nb, stride_nc, stride_nh, stride_nw,
    stride_db, stride_eb, stride_ob,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    COL_TILES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, HAS_CANVAS: tl.constexpr, STORE_GRAD_X: tl.constexpr,
    STORE_GRAD_CANVAS: tl.constexpr, CONTRACT: tl.constexpr,
    HAS_WRITE: tl.constexpr, NW: tl.constexpr, BLOCK_NW: tl.constexpr, CONTRACT_W: tl.constexpr,
    LOAD_AHEAD: tl.constexpr,
):
    # Program (b, c) owns dx[b, c], dcanvas[b, c] (contiguous [B, C, H, W]) and the partial
    # parameter gradient of channel c, grad_params[b, c, :] ([B, C, 5], rows strided by stride_db).
    # HAS_CANVAS = False is the glimpse of x alone: only img_0 = x, G is [B, C, N, N] (stride_gk
    # unused), canvas_ptr is never read and there is no dcanvas (STORE_GRAD_CANVAS must be False).
    #   d img_k = gamma F_Y^T G_k F_X                      (img_0 = x, img_1 = x_hat; G = dL/dread)
    #   dx = d img_0 + d img_1,  dcanvas = -d img_1 * sigmoid' (canvas)
    #   dF_Y[j, h] = gamma sum_k sum_i G_k[j, i] (img_k F_X^T)[h, i]   complete per row block
    #   dF_X[i, w] = gamma sum_k sum_j G_k[j, i] (F_Y img_k)[j, w]     accumulated over row blocks
    # With COL_TILES > 1 the columns are taken in tiles, each streamed over all rows: dF_Y of a row
    # block is then a sum over tiles, and the moments linear in dF_Y (r, sum dF F (a-mu), sum dF F t)
    # add up over tiles too; F_Y's own moments (sum F (a-mu), sum F t) are taken from the first tile only.
    #   dlog gamma = sum G * read = sum_{i,w} dF_X F_X = sum_i r_X[i]  (read is linear in F_X)
    # HAS_WRITE = True is the backward of a write followed by this read (the forward's HAS_WRITE):
    # canvas_ptr is then the written canvas c_t, grad_new_canvas its gradient from outside the op, and
    # the program also owns dpatch[b, c] ([B, C, NW, NW], rows strided by stride_ob) and the write
    # parameters' partial gradient grad_write_params[b, c, :] (rows strided by stride_eb). With D = dL/dc_t = grad_new_canvas - d img_1 * sigmoid'(c_t):
    #   dcanvas = D (stored, when STORE_GRAD_CANVAS), and the write's backward on D (see
    #   _attention_write_backward_kernel), accumulated in the same row loop.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)  # grid rows i (or j); rows >= N are masked inside the helpers
    mu_x, mu_y, grid, delta, sigma2, gamma = _load_attention_grid(
        params_ptr, stride_pb, stride_pk, pid_b, offs_n, height, width, grid_span, N, COMPUTE_DTYPE)
    sum_x = _column_sums(mu_x, sigma2, offs_n, width, N, BLOCK_N, BLOCK_W, COL_TILES, COMPUTE_DTYPE)
    z_x = tl.maximum(sum_x, _FLOOR)
    # the first tile's F_X here, each next one at the end of a tile (as in write forward: fewer registers)
    offs_w, mask_w, f_x = _column_tile(0, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)
    sum_y = _row_sums(mu_y, sigma2, offs_n, height, N, BLOCK_N, BLOCK_H, COMPUTE_DTYPE)
    z_y = tl.maximum(sum_y, _FLOOR)
    if HAS_WRITE:  # the write's grid, patch and moments (as in _attention_write_backward_kernel)
        offs_nw = tl.arange(0, BLOCK_NW)
        mu_xw, mu_yw, grid_w, delta_w, sum_xw, z_xw, sum_yw, z_yw, sigma2_w, gamma_w, w = _write_setup(
            patch_ptr, write_params_ptr, stride_wb, stride_wc, stride_wj, stride_wi, stride_qb, stride_qk,
            pid_b, pid_c, offs_nw, height, width, grid_span, NW, BLOCK_NW, BLOCK_H, BLOCK_W, COL_TILES, COMPUTE_DTYPE)
        inv_gamma_w = 1 / gamma_w
        _offs_w, _mask_w, f_xw = _column_tile(0, mu_xw, sigma2_w, z_xw, offs_nw, width, NW, BLOCK_W, COMPUTE_DTYPE)
        r_yw, dfo_yw, fo_yw, dfe_yw, fe_yw = _zero_moments(BLOCK_NW, COMPUTE_DTYPE)
        r_xw, dfo_xw, fo_xw, dfe_xw, fe_xw = _zero_moments(BLOCK_NW, COMPUTE_DTYPE)
        d_w = tl.zeros([BLOCK_NW, BLOCK_NW], dtype=COMPUTE_DTYPE)  # (F_Y,w D) F_X,w^T, summed over tiles

    g_mask = (offs_n < N)[:, None] & (offs_n < N)[None, :]  # padded [BLOCK_N, BLOCK_N] tile
    g_base = (grad_out_ptr + pid_b * stride_gb + pid_c * stride_gc
              + offs_n[:, None] * stride_gj + offs_n[None, :] * stride_gi)
    g_x = tl.load(g_base, mask=g_mask, other=0.0).to(COMPUTE_DTYPE)  # [BLOCK_N(j), BLOCK_N(i)]
    if HAS_CANVAS:
        g_err = tl.load(g_base + stride_gk, mask=g_mask, other=0.0).to(COMPUTE_DTYPE)

    x_base = x_ptr + pid_b * stride_xb + pid_c * stride_xc
    c_base = canvas_ptr + pid_b * stride_cb + pid_c * stride_cc
    n_base = grad_new_canvas_ptr + pid_b * stride_nb + pid_c * stride_nc  # read with HAS_WRITE only
    grad_base = (pid_b * tl.num_programs(1) + pid_c) * height * width  # contiguous [B, C, H, W]
    r_y, dfo_y, fo_y, dfe_y, fe_y = _zero_moments(BLOCK_N, COMPUTE_DTYPE)  # _add_row_moments, per axis
    r_x, dfo_x, fo_x, dfe_x, fe_x = _zero_moments(BLOCK_N, COMPUTE_DTYPE)
    for tile in range(0, COL_TILES):
        fy_x = tl.zeros([BLOCK_N, BLOCK_W], dtype=COMPUTE_DTYPE)  # F_Y x      [j, w]
        fy_err = tl.zeros([BLOCK_N, BLOCK_W], dtype=COMPUTE_DTYPE)  # F_Y x_hat  [j, w]
        if HAS_WRITE:
            fy_d = tl.zeros([BLOCK_NW, BLOCK_W], dtype=COMPUTE_DTYPE)  # F_Y,w D  [j, w]
        x_ahead = _first_block(x_base, stride_xh, stride_xw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD)
        c_ahead = _first_block(c_base, stride_ch, stride_cw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD and HAS_CANVAS)
        n_ahead = _first_block(n_base, stride_nh, stride_nw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD and HAS_WRITE)
        for row_start in range(0, height, BLOCK_H):
            offs_h, mask, f_y, offset_y, exponent_y = _row_block(row_start, mask_w, mu_y, sigma2, z_y, offs_n, height,
                                                                 N, BLOCK_H, COMPUTE_DTYPE)
            x, x_ahead = _block_and_next(x_ahead, x_base, stride_xh, stride_xw, row_start, offs_w, mask_w, height,
                                         BLOCK_H, LOAD_AHEAD)
            x = x.to(COMPUTE_DTYPE)  # [BLOCK_H, BLOCK_W]
            # d img_k = gamma (F_Y^T G_k) F_X: [BLOCK_H, BLOCK_N(i)], then [BLOCK_H, BLOCK_W]
            if HAS_CANVAS:
                logits, c_ahead = _block_and_next(c_ahead, c_base, stride_ch, stride_cw, row_start, offs_w, mask_w,
                                                  height, BLOCK_H, LOAD_AHEAD)
                logits = logits.to(COMPUTE_DTYPE)
                sig = 1 / (1 + tl.exp(-logits))
                x_hat = tl.where(mask, x - sig, 0.0)
                d_err = gamma * _mm(_mm_tn(f_y, g_err, CONTRACT), f_x, CONTRACT)
            grad_offs = grad_base + offs_h[:, None] * width + offs_w[None, :]
            if STORE_GRAD_X:
                d_x = gamma * _mm(_mm_tn(f_y, g_x, CONTRACT), f_x, CONTRACT)
                if HAS_CANVAS:
                    d_x += d_err  # dx = d img_0 + d img_1
                tl.store(grad_x_ptr + grad_offs, _cast_for_store(d_x, grad_x_ptr), mask=mask)
            if STORE_GRAD_CANVAS or HAS_WRITE:  # (only with HAS_CANVAS)
                d_logits = -d_err * sig * (1 - sig)  # d x_hat / d canvas = -sigmoid'(canvas)
                if HAS_WRITE:  # D = dL/dc_t, and the write's backward on it
                    d_new, n_ahead = _block_and_next(n_ahead, n_base, stride_nh, stride_nw, row_start, offs_w, mask_w,
                                                     height, BLOCK_H, LOAD_AHEAD)
                    d_logits += d_new.to(COMPUTE_DTYPE)
                    _offs_h, _mask, f_yw, offset_yw, exponent_yw = _row_block(
                        row_start, mask_w, mu_yw, sigma2_w, z_yw, offs_nw, height, NW, BLOCK_H, COMPUTE_DTYPE)
                    d_fxw = _mm_nt(d_logits, f_xw, CONTRACT_W)  # D F_X,w^T: [BLOCK_H, BLOCK_NW(i)]
                    df_yw = inv_gamma_w * _mm_nt(w, d_fxw, CONTRACT_W)  # [BLOCK_NW(j), BLOCK_H]
                    r_yw, dfo_yw, fo_yw, dfe_yw, fe_yw = _add_row_moments(
                        r_yw, dfo_yw, fo_yw, dfe_yw, fe_yw, df_yw, f_yw, offset_yw, exponent_yw, tile == 0)
                    fy_d += _mm(f_yw, d_logits, CONTRACT_W)
                if STORE_GRAD_CANVAS:
                    tl.store(grad_canvas_ptr + grad_offs, _cast_for_store(d_logits, grad_canvas_ptr), mask=mask)

            # dF_Y for these rows (this tile's share): [BLOCK_N(j), BLOCK_H]
            x_fx = _mm_nt(x, f_x, CONTRACT)  # [BLOCK_H, BLOCK_N(i)]
            if HAS_CANVAS:
                err_fx = _mm_nt(x_hat, f_x, CONTRACT)
            dfy_sum = _mm_nt(g_x, x_fx, CONTRACT)
            if HAS_CANVAS:
                dfy_sum += _mm_nt(g_err, err_fx, CONTRACT)
            df_y = gamma * dfy_sum
            r_y, dfo_y, fo_y, dfe_y, fe_y = _add_row_moments(r_y, dfo_y, fo_y, dfe_y, fe_y, df_y, f_y, offset_y,
                                                             exponent_y, tile == 0)  # F_Y's own sums: once

            # F_Y img_k, needed whole for dF_X: [BLOCK_N(j), BLOCK_W]
            fy_x += _mm(f_y, x, CONTRACT)
            if HAS_CANVAS:
                fy_err += _mm(f_y, x_hat, CONTRACT)

        dfx_sum = _mm_tn(g_x, fy_x, CONTRACT)  # [BLOCK_N(i), BLOCK_W]: this tile's columns, complete
        if HAS_CANVAS:
            dfx_sum += _mm_tn(g_err, fy_err, CONTRACT)
        df_x = gamma * dfx_sum
        # offsets and exponents recomputed rather than kept live through the row loop
        _gauss_x, offset_x, exponent_x = _gaussian_terms(mu_x, sigma2, offs_n, offs_w, width, N, COMPUTE_DTYPE)
        r_x, dfo_x, fo_x, dfe_x, fe_x = _add_row_moments(r_x, dfo_x, fo_x, dfe_x, fe_x, df_x, f_x, offset_x,
                                                         exponent_x, True)  # the tile's columns: all its own
        if HAS_WRITE:
            df_xw = inv_gamma_w * _mm_tn(w, fy_d, CONTRACT_W)  # [BLOCK_NW(i), BLOCK_W]
            _gauss_xw, offset_xw, exponent_xw = _gaussian_terms(mu_xw, sigma2_w, offs_nw, offs_w, width, NW,
                                                                COMPUTE_DTYPE)
            r_xw, dfo_xw, fo_xw, dfe_xw, fe_xw = _add_row_moments(r_xw, dfo_xw, fo_xw, dfe_xw, fe_xw, df_xw, f_xw,
                                                                  offset_xw, exponent_xw, True)
            d_w += _mm_nt(fy_d, f_xw, CONTRACT_W)
            _offs_w, _mask_w, f_xw = _column_tile(tile + 1, mu_xw, sigma2_w, z_xw, offs_nw, width, NW, BLOCK_W,
                                                  COMPUTE_DTYPE)
        offs_w, mask_w, f_x = _column_tile(tile + 1, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)

    dgx, ddelta_x, dls_x = _axis_gradients(r_x, dfo_x, fo_x, dfe_x, fe_x, sum_x >= _FLOOR, sigma2, grid)
    dgy, ddelta_y, dls_y = _axis_gradients(r_y, dfo_y, fo_y, dfe_y, fe_y, sum_y >= _FLOOR, sigma2, grid)
    dlog_gamma = tl.sum(r_x, axis=0)
    _store_param_grads(grad_params_ptr + pid_b * stride_db + pid_c * 5, dgx, dgy, dls_x + dls_y, ddelta_x + ddelta_y,
                       dlog_gamma, delta, height, width)
    if HAS_WRITE:
        _store_write_grads(grad_write_params_ptr + pid_b * stride_eb + pid_c * 5,
                           grad_patch_ptr + pid_b * stride_ob + pid_c * NW * NW, r_xw, dfo_xw, fo_xw, dfe_xw, fe_xw,
                           r_yw, dfo_yw, fo_yw, dfe_yw, fe_yw, sum_xw, sum_yw, sigma2_w, grid_w, delta_w, d_w,
                           inv_gamma_w, offs_nw, height, width, NW)


# ---------------------------------------------------------------------------------------------
# Write, Eqs. 8 and 29: forward and backward kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _attention_write_forward_kernel(
    patch_ptr, params_ptr, canvas_ptr, out_ptr,
    height, width, grid_span,
    stride_wb, stride_wc, stride_wj, stride_wi,
    stride_pb, stride_pk,
    stride_cb, stride_cc, stride_ch, stride_cw,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    COL_TILES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, CONTRACT: tl.constexpr, LOAD_AHEAD: tl.constexpr,
):
    # Program (b, c) owns out[b, c] = canvas[b, c] + (1 / gamma) F_Y^T w[b, c] F_X, [H, W],
    # written in tiles of BLOCK_H rows by BLOCK_W columns (out is contiguous [B, C, H, W]).
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)  # grid rows i (or j); rows >= N are masked inside the helpers
    mu_x, mu_y, _grid, _delta, sigma2, gamma = _load_attention_grid(
        params_ptr, stride_pb, stride_pk, pid_b, offs_n, height, width, grid_span, N, COMPUTE_DTYPE)

    z_x = tl.maximum(_column_sums(mu_x, sigma2, offs_n, width, N, BLOCK_N, BLOCK_W, COL_TILES, COMPUTE_DTYPE),
                     _FLOOR)
    # The first tile's F_X right after z_x, before the row sums of F_Y, and each next one at the end of a
    # tile: in this order ptxas keeps write forward at 56-66 registers (sm_90, 100x100), not 95-101, and
    # write backward in bf16 at 64, not 101. (Read forward does better in the plain order.)
    offs_w, mask_w, f_x = _column_tile(0, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)
    z_y = tl.maximum(_row_sums(mu_y, sigma2, offs_n, height, N, BLOCK_N, BLOCK_H, COMPUTE_DTYPE), _FLOOR)

    w = _load_patch(patch_ptr, stride_wb, stride_wc, stride_wj, stride_wi, pid_b, pid_c, offs_n, N,
                    COMPUTE_DTYPE)  # [BLOCK_N(j), BLOCK_N(i)]

    c_base = canvas_ptr + pid_b * stride_cb + pid_c * stride_cc
    out_base = out_ptr + (pid_b * tl.num_programs(1) + pid_c) * height * width
    for tile in range(0, COL_TILES):
        w_fx = _mm(w, f_x, CONTRACT)  # w F_X: [BLOCK_N(j), BLOCK_W]
        c_ahead = _first_block(c_base, stride_ch, stride_cw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD)
        for row_start in range(0, height, BLOCK_H):
            offs_h = row_start + tl.arange(0, BLOCK_H)
            mask = (offs_h < height)[:, None] & mask_w[None, :]  # rows past H (last block), cols past W
            gauss_y = _gaussian_rows(mu_y, sigma2, offs_n, offs_h, height, N, COMPUTE_DTYPE)
            f_y = gauss_y / z_y[:, None]  # [BLOCK_N(j), BLOCK_H]  (26)
            written = _mm_tn(f_y, w_fx, CONTRACT)  # F_Y^T w F_X: [BLOCK_H, BLOCK_W]
            logits, c_ahead = _block_and_next(c_ahead, c_base, stride_ch, stride_cw, row_start, offs_w, mask_w, height,
                                              BLOCK_H, LOAD_AHEAD)
            logits = logits.to(COMPUTE_DTYPE)
            new_logits = logits + written / gamma  # (29), (8)
            tl.store(out_base + offs_h[:, None] * width + offs_w[None, :],
                     _cast_for_store(new_logits, out_ptr), mask=mask)
        offs_w, mask_w, f_x = _column_tile(tile + 1, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)


@triton.jit
def _attention_write_backward_kernel(
    patch_ptr, params_ptr, grad_out_ptr, grad_patch_ptr, grad_params_ptr,
    height, width, grid_span,
    stride_wb, stride_wc, stride_wj, stride_wi,
    stride_pb, stride_pk,
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_ob, stride_db,
    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    COL_TILES: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, CONTRACT: tl.constexpr, LOAD_AHEAD: tl.constexpr,
):
    # Program (b, c) owns dpatch[b, c] ([B, C, N, N], rows strided by stride_ob) and the partial
    # parameter gradient of channel c, grad_params[b, c, :] ([B, C, 5], rows strided by stride_db). With G = dL/dnew_canvas:
    #   dpatch     = (1 / gamma) F_Y G F_X^T
    #   dF_Y[j, h] = (1 / gamma) sum_i w[j, i] (G F_X^T)[h, i]     complete per row block
    #   dF_X[i, w] = (1 / gamma) sum_j w[j, i] (F_Y G)[j, w]       accumulated over row blocks
    #   dlog gamma = -sum w * dpatch = -sum_{i,w} dF_X F_X = -sum_i r_X[i]
    # (dcanvas = G needs no kernel.) Column tiles (COL_TILES > 1) as in the read backward kernel; dpatch
    # is then a sum over tiles too.
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)  # grid rows i (or j); rows >= N are masked inside the helpers
    mu_x, mu_y, grid, delta, sigma2, gamma = _load_attention_grid(
        params_ptr, stride_pb, stride_pk, pid_b, offs_n, height, width, grid_span, N, COMPUTE_DTYPE)
    inv_gamma = 1 / gamma

    sum_x = _column_sums(mu_x, sigma2, offs_n, width, N, BLOCK_N, BLOCK_W, COL_TILES, COMPUTE_DTYPE)
    z_x = tl.maximum(sum_x, _FLOOR)
    # the first tile's F_X here, each next one at the end of a tile (as in write forward: fewer registers)
    offs_w, mask_w, f_x = _column_tile(0, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)
    sum_y = _row_sums(mu_y, sigma2, offs_n, height, N, BLOCK_N, BLOCK_H, COMPUTE_DTYPE)
    z_y = tl.maximum(sum_y, _FLOOR)

    w = _load_patch(patch_ptr, stride_wb, stride_wc, stride_wj, stride_wi, pid_b, pid_c, offs_n, N,
                    COMPUTE_DTYPE)  # [BLOCK_N(j), BLOCK_N(i)]

    g_base = grad_out_ptr + pid_b * stride_gb + pid_c * stride_gc
    r_y, dfo_y, fo_y, dfe_y, fe_y = _zero_moments(BLOCK_N, COMPUTE_DTYPE)  # _add_row_moments, per axis
    r_x, dfo_x, fo_x, dfe_x, fe_x = _zero_moments(BLOCK_N, COMPUTE_DTYPE)
    d_w = tl.zeros([BLOCK_N, BLOCK_N], dtype=COMPUTE_DTYPE)  # (F_Y G) F_X^T, summed over tiles
    for tile in range(0, COL_TILES):
        fy_g = tl.zeros([BLOCK_N, BLOCK_W], dtype=COMPUTE_DTYPE)  # F_Y G  [j, w]
        g_ahead = _first_block(g_base, stride_gh, stride_gw, offs_w, mask_w, height, BLOCK_H, LOAD_AHEAD)
        for row_start in range(0, height, BLOCK_H):
            offs_h, mask, f_y, offset_y, exponent_y = _row_block(row_start, mask_w, mu_y, sigma2, z_y, offs_n, height,
                                                                 N, BLOCK_H, COMPUTE_DTYPE)
            g, g_ahead = _block_and_next(g_ahead, g_base, stride_gh, stride_gw, row_start, offs_w, mask_w, height,
                                         BLOCK_H, LOAD_AHEAD)
            g = g.to(COMPUTE_DTYPE)  # [BLOCK_H, BLOCK_W]
            g_fx = _mm_nt(g, f_x, CONTRACT)  # G F_X^T: [BLOCK_H, BLOCK_N(i)]
            df_y = inv_gamma * _mm_nt(w, g_fx, CONTRACT)  # [BLOCK_N(j), BLOCK_H], this tile's share
            r_y, dfo_y, fo_y, dfe_y, fe_y = _add_row_moments(r_y, dfo_y, fo_y, dfe_y, fe_y, df_y, f_y, offset_y,
                                                             exponent_y, tile == 0)  # F_Y's own sums: once
            fy_g += _mm(f_y, g, CONTRACT)

        df_x = inv_gamma * _mm_tn(w, fy_g, CONTRACT)  # [BLOCK_N(i), BLOCK_W]: this tile's columns, complete
        # offsets and exponents recomputed rather than kept live through the row loop
        _gauss_x, offset_x, exponent_x = _gaussian_terms(mu_x, sigma2, offs_n, offs_w, width, N, COMPUTE_DTYPE)
        r_x, dfo_x, fo_x, dfe_x, fe_x = _add_row_moments(r_x, dfo_x, fo_x, dfe_x, fe_x, df_x, f_x, offset_x,
                                                         exponent_x, True)  # the tile's columns: all its own
        d_w += _mm_nt(fy_g, f_x, CONTRACT)
        offs_w, mask_w, f_x = _column_tile(tile + 1, mu_x, sigma2, z_x, offs_n, width, N, BLOCK_W, COMPUTE_DTYPE)

    _store_write_grads(grad_params_ptr + pid_b * stride_db + pid_c * 5, grad_patch_ptr + pid_b * stride_ob + pid_c * N * N,
                       r_x, dfo_x, fo_x, dfe_x, fe_x, r_y, dfo_y, fo_y, dfe_y, fe_y, sum_x, sum_y, sigma2, grid,
                       delta, d_w, inv_gamma, offs_n, height, width, N)


# ---------------------------------------------------------------------------------------------
# Launchers: allocate contiguous outputs, pick block sizes, launch one program per (b, c)
# ---------------------------------------------------------------------------------------------


def _compute_dtypes(*tensors):
    """(torch, triton) dtypes of the arithmetic: the reference's rule (reference.compute_dtype): fp64 when any
    input is fp64, else fp32 (fp16/bf16 are upcast on load)."""
    compute = compute_dtype(*tensors)
    return compute, tl.float64 if compute == torch.float64 else tl.float32


def contraction(compute_dtype: torch.dtype, n: int, width: int) -> str:
    """"sum" or "dot" for an n-grid over images `width` wide (see CONTRACTIONS).

    fp64 always sums (the fp64 path is the exact one the tests hold the others to); fp32 (also for
    fp16 / bf16 inputs) follows DRAW_TRITON_CONTRACTION: "sum", "dot", or "auto" (the default).
    """
    choice = os.environ.get("DRAW_TRITON_CONTRACTION", "").strip() or "auto"  # empty: unset, as the others
    if choice not in CONTRACTIONS:
        raise ValueError(f"DRAW_TRITON_CONTRACTION={choice!r}: expected one of {', '.join(CONTRACTIONS)}")
    if compute_dtype == torch.float64:
        return "sum"
    if choice == "auto":
        return "dot" if n >= _DOT_MIN_N else "sum"
    return choice


def _tile_width(block_w: int, contract: str, backward: bool) -> int:
    """BLOCK_W: the padded width itself up to _WHOLE_WIDTH, else a column tile (see _COLUMN_TILE)."""
    return block_w if block_w <= _WHOLE_WIDTH[contract] else _COLUMN_TILE[contract, backward]


def num_warps_override() -> int | None:
    """DRAW_TRITON_NUM_WARPS: the warps of every launch instead of the launchers' choice (unset: theirs).

    For measuring: at 28x28 fewer warps issue fewer instructions per pixel (bench/kernel_report.py
    --num-warps), at the cost of each program's latency; which wins depends on the batch and the GPU.
    """
    value = os.environ.get("DRAW_TRITON_NUM_WARPS", "").strip()
    if value == "":
        return None
    if value not in ("1", "2", "4", "8", "16"):
        raise ValueError(f"DRAW_TRITON_NUM_WARPS={value!r}: expected 1, 2, 4, 8 or 16 (or unset)")
    return int(value)


# DRAW_TRITON_LAUNCH's settings and the values each may take (BLOCK_W: a column tile, so any power of two).
# maxnreg caps the registers per thread (ptxas's .maxnreg; unset: no cap), trading spills for programs per
# multiprocessor: the 3x54x54 read kernels hold 128-255 registers, 1-2 programs per SM (bench/RESULTS.md).
LAUNCH_SETTINGS = {
    "BLOCK_H": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "BLOCK_W": (2, 4, 8, 16, 32, 64, 128, 256, 512),
    "num_warps": (1, 2, 4, 8, 16),
    "num_stages": (1, 2, 3, 4, 5),
    "maxnreg": (32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 168, 255),
    "LOAD_AHEAD": (0, 1),
}


def launch_overrides(backward: bool) -> dict:
    """DRAW_TRITON_LAUNCH: launch settings that replace the launchers' choice, for measuring them
    (bench/tune_attention.py); unset or empty, none.

    "KEY=VALUE,KEY=VALUE,..." with KEY one of LAUNCH_SETTINGS, optionally prefixed "fwd." or "bwd." to
    set the forward or the backward kernels alone: "BLOCK_H=32,bwd.num_warps=4". A bad entry is refused
    with the entry named. DRAW_TRITON_NUM_WARPS=K is num_warps=K for both (DRAW_TRITON_LAUNCH wins).
    """
    warps = num_warps_override()
    overrides = {} if warps is None else {"num_warps": warps}
    for direction, name, value in parse_launch_settings(os.environ.get("DRAW_TRITON_LAUNCH", "")):
        if direction in ("", "bwd" if backward else "fwd"):
            overrides[name] = value
    return overrides


def parse_launch_settings(spec: str, source: str = "DRAW_TRITON_LAUNCH") -> list[tuple[str, str, int]]:
    """[(direction: "", "fwd" or "bwd"; setting; value)] from "[fwd.|bwd.]KEY=VALUE,..."; a ValueError
    names the first bad entry and what `source` accepts."""
    settings = []
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        key, _, value = entry.partition("=")
        direction, dot, name = key.strip().rpartition(".")
        allowed, value = LAUNCH_SETTINGS.get(name), value.strip()
        # a "." needs fwd or bwd before it; VALUE in ASCII digits (str.isdigit takes other scripts' too)
        if (direction not in ("fwd", "bwd") if dot else direction) or allowed is None \
                or not (value.isascii() and value.isdigit()) or int(value) not in allowed:
            raise ValueError(
                f"{source} entry {entry!r}: expected [fwd.|bwd.]KEY=VALUE with "
                + "; ".join(f"{k} in {', '.join(map(str, v))}" for k, v in LAUNCH_SETTINGS.items()))
        settings.append((direction, name, int(value)))
    return settings


def min_block(config: dict) -> int:
    """The fewest rows and columns a launch's blocks may have: _DOT_MIN where either op contracts with
    tl.dot, else 1."""
    return _DOT_MIN if "dot" in (config["CONTRACT"], config.get("CONTRACT_W")) else 1


def no_load_ahead_in_one_trip(settings: dict, height: int) -> dict:
    """settings with LOAD_AHEAD 0 where a block holds every row of an image `height` rows tall: a row loop of one
    trip has no next block, and loading it would only cost registers (the launchers' rule, and the tuner's)."""
    if settings.get("LOAD_AHEAD") and height <= settings["BLOCK_H"]:
        return {**settings, "LOAD_AHEAD": 0}
    return settings


def _with_overrides(config: dict, height: int, width: int, backward: bool) -> dict:
    """config with launch_overrides() applied (COL_TILES follows BLOCK_W); tl.dot needs blocks of 16. A row loop
    of one trip loads nothing ahead, whatever was asked (no_load_ahead_in_one_trip)."""
    overrides = launch_overrides(backward)
    if overrides:
        config = {**config, **overrides}
        config["COL_TILES"] = triton.cdiv(width, config["BLOCK_W"])
        if min(config["BLOCK_H"], config["BLOCK_W"]) < min_block(config):
            raise ValueError(f"DRAW_TRITON_LAUNCH: BLOCK_H={config['BLOCK_H']}, BLOCK_W={config['BLOCK_W']}, but the "
                             f"tl.dot contraction needs both >= {_DOT_MIN} (or DRAW_TRITON_CONTRACTION=sum)")
    return no_load_ahead_in_one_trip(config, height)


def _launch_config(n: int, height: int, width: int, backward: bool, compute_dtype: torch.dtype,
                   device: torch.device | None = None, programs: int = 0) -> dict:
    """The write kernels' launch settings: block sizes (powers of two), warps and contraction for an n-grid over
    H x W images, `programs` of them launched on `device` (_batch_warps), whether the row loops load ahead
    (_LOAD_AHEAD), with the launch_overrides() applied."""
    config = _batch_warps(_chosen_config(n, height, width, backward, compute_dtype), height, width, device, programs)
    config = {**config, "LOAD_AHEAD": _LOAD_AHEAD["write backward" if backward else "write forward"]}
    return _with_overrides(config, height, width, backward)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _batch_warps(config: dict, height: int, width: int, device: torch.device | None, programs: int) -> dict:
    """config with fewer warps where `programs` programs of a small image fill a CUDA device (see
    _SMALL_IMAGE); unchanged elsewhere, on other devices, and in Triton's interpreter."""
    if device is None or device.type != "cuda" or _interpreted() or max(height, width) > _SMALL_IMAGE:
        return config
    enough = _WARPS_PER_SM * _multiprocessors(device) // max(programs, 1)
    warps = 1 << (max(enough, 1).bit_length() - 1)  # a power of two, at most `enough`
    return {**config, "num_warps": min(config["num_warps"], warps)}


def _chosen_config(n: int, height: int, width: int, backward: bool, compute_dtype: torch.dtype) -> dict:
    """The launchers' own block sizes, warps and contraction (see _sum_launch_config, _dot_launch_config)."""
    if contraction(compute_dtype, n, width) == "dot":
        return _dot_launch_config(n, height, width, backward)
    return _sum_launch_config(n, height, width, backward)


def _sum_launch_config(n: int, height: int, width: int, backward: bool) -> dict:
    """Block sizes for the broadcast-and-sum contraction (see _FORWARD_TILE)."""
    block_n = max(triton.next_power_of_2(n), 2)
    block_w = _tile_width(max(triton.next_power_of_2(width), 2), "sum", backward)
    row_elements = block_n * block_w  # each [BLOCK_N, BLOCK_W] register tile
    tile = _BACKWARD_TILE if backward else _FORWARD_TILE
    if _interpreted():
        tile = _INTERPRETER_TILE or tile
    block_h = min(max(tile // row_elements, 1), triton.next_power_of_2(height))  # powers of two
    # ptxas, sm_90, fp32: no spills up to [16, 128] row tiles (n <= 16); at [16, 256] write backward
    # spills, little of it inside the row loop (see _WHOLE_WIDTH)
    num_warps = 4 if row_elements <= (256 if backward else 2048) else 8
    return {"N": n, "BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_W": block_w,
            "COL_TILES": triton.cdiv(width, block_w), "num_warps": num_warps, "num_stages": _NUM_STAGES,
            "CONTRACT": "sum"}


def _dot_launch_config(n: int, height: int, width: int, backward: bool) -> dict:
    """Block sizes for tl.dot: every dimension padded to at least _DOT_MIN (triton 3.6 needs K >= 16).

    ptxas, sm_90, fp32: no spills up to 64 columns; at 65-128 columns read backward spills 208 B
    per thread (408 B with dx; 8 warps) and the other kernels none; wider images go in column tiles
    (128 columns forward, 64 backward: 8 B of spills at most in fp32, 20 B in bf16). 4 warps only for narrow forward kernels.
    """
    block_n = max(triton.next_power_of_2(n), _DOT_MIN)
    block_w = _tile_width(max(triton.next_power_of_2(width), _DOT_MIN), "dot", backward)
    tile = _DOT_MIN * block_w if backward else _DOT_FORWARD_TILE
    if _interpreted():
        tile = _INTERPRETER_TILE or tile
    block_h = min(max(tile // block_w, _DOT_MIN), max(triton.next_power_of_2(height), _DOT_MIN))
    num_warps = 4 if block_w <= 32 and not backward else 8
    return {"N": n, "BLOCK_N": block_n, "BLOCK_H": block_h, "BLOCK_W": block_w,
            "COL_TILES": triton.cdiv(width, block_w), "num_warps": num_warps, "num_stages": _NUM_STAGES,
            "CONTRACT": "dot"}


def _device_guard(t: torch.Tensor):
    """Launch on the tensors' GPU, not whichever one is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _read_shape(x: torch.Tensor, has_canvas: bool, n: int) -> tuple:
    """[B, 2, C, n, n] for read, [B, C, n, n] for the glimpse (no canvas)."""
    batch, channels = x.shape[:2]
    return (batch, 2, channels, n, n) if has_canvas else (batch, channels, n, n)


def _read_strides(t: torch.Tensor, has_canvas: bool) -> tuple:
    """t's strides as the kernels' [B, 2, C, n, n] (b, k, c, j, i); a glimpse [B, C, n, n] has no k."""
    return t.stride() if has_canvas else (t.stride(0), 0, *t.stride()[1:])


def _param_partials(batch: int, channels: int, acc_dtype: torch.dtype, params: torch.Tensor,
                    place: torch.Tensor | None = None) -> torch.Tensor:
    """The backward kernels' per-channel parameter gradients [B, C, 5], in the compute dtype to be
    summed over C; with one channel, already the gradient, in params' dtype (no cast after), written
    into `place` ([B, 5], the gradient's destination: kernels.gradient_destination) when given."""
    if channels == 1 and place is not None:
        return _checked_place(place, params).view(batch, 1, 5)
    return torch.empty((batch, channels, 5), device=params.device, dtype=acc_dtype if channels > 1 else params.dtype)


def _checked_place(place: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """place, if it can take like's gradient as the kernels write it: like's shape, dtype and device, each row
    contiguous, the rows apart (a row stride of at least a row: rows that overlapped would be written by
    several programs at once)."""
    contiguous_row = torch.empty(like.shape[1:], device="meta").stride()
    row = like[0].numel() if like.dim() and like.shape[0] else 0
    if (place.shape != like.shape or place.dtype != like.dtype or place.stride()[1:] != contiguous_row
            or (place.dim() and place.shape[0] > 1 and place.stride(0) < row)):
        raise ValueError(f"a gradient's place must be {list(like.shape)} in {like.dtype} with contiguous rows apart, got "
                         f"{list(place.shape)} in {place.dtype} with strides {place.stride()}")
    if place.device != like.device:
        raise ValueError(f"a gradient's place must be on {like.device}, as its tensor is, got one on {place.device}")
    return place


def _gradient_output(place: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Where the kernels write like's gradient: `place` (checked: _checked_place), else a new tensor of
    like's shape and dtype."""
    if place is None:
        return torch.empty(like.shape, device=like.device, dtype=like.dtype)
    return _checked_place(place, like)


def _gradient_places(ctx_destinations, needs) -> list:
    """The places (kernels.gradient_destination) of the gradients that are needed, else None; none at all in a
    backward pass that records a graph (create_graph=True): a place is written outside autograd, so the ops'
    refusal of a double backward (_OnceDifferentiable) must see gradients of their own."""
    if torch.is_grad_enabled():
        return [None] * len(needs)
    return [take() if take is not None and need else None for take, need in zip(ctx_destinations, needs)]


def _sum_channels(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The parameter gradient [B, 5] in `dtype` from the per-channel partials [B, C, 5]: a deterministic
    sum over C, and none for one channel (MNIST), which would be a kernel launch for nothing."""
    grad_params = partials[:, 0] if partials.shape[1] == 1 else partials.sum(dim=1)
    return grad_params.to(dtype)


def _read_config(n: int, height: int, width: int, backward: bool, compute_dtype: torch.dtype,
                 write_n: int | None = None, device: torch.device | None = None, programs: int = 0) -> dict:
    """The read kernels' launch settings (as _launch_config's: `programs` of them on `device`, tl.dot reads of
    images _DOT_FOUR_WARPS_WIDTHS columns wide in 4 warps, launch_overrides() applied last), and their
    HAS_WRITE constexprs: a write with a write_n-grid made in the same launch, or none. With a write, one
    block of rows and columns serves both ops: the smaller of the two ops' own, and at least _DOT_MIN if
    either contracts with tl.dot; the warps are the read's. ptxas, sm_90 (bench/kernel_report.py --kernels write-read --num-warps 2,4,8):
    at 28x28 (write N 5 "dot", read N 2 "sum") backward, 4 warps (the read's) issue 20.6 warp instructions
    per pixel against 28.0 with 8 (the write's), both without spills; at 3x54x54, N 12 / 12 (both "dot"),
    in one pipeline stage (triton 3.6), 4 warps spill 8 B in fp32 and 48 B in bf16, 8 warps 28 and 76 B
    (in three stages 8 warps had spilled least), and column tiles of 32 or 16 do not help. The backward takes at most _WRITE_READ_BACKWARD_WIDTH columns at a time: at 100x100
    over the whole (128-column) width it spilled 8,076 B per thread in fp32, in 64-column tiles 492 B."""
    config = _chosen_config(n, height, width, backward, compute_dtype)
    if config["CONTRACT"] == "dot" and width in _DOT_FOUR_WARPS_WIDTHS:
        config["num_warps"] = 4
    config = {**_batch_warps(config, height, width, device, programs), "LOAD_AHEAD": _LOAD_AHEAD["read"]}
    if write_n is None:
        config = {**config, "HAS_WRITE": False, "NW": 1, "BLOCK_NW": 2, "CONTRACT_W": "sum"}
        return _with_overrides(config, height, width, backward)
    write = _chosen_config(write_n, height, width, backward, compute_dtype)
    floor = _DOT_MIN if "dot" in (config["CONTRACT"], write["CONTRACT"]) else 1
    block_h = max(min(config["BLOCK_H"], write["BLOCK_H"]), floor)
    block_w = min(config["BLOCK_W"], write["BLOCK_W"])
    block_w = max(min(block_w, _WRITE_READ_BACKWARD_WIDTH) if backward else block_w, floor)
    config = {**config, "BLOCK_H": block_h, "BLOCK_W": block_w, "COL_TILES": triton.cdiv(width, block_w),
              "HAS_WRITE": True, "NW": write_n, "BLOCK_NW": write["BLOCK_N"], "CONTRACT_W": write["CONTRACT"]}
    return _with_overrides(config, height, width, backward)


def _launch_read_forward(x, canvas, params, n: int, write=None, dtype: torch.dtype | None = None):
    """Launch the read forward kernel: (glimpses in `dtype`, default x's; new canvas). write = (patch,
    write_params) writes into canvas first and reads the result (HAS_WRITE), which is returned as the
    new canvas; else None."""
    batch, channels, height, width = x.shape
    has_canvas = canvas is not None
    out = torch.empty(_read_shape(x, has_canvas, n), device=x.device, dtype=dtype or x.dtype)
    new_canvas = None if write is None else torch.empty(canvas.shape, device=canvas.device, dtype=canvas.dtype)
    if out.numel() == 0:
        return out, new_canvas
    if height * width == 0:
        return out.zero_(), new_canvas
    canvas = canvas if has_canvas else x  # never read without a canvas; any valid pointer will do
    patch, write_params = write if write is not None else (x, params)  # never read without a write
    compute_torch, compute = _compute_dtypes(x, canvas, params, *(write or ()))
    with _device_guard(x):
        _attention_read_forward_kernel[(batch, channels)](
            x, canvas, params, out, patch, write_params, x if new_canvas is None else new_canvas,
            height, width, max(height, width) - 1,
            *x.stride(), *canvas.stride(), *params.stride(), *_read_strides(out, has_canvas),
            *patch.stride(), *write_params.stride(),
            COMPUTE_DTYPE=compute, HAS_CANVAS=has_canvas,
            **_read_config(n, height, width, False, compute_torch, None if write is None else patch.shape[-1],
                           x.device, batch * channels),
        )
    return out, new_canvas


def _launch_read_backward(grad_out, x, canvas, params, n: int, x_needs_grad: bool, canvas_needs_grad: bool, write=None,
                          places=(None, None, None)):
    """Launch the read backward kernel: (dx, dcanvas, dparams), dx / dcanvas empty [0] tensors when not
    needed; canvas None: the glimpse's backward (grad_out [B, C, n, n], no dcanvas). write = (patch,
    write_params, grad_new_canvas): the backward of _launch_read_forward's write-then-read, canvas the new canvas
    (HAS_WRITE); dcanvas is then the gradient of the canvas written into, and (dpatch, dwrite_params) follow.
    places: where dparams, dpatch and dwrite_params are to be written (None: new tensors); a parameter
    gradient only with one channel (with more it is a sum over the channels' partials)."""
    batch, channels, height, width = x.shape
    has_canvas = canvas is not None
    canvas_needs_grad = canvas_needs_grad and has_canvas
    canvas = canvas if has_canvas else x  # never read without a canvas
    grad_x = torch.empty(x.shape if x_needs_grad else (0,), device=x.device, dtype=x.dtype)
    grad_canvas = torch.empty(canvas.shape if canvas_needs_grad else (0,), device=x.device,
                              dtype=canvas.dtype)
    acc_dtype, compute = _compute_dtypes(x, canvas, params, *(write or ()))
    params_place, patch_place, write_params_place = places
    partials = _param_partials(batch, channels, acc_dtype, params, params_place)  # all written
    if write is not None:
        patch, write_params, grad_new = write
        grad_patch = _gradient_output(patch_place, patch)
        write_partials = _param_partials(batch, channels, acc_dtype, write_params, write_params_place)
    else:
        patch, write_params, grad_new = x, params, x  # never read without a write
        grad_patch, write_partials = partials, partials  # never written without a write
    if x.numel() > 0:
        with _device_guard(x):
            _attention_read_backward_kernel[(batch, channels)](
                x, canvas, params, grad_out, grad_x, grad_canvas, partials,
                patch, write_params, grad_new, grad_patch, write_partials,
                height, width, max(height, width) - 1,
                *x.stride(), *canvas.stride(), *params.stride(), *_read_strides(grad_out, has_canvas),
                *patch.stride(), *write_params.stride(), *grad_new.stride(),
                partials.stride(0), write_partials.stride(0), grad_patch.stride(0),
                COMPUTE_DTYPE=compute, HAS_CANVAS=has_canvas, STORE_GRAD_X=x_needs_grad,
                STORE_GRAD_CANVAS=canvas_needs_grad,
                **_read_config(n, height, width, True, acc_dtype, None if write is None else patch.shape[-1],
                               x.device, batch * channels),
            )
    else:
        for t in (grad_x, grad_canvas, partials, grad_patch, write_partials):
            t.zero_()  # empty images (H * W = 0): every gradient is 0
    grads = (grad_x, grad_canvas, _sum_channels(partials, params.dtype))
    if write is None:
        return grads
    return (*grads, grad_patch, _sum_channels(write_partials, write_params.dtype))


def attention_read_forward(x: torch.Tensor, canvas: torch.Tensor | None, params: torch.Tensor, n: int,
                           dtype: torch.dtype | None = None):
    """Launch the read forward kernel. x, canvas [B, C, H, W]; params [B, 5] -> [B, 2, C, n, n] in `dtype`
    (default x's).

    canvas None: the glimpse of x alone, [B, C, n, n].
    """
    return _launch_read_forward(x, canvas, params, n, None, dtype)[0]


def attention_read_backward(grad_out, x, canvas, params, n: int, x_needs_grad: bool,
                            canvas_needs_grad: bool):
    """Launch the read backward kernel. Returns (dx, dcanvas, dparams); dx / dcanvas are empty [0]
    tensors when not needed. canvas None: the glimpse's backward (grad_out [B, C, n, n], no dcanvas)."""
    return _launch_read_backward(grad_out, x, canvas, params, n, x_needs_grad, canvas_needs_grad)


def attention_write_read_forward(patch, write_params, canvas, x, read_params, n: int, dtype: torch.dtype | None = None):
    """Launch the read forward kernel with its write: c_t = canvas + (1 / gamma) F_Y^T w F_X (Eq. 29) and
    the read of x and c_t (Eq. 27) in one pass. patch [B, C, n^, n^]; canvas, x [B, C, H, W]; params [B, 5].
    Returns (c_t [B, C, H, W] in the canvas's dtype, glimpses [B, 2, C, n, n] in `dtype`, default x's)."""
    glimpses, new_canvas = _launch_read_forward(x, canvas, read_params, n, (patch, write_params), dtype)
    return new_canvas, glimpses


def attention_write_read_backward(grad_new_canvas, grad_glimpses, patch, write_params, new_canvas, x, read_params,
                                  n: int, x_needs_grad: bool, canvas_needs_grad: bool, places=(None, None, None)):
    """Launch the read backward kernel with its write's (attention_write_read_forward's backward).
    new_canvas is the forward's c_t. Returns (dpatch, dwrite_params, dcanvas, dx, dread_params); dcanvas
    and dx are empty [0] tensors when not needed. places: where dpatch, dwrite_params and dread_params
    are to be written (see _launch_read_backward), None for new tensors."""
    patch_place, write_params_place, read_params_place = places
    grad_x, grad_canvas, grad_read_params, grad_patch, grad_write_params = _launch_read_backward(
        grad_glimpses, x, new_canvas, read_params, n, x_needs_grad, canvas_needs_grad,
        (patch, write_params, grad_new_canvas), (read_params_place, patch_place, write_params_place))
    return grad_patch, grad_write_params, grad_canvas, grad_x, grad_read_params


def attention_write_forward(patch: torch.Tensor, params: torch.Tensor, canvas: torch.Tensor):
    """Launch the write forward kernel. patch [B, C, n, n]; params [B, 5]; canvas [B, C, H, W]."""
    batch, channels, height, width = canvas.shape
    n = patch.shape[-1]
    out = torch.empty(canvas.shape, device=canvas.device, dtype=canvas.dtype)
    if out.numel() == 0:
        return out
    compute_torch, compute = _compute_dtypes(patch, params, canvas)
    with _device_guard(canvas):
        _attention_write_forward_kernel[(batch, channels)](
            patch, params, canvas, out,
            height, width, max(height, width) - 1,
            *patch.stride(), *params.stride(), *canvas.stride(),
            COMPUTE_DTYPE=compute,
            **_launch_config(n, height, width, backward=False, compute_dtype=compute_torch,
                             device=canvas.device, programs=batch * channels),
        )
    return out


def attention_write_backward(grad_out, patch, params, places=(None, None)):
    """Launch the write backward kernel. grad_out [B, C, H, W] (in the canvas's dtype); places: where
    dpatch and dparams are to be written (see _launch_read_backward), None for new tensors.

    Returns (dpatch [B, C, n, n], dparams [B, 5]); dcanvas is grad_out itself.
    """
    batch, channels, height, width = grad_out.shape
    n = patch.shape[-1]
    patch_place, params_place = places
    grad_patch = _gradient_output(patch_place, patch)
    acc_dtype, compute = _compute_dtypes(grad_out, patch, params)
    partials = _param_partials(batch, channels, acc_dtype, params, params_place)
    if grad_out.numel() > 0:
        with _device_guard(patch):
            _attention_write_backward_kernel[(batch, channels)](
                patch, params, grad_out, grad_patch, partials,
                height, width, max(height, width) - 1,
                *patch.stride(), *params.stride(), *grad_out.stride(), grad_patch.stride(0), partials.stride(0),
                COMPUTE_DTYPE=compute,
                **_launch_config(n, height, width, backward=True, compute_dtype=acc_dtype,
                                 device=patch.device, programs=batch * channels),
            )
    else:
        grad_patch.zero_()
        partials.zero_()
    return grad_patch, _sum_channels(partials, params.dtype)


# ---------------------------------------------------------------------------------------------
# Autograd integration: torch.library custom ops (opaque to torch.compile, no graph breaks)
# ---------------------------------------------------------------------------------------------


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "double backward through DRAW's fused Triton attention kernels is not supported; "
        "use backend='reference' for higher-order gradients"
    )


def _no_double_backward_setup(ctx, inputs, output):
    pass


# One op pair serves read and the glimpse: canvas None is the glimpse of x alone ([B, C, n, n] out).
# (typing.Optional, not `Tensor | None`: the form torch.library's schema inference reads in every version.)
@torch.library.custom_op("draw_attention::read", mutates_args=())
def _read_op(x: torch.Tensor, canvas: Optional[torch.Tensor], params: torch.Tensor, n: int) -> torch.Tensor:
    return attention_read_forward(x, canvas, params, n)


@_read_op.register_fake
def _read_fake(x, canvas, params, n):
    return x.new_empty(_read_shape(x, canvas is not None, n))


@torch.library.custom_op("draw_attention::read_backward", mutates_args=())
def _read_backward_op(grad_out: torch.Tensor, x: torch.Tensor, canvas: Optional[torch.Tensor],
                      params: torch.Tensor, n: int, x_needs_grad: bool, canvas_needs_grad: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_read_backward(grad_out, x, canvas, params, n, x_needs_grad, canvas_needs_grad)


@_read_backward_op.register_fake
def _read_backward_fake(grad_out, x, canvas, params, n, x_needs_grad, canvas_needs_grad):
    canvas_needs_grad = canvas_needs_grad and canvas is not None  # as the launcher: no dcanvas
    canvas_like = canvas if canvas is not None else x  # without a canvas
    return (x.new_empty(x.shape if x_needs_grad else (0,)),
            canvas_like.new_empty(canvas_like.shape if canvas_needs_grad else (0,)),
            params.new_empty(params.shape))


def _read_setup_context(ctx, inputs, output):
    x, canvas, params, n = inputs
    ctx.save_for_backward(x, canvas, params)
    ctx.n = n


def _read_gradients(ctx, grad_out, launch):
    """(dx, dcanvas, dparams, None) of read / glimpse, None where not needed; launch is the backward
    custom op or the launcher (same arguments)."""
    x, canvas, params = ctx.saved_tensors
    x_needs_grad, canvas_needs_grad, params_needs_grad = ctx.needs_input_grad[:3]
    grad_x, grad_canvas, grad_params = launch(grad_out, x, canvas, params, ctx.n, x_needs_grad, canvas_needs_grad)
    return (grad_x if x_needs_grad else None, grad_canvas if canvas_needs_grad else None,
            grad_params if params_needs_grad else None, None)


def _read_backward(ctx, grad_out):
    return _read_gradients(ctx, grad_out, _read_backward_op)


_read_op.register_autograd(_read_backward, setup_context=_read_setup_context)
_read_backward_op.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


@torch.library.custom_op("draw_attention::write", mutates_args=())
def _write_op(patch: torch.Tensor, params: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    return attention_write_forward(patch, params, canvas)


@_write_op.register_fake
def _write_fake(patch, params, canvas):
    return canvas.new_empty(canvas.shape)


@torch.library.custom_op("draw_attention::write_backward", mutates_args=())
def _write_backward_op(grad_out: torch.Tensor, patch: torch.Tensor, params: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_write_backward(grad_out, patch, params)


@_write_backward_op.register_fake
def _write_backward_fake(grad_out, patch, params):
    return patch.new_empty(patch.shape), params.new_empty(params.shape)


def _write_setup_context(ctx, inputs, output):
    patch, params, _canvas = inputs
    ctx.save_for_backward(patch, params)


def _write_gradients(ctx, grad_out, launch):
    """(dpatch, dparams, dcanvas) of write, None where not needed; launch is the backward custom op or
    the launcher (same arguments)."""
    patch, params = ctx.saved_tensors
    patch_needs_grad, params_needs_grad, canvas_needs_grad = ctx.needs_input_grad[:3]
    grad_patch, grad_params = launch(grad_out, patch, params)
    # d new_canvas / d canvas = identity; grad_out is already in the canvas's dtype.
    return (grad_patch if patch_needs_grad else None, grad_params if params_needs_grad else None,
            grad_out if canvas_needs_grad else None)


def _write_backward(ctx, grad_out):
    return _write_gradients(ctx, grad_out, _write_backward_op)


_write_op.register_autograd(_write_backward, setup_context=_write_setup_context)
_write_backward_op.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


@torch.library.custom_op("draw_attention::write_read", mutates_args=())
def _write_read_op(patch: torch.Tensor, write_params: torch.Tensor, canvas: torch.Tensor, x: torch.Tensor,
                   read_params: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_write_read_forward(patch, write_params, canvas, x, read_params, n)


@_write_read_op.register_fake
def _write_read_fake(patch, write_params, canvas, x, read_params, n):
    return canvas.new_empty(canvas.shape), x.new_empty(_read_shape(x, True, n))


@torch.library.custom_op("draw_attention::write_read_backward", mutates_args=())
def _write_read_backward_op(grad_new_canvas: torch.Tensor, grad_glimpses: torch.Tensor, patch: torch.Tensor,
                            write_params: torch.Tensor, new_canvas: torch.Tensor, x: torch.Tensor,
                            read_params: torch.Tensor, n: int, x_needs_grad: bool, canvas_needs_grad: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_write_read_backward(grad_new_canvas, grad_glimpses, patch, write_params, new_canvas, x,
                                         read_params, n, x_needs_grad, canvas_needs_grad)


@_write_read_backward_op.register_fake
def _write_read_backward_fake(grad_new_canvas, grad_glimpses, patch, write_params, new_canvas, x, read_params, n,
                              x_needs_grad, canvas_needs_grad):
    return (patch.new_empty(patch.shape), write_params.new_empty(write_params.shape),
            new_canvas.new_empty(new_canvas.shape if canvas_needs_grad else (0,)),
            x.new_empty(x.shape if x_needs_grad else (0,)), read_params.new_empty(read_params.shape))


def _write_read_setup_context(ctx, inputs, output):
    patch, write_params, _canvas, x, read_params, n = inputs[:6]
    ctx.save_for_backward(patch, write_params, output[0], x, read_params)  # output[0]: the new canvas
    ctx.n = n


def _write_read_gradients(ctx, grad_new_canvas, grad_glimpses, launch):
    """(dpatch, dwrite_params, dcanvas, dx, dread_params) of write_read, None where not needed; launch is
    the backward custom op or the launcher (same arguments). A missing output gradient counts as zeros."""
    patch, write_params, new_canvas, x, read_params = ctx.saved_tensors
    grad_new_canvas = torch.zeros_like(new_canvas) if grad_new_canvas is None else grad_new_canvas
    grad_glimpses = torch.zeros(_read_shape(x, True, ctx.n), device=x.device) if grad_glimpses is None else grad_glimpses
    needs = ctx.needs_input_grad[:5]  # patch, write_params, canvas, x, read_params
    grads = launch(grad_new_canvas, grad_glimpses, patch, write_params, new_canvas, x, read_params, ctx.n, needs[3],
                   needs[2])
    return tuple(g if need else None for g, need in zip(grads, needs))


def _write_read_backward(ctx, grad_new_canvas, grad_glimpses):
    return (*_write_read_gradients(ctx, grad_new_canvas, grad_glimpses, _write_read_backward_op), None)


_write_read_op.register_autograd(_write_read_backward, setup_context=_write_read_setup_context)
_write_read_backward_op.register_autograd(_no_double_backward, setup_context=_no_double_backward_setup)


# ---------------------------------------------------------------------------------------------
# Eager autograd: the same launchers through torch.autograd.Function
# ---------------------------------------------------------------------------------------------
# Outside torch.compile the public functions below take these instead of the custom ops: a custom
# op's dispatch (schema defaults, a redispatch through its autograd kernel) costs the host several
# times what a Function does per call (bench/bench_host_overhead.py), and eager training on a GPU is
# host-bound. Under torch.compile the custom ops keep the kernels opaque to the compiler.


class _OnceDifferentiable(torch.autograd.Function):
    """launcher(*args), recorded so that differentiating its result raises (no double backward)."""

    @staticmethod
    def forward(ctx, launcher, *args):
        return launcher(*args)

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx)


def _backward(launcher, *args):
    """Run a backward launcher; under create_graph=True through _OnceDifferentiable."""
    if torch.is_grad_enabled():
        return _OnceDifferentiable.apply(launcher, *args)
    return launcher(*args)


class _ReadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, canvas, params, n, dtype):
        _read_setup_context(ctx, (x, canvas, params, n), None)
        return attention_read_forward(x, canvas, params, n, dtype)

    @staticmethod
    def backward(ctx, grad_out):
        return *_read_gradients(ctx, grad_out, functools.partial(_backward, attention_read_backward)), None


class _WriteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patch, params, canvas, destinations):
        _write_setup_context(ctx, (patch, params, canvas), None)
        ctx.destinations = destinations
        return attention_write_forward(patch, params, canvas)

    @staticmethod
    def backward(ctx, grad_out):
        places = _gradient_places(ctx.destinations, ctx.needs_input_grad[:2])  # patch, params
        launch = functools.partial(_backward, functools.partial(attention_write_backward, places=places))
        return *_write_gradients(ctx, grad_out, launch), None


class _WriteReadFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patch, write_params, canvas, x, read_params, n, dtype, destinations):
        new_canvas, glimpses = attention_write_read_forward(patch, write_params, canvas, x, read_params, n, dtype)
        _write_read_setup_context(ctx, (patch, write_params, canvas, x, read_params, n), (new_canvas, glimpses))
        ctx.destinations = destinations
        return new_canvas, glimpses

    @staticmethod
    def backward(ctx, grad_new_canvas, grad_glimpses):
        needs = ctx.needs_input_grad
        places = _gradient_places(ctx.destinations, (needs[0], needs[1], needs[4]))  # patch, write and read params
        launch = functools.partial(_backward, functools.partial(attention_write_read_backward, places=places))
        return (*_write_read_gradients(ctx, grad_new_canvas, grad_glimpses, launch), None, None, None)


def _use_custom_ops() -> bool:
    """True while torch.compile traces (see above)."""
    return torch.compiler.is_compiling()


def _read_autograd(x, canvas, params, n, dtype):
    """The custom op under torch.compile (its output cast to dtype after it: a cast the compiler fuses),
    the Function otherwise (see above)."""
    if _use_custom_ops():
        out = _read_op(x, canvas, params, n)
        return out if dtype is None else out.to(dtype)
    return _ReadFunction.apply(x, canvas, params, n, dtype)


# ---------------------------------------------------------------------------------------------
# Public functions (called by kernels.read / kernels.write with validated inputs)
# ---------------------------------------------------------------------------------------------


def read(x: torch.Tensor, canvas: torch.Tensor, params: torch.Tensor, n: int,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused attention read, Eqs. 3 and 27: gamma * [F_Y x F_X^T, F_Y x_hat F_X^T].

    Args:
        x: [B, C, H, W] images.
        canvas: [B, C, H, W] canvas logits c_{t-1}; x_hat = x - sigmoid(canvas).
        params: [B, 5] raw (gx~, gy~, log sigma^2, log delta~, log gamma).
        n: read grid size N >= 1.
        dtype: the glimpses' dtype (default x's), rounded to once, on store.
    Returns:
        [B, 2, C, n, n] glimpses of x (index 0) and of the error image (index 1), in `dtype`.
    """
    return _read_autograd(x, canvas, params, n, dtype)


def glimpse(x: torch.Tensor, params: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused glimpse of x alone, the first half of Eq. 27: gamma * F_Y x F_X^T (no canvas, no error image).

    Args:
        x: [B, C, H, W] images.
        params: [B, 5] raw (gx~, gy~, log sigma^2, log delta~, log gamma).
        n: grid size N >= 1.
        dtype: the glimpses' dtype (default x's).
    Returns:
        [B, C, n, n] glimpses, in `dtype`; equal to read(x, canvas, params, n)[:, 0] for any canvas.
    """
    return _read_autograd(x, None, params, n, dtype)


def write(patch: torch.Tensor, params: torch.Tensor, canvas: torch.Tensor, destinations=(None, None)) -> torch.Tensor:
    """Fused attention write added to the canvas, Eqs. 8 and 29: canvas + (1 / gamma) F_Y^T w F_X.

    Args:
        patch: [B, C, n, n] write patch w_t.
        params: [B, 5] raw write parameters.
        canvas: [B, C, H, W] canvas logits c_{t-1}.
        destinations: for patch and params, None or a callable giving, once, the tensor the gradient is
            to be written into (kernels.gradient_destination; params' with one channel only).
    Returns:
        [B, C, H, W] the new canvas c_t, in the canvas's dtype.
    """
    if _use_custom_ops():
        return _write_op(patch, params, canvas)
    return _WriteFunction.apply(patch, params, canvas, _one_channel(destinations, canvas, (1,)))


def write_read(patch: torch.Tensor, write_params: torch.Tensor, canvas: torch.Tensor, x: torch.Tensor,
               read_params: torch.Tensor, n: int, dtype: torch.dtype | None = None,
               destinations=(None, None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused write, then read of the new canvas: c_t = canvas + (1 / gamma_w) F_Y^T w F_X (Eqs. 8, 29), and
    gamma_r * [F_Y x F_X^T, F_Y (x - sigmoid(c_t)) F_X^T] (Eqs. 3, 27) with the read's own filterbanks.

    One launch forward (the canvas streamed once: read, written, and read back from registers) and one
    backward (the canvas gradient from outside the op and through the error image summed in registers).

    Args:
        patch: [B, C, n^, n^] write patch w_t; write_params: [B, 5] raw write parameters.
        canvas: [B, C, H, W] canvas logits c_{t-1}.
        x: [B, C, H, W] images; read_params: [B, 5] raw read parameters; n: read grid size N >= 1.
        dtype: the glimpses' dtype (default x's).
        destinations: for patch, write_params and read_params, None or a callable giving, once, the
            tensor the gradient is to be written into (kernels.gradient_destination; the parameters'
            with one channel only).
    Returns:
        (c_t [B, C, H, W] in the canvas's dtype, [B, 2, C, n, n] glimpses in `dtype`): write(patch,
        write_params, canvas) and read(x, c_t, read_params, n, dtype).
    """
    if _use_custom_ops():  # the glimpses cast after the op, a cast the compiler fuses
        new_canvas, glimpses = _write_read_op(patch, write_params, canvas, x, read_params, n)
        return new_canvas, glimpses if dtype is None else glimpses.to(dtype)
    return _WriteReadFunction.apply(patch, write_params, canvas, x, read_params, n, dtype,
                                    _one_channel(destinations, canvas, (1, 2)))


def _one_channel(destinations, canvas: torch.Tensor, params_at: tuple) -> tuple:
    """destinations without the parameters' (at params_at) unless the canvas has one channel: with more,
    the kernels' parameter gradient is a sum over the channels' partials, made after them."""
    return tuple(None if k in params_at and canvas.shape[1] > 1 else d for k, d in enumerate(destinations))
