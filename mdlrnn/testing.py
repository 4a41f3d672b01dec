"""Helpers for checking fast paths against the references: error measure, random inputs, graph families."""

from __future__ import annotations

import math

import torch

from .ops.dag import DAG
from .ops.grid.plan import coordinates, row_major_strides


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute error where ref is exactly zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (out - ref).norm().item()
    norm = ref.norm().item()
    return diff / norm if norm > 0 else diff


def lightnet_errors(shape, dv: int, generator, device, *, mode: str, spread: float = 1.0, rotary: bool = False,
                    dtype=torch.float32, transform=lambda x: x, backend: str = "triton") -> dict:
    """Relative errors of lightnet_scan's y and the gradients of q, k, v (and of learned rotary angles) on
    `backend` against the float64 reference on the same inputs rounded to `dtype` (angles to float32);
    q, k, v (shape[:-1], Dv for v) pass through `transform` first; logits k ~ spread * N(0, 1)."""
    from .ops.lightnet import lightnet_scan

    randn = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)
    leaves64 = [randn(*shape), spread * randn(*shape), randn(*shape[:-1], dv)]
    if rotary:
        leaves64.append(6 * torch.rand(shape, generator=generator, dtype=torch.float64))
    leaves64 = [x.to(dtype if i < 3 else torch.float32).double().requires_grad_() for i, x in enumerate(leaves64)]
    leaves = [x.detach().to(device, dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate(leaves64)]
    angles = lambda xs: xs[3] if rotary else None
    ref = lightnet_scan(*leaves64[:3], mode=mode, angles=angles(leaves64), backend="reference")
    out = lightnet_scan(*(transform(x) for x in leaves[:3]), mode=mode, angles=angles(leaves), backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    weight = randn(*ref.shape)
    (ref * weight).sum().backward()
    (out * weight.to(device, dtype)).sum().backward()
    errors = {"y": relative_error(out, ref)}
    errors.update({name: relative_error(a.grad, b.grad) for name, a, b in zip(("q", "k", "v", "angles"), leaves, leaves64)})
    return errors


def projection_slice(x: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
    """x with the strides of a layer's q, k or v: a slice of a fused projection twice as wide (the last axis
    contiguous, the others strided) in a layout with the axes `dims` swapped."""
    a, b = dims
    return torch.cat([x, x], -1).transpose(a, b).contiguous().transpose(a, b)[..., : x.shape[-1]]


def lightnet_errors_with_torch(shape, dv: int, generator, device, *, mode: str, **options) -> tuple[dict, dict]:
    """lightnet_errors of backend='triton' and, on the same inputs, of the float32 torch path on the CPU: where
    float32 cannot resolve a gradient (dk of a softmax saturated by huge logits, a difference of terms that agree
    far below float32's resolution) the kernels are held to the torch path's error."""
    state = generator.get_state()
    kernels = lightnet_errors(shape, dv, generator, device, mode=mode, **options)
    generator.set_state(state)
    return kernels, lightnet_errors(shape, dv, generator, "cpu", mode=mode, backend="torch", **options)


def grid_inputs(batch, sizes, heads, dk, dv, *, generator=None, dtype=torch.float64, direct=True, device="cpu"):
    """Random grid_scan arguments: gates in (0, 1) (transitions in (-1/N, 1/N)) so that states stay bounded."""
    ndim = len(sizes)
    lead = (batch, *sizes, heads)
    rand = lambda *shape: torch.rand(*shape, generator=generator, dtype=dtype, device=device)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype, device=device)
    return dict(
        q=randn(*lead, dk),
        k=randn(*lead, dk),
        v=randn(*lead, dv),
        source=rand(*lead, ndim),
        transition=(2 * rand(*lead, ndim, ndim) - 1) / ndim,
        mark=rand(*lead, ndim),
        direct=randn(*lead) if direct else None,
    )


def dag_inputs(graph: DAG, heads, dk, dv, *, generator=None, dtype=torch.float64, direct=True):
    rand = lambda *shape: torch.rand(*shape, generator=generator, dtype=dtype)
    randn = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)
    n = graph.num_nodes
    return dict(
        q=randn(n, heads, dk),
        k=randn(n, heads, dk),
        v=randn(n, heads, dv),
        source=rand(graph.num_edges, heads),
        transition=2 * rand(graph.num_line_edges, heads) - 1,
        mark=rand(graph.num_edges, heads),
        direct=randn(n, heads) if direct else None,
    )


def random_tree(num_nodes: int, generator=None) -> torch.Tensor:
    """Edges parent -> child of a random recursive tree (node i's parent is uniform in [0, i))."""
    if num_nodes < 2:
        return torch.zeros(2, 0, dtype=torch.long)
    child = torch.arange(1, num_nodes)
    parent = (torch.rand(num_nodes - 1, generator=generator) * child).long()
    return torch.stack([parent, child])


def molecule_dag(num_nodes: int = 25, rings: int = 2, generator=None) -> torch.Tensor:
    """A molecule-like graph (a tree plus a few ring closures), each edge oriented low -> high index."""
    tree = random_tree(num_nodes, generator)
    extra = torch.randint(0, num_nodes, (2, rings), generator=generator)
    extra = extra[:, extra[0] != extra[1]]
    edges = torch.cat([tree, extra], 1)
    return torch.stack([edges.min(0).values, edges.max(0).values])


def layered_dag(layers: int, width: int, density: float = 0.5, generator=None) -> torch.Tensor:
    """Random edges from every layer to every later layer, kept with probability density / distance."""
    num_nodes = layers * width
    src, dst = torch.meshgrid(torch.arange(num_nodes), torch.arange(num_nodes), indexing="ij")
    gap = dst // width - src // width
    keep = (gap > 0) & (torch.rand(num_nodes, num_nodes, generator=generator) < density / gap.clamp(min=1))
    return torch.stack([src[keep], dst[keep]])


def disjoint_union(edge_sets: list[torch.Tensor], sizes: list[int]) -> tuple[torch.Tensor, int]:
    """Batch graphs PyG-style: node ids of graph i shifted by the sizes of the graphs before it."""
    offsets = [0, *torch.cumsum(torch.tensor(sizes), 0).tolist()]
    edges = torch.cat([e + offsets[i] for i, e in enumerate(edge_sets)], 1)
    return edges, offsets[-1]


def grid_dag(sizes: tuple[int, ...]):
    """The grid as a DAG (edges p -> p + e_a) and the maps from grid gates to DAG gates.

    Returns (graph, to_dag) where to_dag(source, transition, mark, direct, q, k, v) for batch 1 gives the
    dag_scan arguments: S on the edge leaving p, M of its target, T[p, a, b] on each pair of consecutive edges.
    """
    ndim, count = len(sizes), math.prod(sizes)
    coords = coordinates(sizes)
    strides = torch.tensor(row_major_strides(sizes))
    starts, axes = [], []
    for a in range(ndim):
        inside = (coords[:, a] < sizes[a] - 1).nonzero().squeeze(1)
        starts.append(inside)
        axes.append(torch.full_like(inside, a))
    start, axis = torch.cat(starts), torch.cat(axes)
    end = start + strides[axis]
    graph = DAG.from_edge_index(torch.stack([start, end]), count)
    e_in, e_out = graph.line_edges
    through, turn_from, turn_to = end[e_in], axis[e_in], axis[e_out]  # T[p, a, b] at p = src(e_out)

    def to_dag(q, k, v, source, transition, mark, direct):
        flat = lambda x: x.reshape(count, *x.shape[1 + ndim :])
        source, transition, mark = flat(source), flat(transition), flat(mark)
        return dict(
            q=flat(q),
            k=flat(k),
            v=flat(v),
            source=source[start, :, axis],
            transition=transition[through, :, turn_to, turn_from],
            mark=mark[end, :, axis],
            direct=None if direct is None else flat(direct),
        )

    return graph, to_dag
