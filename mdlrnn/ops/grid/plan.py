"""Index plans for the tiled grid scan: wavefronts (anti-diagonal hyperplanes) and tiles.

A grid scan can only advance one hyperplane {p : sum(p) = d} at a time, since every p - e_b lies on
hyperplane d - 1. The plans here are pure index arithmetic, computed once per (sizes, device) and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

# Tile edge per number of axes. Each position reads every border state of its tile, so the Dk x Dv work
# grows with the border (2c edges in 2D); small tiles keep it near the wavefront's (measured on the CPU).
TILE_EDGE = {2: 4, 3: 2}


def row_major_strides(sizes: tuple[int, ...]) -> list[int]:
    return [math.prod(sizes[i + 1 :]) for i in range(len(sizes))]


def coordinates(sizes: tuple[int, ...]) -> Tensor:
    """(prod(sizes), N) coordinates of every position in row-major order."""
    axes = [torch.arange(s) for s in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


@dataclass(frozen=True)
class Wavefront:
    """Positions of a grid grouped hyperplane by hyperplane.

    order:  (P,) row-major index of each position, hyperplane after hyperplane
    bounds: hyperplane d is order[bounds[d]:bounds[d + 1]]
    pred:   (P, N), in `order`: rank of p - e_b inside hyperplane d - 1, or -1 where p_b == 0
    """

    order: Tensor
    bounds: tuple[int, ...]
    pred: Tensor

    def steps(self):
        return zip(self.bounds[:-1], self.bounds[1:])


def wavefront(sizes: tuple[int, ...]) -> Wavefront:
    coords = coordinates(sizes)
    level = coords.sum(1)
    order = torch.argsort(level, stable=True)
    counts = torch.bincount(level, minlength=sum(sizes) - len(sizes) + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    strides = torch.tensor(row_major_strides(sizes))
    before = (torch.arange(order.numel())[:, None] - strides).clamp(min=0)
    pred = rank[before] - starts[(level - 1).clamp(min=0)][:, None]
    pred = torch.where(coords > 0, pred, -1)[order]
    bounds = (0, *torch.cumsum(counts, 0).tolist())
    return Wavefront(order=order, bounds=bounds, pred=pred)


def tile_shape(sizes: tuple[int, ...]) -> tuple[int, ...]:
    """In 1D (one border state per chunk) about sqrt(S) balances steps inside and across chunks."""
    if len(sizes) == 1:
        return (min(sizes[0], max(8, min(64, math.ceil(math.sqrt(sizes[0]))))),)
    edge = TILE_EDGE.get(len(sizes), 2)
    return tuple(min(s, edge) for s in sizes)


@dataclass(frozen=True)
class Step:
    """Index tensors for one hyperplane of a scan whose state rows come from the previous hyperplane.

    rows:   (L * R,) row of each entering state in the previous hyperplane's flattened states, or the
            index of an appended zero row where nothing enters
    """

    start: int
    stop: int
    rows: Tensor | None


@dataclass(frozen=True)
class TilePlan:
    """Tiles of shape `tile` cover the grid (the last ones padded); tiles and the positions inside them are
    both taken in wavefront order.

    gather:  (T * P_t,) flat grid index of each (tile, position); prod(sizes) marks padding
    scatter: (prod(sizes),) index into the (tile, position) layout of each grid position
    inside:  steps over a tile's hyperplanes; a state row is (position, axis)
    entry:   (P_t, N, P_t + E) one-hot of the border edge entering (p, b) where p_b == 0, else zero
    own:     (P_t, 1, P_t + E) one-hot of the position itself (its column as a source)
    exits:   (E,) rows (position * N + axis) of the edges leaving a tile, block by axis, each block in the
             row-major order of the face; entering border edges use the same order, so exit row j of tile
             t - e_b feeds border edge j of tile t
    across:  steps over the tile grid's hyperplanes; a state row is (tile, border edge)
    """

    tile: tuple[int, ...]
    num_tiles: int
    num_border: int
    gather: Tensor
    scatter: Tensor
    inside: tuple[Step, ...]
    entry: Tensor
    own: Tensor
    exits: Tensor
    across: tuple[Step, ...]

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)


def _steps(front: Wavefront, row_of) -> tuple[Step, ...]:
    """row_of(prev_rank, valid) -> (L, R) rows into the previous hyperplane's flattened (rank, R) states."""
    steps = []
    for d, (start, stop) in enumerate(front.steps()):
        if d == 0:
            steps.append(Step(start, stop, None))
            continue
        prev_len = front.bounds[d] - front.bounds[d - 1]
        rows = row_of(front.pred[start:stop], prev_len)
        steps.append(Step(start, stop, rows.reshape(-1)))
    return tuple(steps)


