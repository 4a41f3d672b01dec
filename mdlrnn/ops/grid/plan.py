"""Index plans for the tiled grid scan: wavefronts (anti-diagonal hyperplanes) and tiles.

A grid scan can only advance one hyperplane {p : sum(p) = d} at a time, since every p - e_b lies on
hyperplane d - 1. The plans here are pure index arithmetic, computed once per (sizes, device) and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._tables import device_tables

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
    """One hyperplane of the scan across tiles: tiles start:stop of the wavefront order.

    from_tile: (L, E) rank, in the previous hyperplane, of the tile that border edge j of each tile comes
               from (the tile before along j's axis), or -1 where j enters from outside the grid
    """

    start: int
    stop: int
    from_tile: Tensor


@dataclass(frozen=True)
class Placement:
    """Where gate values go in a dense matrix: matrix.view(-1)[target] = gates.view(-1)[source]."""

    source: Tensor
    target: Tensor


# Tiles with at most this many hyperplanes solve their edge system hyperplane by hyperplane (one small
# batched product each); longer 1D chunks use one batched triangular solve.
MAX_BLOCKED_HYPERPLANES = 8


@dataclass(frozen=True, eq=False)  # hashed by identity: a cache key for per-plan index tensors
class TilePlan:
    """Tiles of shape `tile` cover the grid (the last ones padded). Tiles, and the positions inside a tile,
    are taken in wavefront order (hyperplane by hyperplane), a topological order of the edges.

    Inside a tile, edge (p, a) is row rank(p) * N + a of a unit lower-triangular system phi = L phi + rhs over
    the K = P_t * N edges, whose right-hand side has one column per source: the P_t positions, then the E
    entering border edges. L only links consecutive hyperplanes.

    gather:  (T * P_t,) flat grid index of each (tile, position); padding points at position 0, whose
             copies can reach no real position (paths only increase coordinates)
    scatter: (prod(sizes),) index into the (tile, position) layout of each grid position
    gates:   where the gates [S, T, M] (flattened per tile, positions in wavefront order) go in dense matrices,
             flattened one after the other (their sizes are `sections`):
               L: with `blocks`, one block (rows of hyperplane d, rows of hyperplane d - 1) per d >= 1;
                  else one (K, K) matrix; T[p, a, b] at (p, a), (p - e_b, b) for p_b > 0
               rhs (K, P_t + E):     S[p, a] at ((p, a), p); T[p, a, b] at ((p, a), P_t + border(p, b)) for p_b == 0
               mark_lower (P_t, K):  M[p, b] at (p, (p - e_b, b)) for p_b > 0
               mark_border (P_t, P_t + E): M[p, b] at (p, P_t + border(p, b)) for p_b == 0
    gates_direct: the same for gates [S, T, M, D], with D[p] also at (p, p) of mark_border, so that the
             read-out G holds the direct term on its diagonal
    blocks:  rows of each hyperplane's edges, or None for one triangular solve
    exits:   (E,) rows of the edges leaving a tile, block by axis, each block in the row-major order of the
             face; border edges use the same order, so exit j of tile t - e_b feeds border edge j of tile t
    across:  steps over the tile grid's hyperplanes
    """

    tile: tuple[int, ...]
    num_tiles: int
    num_border: int
    gather: Tensor
    scatter: Tensor
    gates: Placement
    gates_direct: Placement
    sections: tuple[int, ...]
    blocks: tuple[int, ...] | None
    exits: Tensor
    across: tuple[Step, ...]

    @property
    def tile_size(self) -> int:
        return math.prod(self.tile)

    @property
    def device(self) -> torch.device:
        return self.gather.device


def _intra_tile(tile: tuple[int, ...]):
    """Gate placements, matrix sections, hyperplane row counts (or None), exit rows and E of a tile."""
    ndim, size = len(tile), math.prod(tile)
    edges = size * ndim
    face = [size // c for c in tile]
    offsets = [sum(face[:b]) for b in range(ndim)]
    width = size + sum(face)
    inside = wavefront(tile)
    rank = torch.empty(size, dtype=torch.long)
    rank[inside.order] = torch.arange(size)
    level = coordinates(tile).sum(1)
    steps = len(inside.bounds) - 1
    blocks = tuple(ndim * (b - a) for a, b in inside.steps()) if steps <= MAX_BLOCKED_HYPERPLANES else None

    # sections of the flattened matrices: L, rhs, mark_lower, mark_border
    if blocks is None:
        lower_sections = [edges * edges]
    else:
        lower_sections = [blocks[d] * blocks[d - 1] for d in range(1, steps)]
    starts = torch.tensor([0, *lower_sections]).cumsum(0)
    rhs_at = int(starts[-1])
    mark_lower_at = rhs_at + edges * width
    mark_border_at = mark_lower_at + size * edges

    def lower_target(row, col, d):  # entry (row, col) of L, row in hyperplane d
        if blocks is None:
            return row * edges + col
        first_row, cols = torch.tensor([0, *blocks]).cumsum(0), torch.tensor(blocks)[d - 1]
        return starts[d - 1] + (row - first_row[d]) * cols + (col - first_row[d - 1])

    s_at, t_at, m_at = 0, edges, edges + edges * ndim  # gate values [S, T, M]
    coords = coordinates(tile)
    strides = row_major_strides(tile)
    sources, targets = [], []

    def put(source, target):
        sources.append(source)
        targets.append(target)

    every = torch.arange(size)
    for b in range(ndim):
        inside_b = coords[:, b] > 0
        p = inside_b.nonzero().squeeze(1)  # row-major indices
        before = p - strides[b]
        on_face = (~inside_b).nonzero().squeeze(1)
        border = offsets[b] + torch.arange(on_face.numel())  # row-major order of the face
        put(m_at + rank[p] * ndim + b, mark_lower_at + rank[p] * edges + rank[before] * ndim + b)
        put(m_at + rank[on_face] * ndim + b, mark_border_at + rank[on_face] * width + size + border)
        for a in range(ndim):
            row, col = rank[p] * ndim + a, rank[before] * ndim + b
            put(t_at + rank[p] * ndim * ndim + a * ndim + b, lower_target(row, col, level[p]))
            entering = rhs_at + (rank[on_face] * ndim + a) * width + size + border
            put(t_at + rank[on_face] * ndim * ndim + a * ndim + b, entering)
        put(s_at + rank[every] * ndim + b, rhs_at + (rank[every] * ndim + b) * width + rank[every])
    gates = Placement(torch.cat(sources), torch.cat(targets))
    # the direct weight D[p] (gate values [S, T, M, D]) on G's diagonal: G[p, p] is otherwise zero
    d_at = m_at + edges
    direct = Placement(
        torch.cat([gates.source, d_at + rank[every]]),
        torch.cat([gates.target, mark_border_at + rank[every] * (width + 1)]),
    )
    sections = (*lower_sections, edges * width, size * edges, size * width)
    exits = [rank[(coords[:, a] == tile[a] - 1).nonzero().squeeze(1)] * ndim + a for a in range(ndim)]
    return inside.order, gates, direct, sections, blocks, torch.cat(exits), sum(face)


@torch.compiler.disable  # index arithmetic, cached: run eagerly rather than traced into every graph
@device_tables
def tile_plan(sizes: tuple[int, ...], device: torch.device, tile: tuple[int, ...] | None = None) -> TilePlan:
    """The plan for tiles of shape `tile` (default: tile_shape(sizes))."""
    tile = tile_shape(sizes) if tile is None else tuple(min(s, c) for s, c in zip(sizes, tile))
    counts = tuple(math.ceil(s / c) for s, c in zip(sizes, tile))
    num_positions, num_tiles = math.prod(sizes), math.prod(counts)

    across = wavefront(counts)
    inside_order, gates, gates_direct, sections, blocks, exits, num_border = _intra_tile(tile)
    corner = coordinates(counts)[across.order] * torch.tensor(tile)
    where = corner[:, None, :] + coordinates(tile)[inside_order][None]  # (T, P_t, N)
    in_grid = (where < torch.tensor(sizes)).all(-1).reshape(-1)
    flat = (where * torch.tensor(row_major_strides(sizes))).sum(-1).reshape(-1)
    gather = torch.where(in_grid, flat, 0)
    scatter = torch.empty(num_positions, dtype=torch.long)
    scatter[flat[in_grid]] = torch.arange(flat.numel())[in_grid]

    face = torch.tensor([math.prod(tile) // c for c in tile])
    axis_of_border = torch.repeat_interleave(torch.arange(len(tile)), face)
    steps = [Step(start, stop, across.pred[start:stop][:, axis_of_border].to(device)) for start, stop in across.steps()]

    move = lambda p: Placement(p.source.to(device), p.target.to(device))
    return TilePlan(
        tile=tile,
        num_tiles=num_tiles,
        num_border=num_border,
        gather=gather.to(device),
        scatter=scatter.to(device),
        gates=move(gates),
        gates_direct=move(gates_direct),
        sections=sections,
        blocks=blocks,
        exits=exits.to(device),
        across=tuple(steps),
    )
