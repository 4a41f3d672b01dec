"""The scan across the tiles of a 2D grid (mdlrnn.kernels.grid2d): C_exit = A C_enter + U, tile after tile.

Every feature (one of the Dk x Dv entries of a state) is a recurrence of its own over the tile grid, and all
features share A. So a program owns one group (orientation x batch x head) and a block of features and walks the
tiles in wavefront order alone: the states entering a tile are exits of tiles in earlier hyperplanes, written by
the same program before a barrier. No program waits for another. Each exit feeds at most one entering edge (that
of the same index in the next tile along its axis), so the adjoint stores where the torch loop scattered with
adds, and the gradient of A is summed over feature blocks from per-block partial products.

For 2D grids this replaces mdlrnn.ops.grid.chunk.TorchAcross (which 3D grids keep), whose gathers, batched
products and copies per hyperplane took a third of a 64x64 grid's step (RESULTS.md). No state entering a tile is
stored: readers take it from the exit states through `sources`. States and their products here are float32
whatever the inputs' dtype (see FEATURES).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._tables import device_tables
from ..ops.grid.plan import TilePlan
from . import cdiv, empty, next_power_of_2, on_device


# Features per program. The products are exact float32 (on CUDA cores, whose registers bound the blocks): tf32
# ones, 5-10% faster, raised the error of bfloat16 128x128 grids' outputs and gradients from 2.5e-3 to 9.7e-3
# (rounding along the chain of tiles), and three tf32 products (tf32x3) were no faster than these. H200, bf16,
# us a step at 64x64 B=8 / 128x128 B=2, timed while the forward also stored the entering states: forward 32
# features 424 / 485 (16: 685 / 757, 64: 770 / 1029), adjoint 32 771 / 831 (64: 961 / 1294).
FEATURES = 32


@triton.jit
def _tile_border(X, SOURCE, row, t, g, G, E, P, WIDTH, edges, e_ok):
    """Of tile row `row` (tile t, group g): A (BE, BE), A[e', e] = X[row, e', P + e], what exit e' gets from
    entering edge e; which edges a state enters (not from outside the grid); and the rows of the exits they come
    from in a (T, G, E, F) tensor."""
    a = tl.load(X + (row * E + edges)[:, None] * WIDTH + P + edges[None, :], mask=e_ok[:, None] & e_ok[None, :],
                other=0.0)
    src = tl.load(SOURCE + t * E + edges, mask=e_ok, other=-1)
    enters = src >= 0
    return a, enters, (tl.where(enters, src, 0).to(tl.int64) * G + g) * E + edges


@triton.jit
def _across_kernel(STATES, X, SOURCE, NT, G, E, F, P, WIDTH, BE: tl.constexpr, BF: tl.constexpr):
    """STATES (T, G, E, F) holds U and becomes C_exit; X (T, G, E, WIDTH) the transfer's exit rows, A in columns
    P:P + E; SOURCE (T, E) the tile each border edge enters from, or -1."""
    g = tl.program_id(0).to(tl.int64)
    feats = tl.program_id(1) * BF + tl.arange(0, BF)
    edges = tl.arange(0, BE)
    f_ok, e_ok = feats < F, edges < E
    mask = e_ok[:, None] & f_ok[None, :]
    for t in range(NT):  # wavefront order: a tile's sources come before it
        row = t * G + g
        own = (row * E + edges)[:, None] * F + feats[None, :]
        a, enters, src_row = _tile_border(X, SOURCE, row, t, g, G, E, P, WIDTH, edges, e_ok)
        c = tl.load(STATES + src_row[:, None] * F + feats[None, :], mask=enters[:, None] & f_ok[None, :], other=0.0)
        u = tl.load(STATES + own, mask=mask, other=0.0)
        tl.store(STATES + own, tl.dot(a, c, u, input_precision="ieee"), mask=mask)
        tl.debug_barrier()  # later tiles read these exits


# E is a compile-time constant here (a few values: one per tile shape): the index math and edge masks fold, and
# the E x E partials store unmasked where E is a power of two (the 16x16 tiles' 32). With E at run time the
# adjoint took 902 / 982 us at 64x64 B=8 / 128x128 B=2 on the H200 (bf16), against 745 / 772.
@triton.jit
def _across_adjoint_kernel(D_STATES, D_ENTERING, STATES, X, SOURCE, READ, D_A, NT, G, E: tl.constexpr, F, P, WIDTH,
                           BE: tl.constexpr, BF: tl.constexpr):
    """Tiles in reverse: dC_exit of a tile is complete once the tiles after it are done; dC_enter = d_entering +
    A^T dC_exit goes to the exits it came from. STATES (T, G, E, F): C_exit; D_STATES (T, G, E, F) ends as
    dLoss/dU (= dC_exit); D_A (cdiv(F, BF), T, G, E, E) gets each feature block's dC_exit C_enter^T. READ (T, E):
    whether a tile reads the exit."""
    g = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    feats = block * BF + tl.arange(0, BF)
    edges = tl.arange(0, BE)
    f_ok, e_ok = feats < F, edges < E
    mask = e_ok[:, None] & f_ok[None, :]
    for back in range(NT):
        t = NT - 1 - back
        row = t * G + g
        own = (row * E + edges)[:, None] * F + feats[None, :]
        read = tl.load(READ + t * E + edges, mask=e_ok, other=0) != 0
        d_out = tl.load(D_STATES + own, mask=read[:, None] & f_ok[None, :], other=0.0)
        tl.store(D_STATES + own, d_out, mask=(e_ok & ~read)[:, None] & f_ok[None, :])  # zero: no tile reads it
        a, enters, src_row = _tile_border(X, SOURCE, row, t, g, G, E, P, WIDTH, edges, e_ok)
        d_in = tl.dot(tl.trans(a), d_out, tl.load(D_ENTERING + own, mask=mask, other=0.0), input_precision="ieee")
        tl.store(D_STATES + src_row[:, None] * F + feats[None, :], d_in, mask=enters[:, None] & f_ok[None, :])
        c = tl.load(STATES + src_row[:, None] * F + feats[None, :], mask=enters[:, None] & f_ok[None, :], other=0.0)
        d_a = tl.dot(d_out, tl.trans(c), input_precision="ieee")
        tl.store(D_A + ((block * NT + t) * G + g) * E * E + edges[:, None] * E + edges[None, :], d_a,
                 mask=e_ok[:, None] & e_ok[None, :])
        tl.debug_barrier()  # earlier tiles read the adjoints stored here


@device_tables
def sources(plan: TilePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """SOURCE (T, E) int32: the wavefront rank of the tile each border edge enters from (-1: from outside the
    grid); READ (T, E) int8: whether a tile reads each exit."""
    parts, prev_start = [], 0
    for step in plan.across:
        from_tile = step.from_tile.cpu()
        parts.append(torch.where(from_tile >= 0, from_tile + prev_start, -1))
        prev_start = step.start
    source = torch.cat(parts)
    read = torch.zeros(source.shape, dtype=torch.int8)
    edge = torch.arange(source.shape[1]).expand_as(source)
    read[source[source >= 0], edge[source >= 0]] = 1
    return source.to(plan.device, torch.int32).contiguous(), read.to(plan.device).contiguous()


def states(local: torch.Tensor, exits: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """C_exit (R, E, Dk, Dv) float32 of every tile row (R = T x G, tile-major): the exits' local part U (same
    shape, float32 contiguous), overwritten, and the transfer's exit rows X (R, E, W). The state entering edge j
    of tile t is C_exit[j] of tile `sources(plan)[0][t, j]` (none where -1)."""
    tiles, border, width = plan.num_tiles, exits.shape[1], exits.shape[-1]
    groups, features = local.shape[0] // tiles, local[0, 0].numel()
    with on_device(local.device):
        _across_kernel[(groups, cdiv(features, FEATURES))](
            local, exits, sources(plan)[0], tiles, groups, border, features, plan.tile_size, width,
            BE=max(16, next_power_of_2(border)), BF=FEATURES)
    return local


def adjoint(d_entering: torch.Tensor, exit_states: torch.Tensor, exits: torch.Tensor, plan: TilePlan
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """dLoss/dU (R, E, Dk, Dv) and dLoss/dA (R, E, E), float32, from dLoss/dC_enter (R, E, Dk, Dv) and the C_exit
    of `states`, float32 contiguous."""
    tiles, border, width = plan.num_tiles, exits.shape[1], exits.shape[-1]
    groups, features = exit_states.shape[0] // tiles, exit_states[0, 0].numel()
    blocks, edges = cdiv(features, FEATURES), max(16, next_power_of_2(border))
    d_local = empty(*exit_states.shape, device=exit_states.device)
    d_parts = empty(blocks, exit_states.shape[0], border, border, device=exit_states.device)
    with on_device(exit_states.device):
        _across_adjoint_kernel[(groups, blocks)](
            d_local, d_entering, exit_states, exits, *sources(plan), d_parts, tiles, groups, border, features,
            plan.tile_size, width, BE=edges, BF=FEATURES)
    return d_local, d_parts.sum(0)