@lru_cache(maxsize=64)
def tile_plan(sizes: tuple[int, ...], device: torch.device) -> TilePlan:
    ndim = len(sizes)
    tile = tile_shape(sizes)
    counts = tuple(math.ceil(s / c) for s, c in zip(sizes, tile))
    num_positions, tile_size, num_tiles = math.prod(sizes), math.prod(tile), math.prod(counts)

    inside, across = wavefront(tile), wavefront(counts)
    local = coordinates(tile)[inside.order]  # (P_t, N) in wavefront order
    corner = coordinates(counts)[across.order] * torch.tensor(tile)
    where = corner[:, None, :] + local[None]  # (T, P_t, N)
    in_grid = (where < torch.tensor(sizes)).all(-1)
    flat = (where * torch.tensor(row_major_strides(sizes))).sum(-1)
    gather = torch.where(in_grid, flat, num_positions).reshape(-1)
    scatter = torch.empty(num_positions, dtype=torch.long)
    scatter[gather[in_grid.reshape(-1)]] = torch.arange(gather.numel())[in_grid.reshape(-1)]

    # Border edges: for each axis b the face p_b == 0 of a tile, in the face's row-major order.
    face = [tile_size // c for c in tile]
    offsets = [sum(face[:b]) for b in range(ndim)]
    num_border = sum(face)
    rank_rm = torch.empty(tile_size, dtype=torch.long)
    rank_rm[inside.order] = torch.arange(tile_size)
    local_rm = coordinates(tile)
    entry = torch.zeros(tile_size, ndim, tile_size + num_border)
    exits = []
    for b in range(ndim):
        on_entry_face = (local_rm[:, b] == 0).nonzero().squeeze(1)
        entry[rank_rm[on_entry_face], b, tile_size + offsets[b] + torch.arange(face[b])] = 1.0
        on_exit_face = (local_rm[:, b] == tile[b] - 1).nonzero().squeeze(1)
        exits.append(rank_rm[on_exit_face] * ndim + b)
    own = torch.zeros(tile_size, 1, tile_size + num_border)
    own[torch.arange(tile_size), 0, torch.arange(tile_size)] = 1.0

    def position_rows(pred, prev_len):  # rows (rank * N + b) of the state entering along b
        return torch.where(pred >= 0, pred * ndim + torch.arange(ndim), prev_len * ndim)

    axis_of_border = torch.repeat_interleave(torch.arange(ndim), torch.tensor(face))

    def border_rows(pred, prev_len):  # rows (tile rank * E + j) of border edge j, from the tile before along its axis
        from_tile = pred[:, axis_of_border]  # (L, E)
        return torch.where(from_tile >= 0, from_tile * num_border + torch.arange(num_border), prev_len * num_border)

    to = dict(device=device)
    move = lambda steps: tuple(Step(s.start, s.stop, None if s.rows is None else s.rows.to(**to)) for s in steps)
    return TilePlan(
        tile=tile,
        num_tiles=num_tiles,
        num_border=num_border,
        gather=gather.to(**to),
        scatter=scatter.to(**to),
        inside=move(_steps(inside, position_rows)),
        entry=entry.to(**to),
        own=own.to(**to),
        exits=torch.cat(exits).to(**to),
        across=move(_steps(across, border_rows)),
    )
