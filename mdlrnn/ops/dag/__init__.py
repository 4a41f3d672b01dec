"""dag_scan: the pLSTM recurrence on the line graph of any DAG (a batch of graphs is one DAG)."""

from __future__ import annotations

import torch

from .._checks import (
    check_backend,
    check_qkv,
    check_same_device,
    check_shape,
    compute_dtype,
)
from .graph import DAG
from .level import dag_scan_torch
from .naive import dag_scan_reference

__all__ = ["DAG", "dag_scan", "dag_scan_reference", "dag_scan_torch"]

_BACKENDS = ("auto", "reference", "torch", "triton")


def _backend_function(op: str, backend: str, device: torch.device):
    """"auto": the Triton kernels on CUDA, the torch path elsewhere."""
    from ... import kernels

    if backend == "auto":
        backend = "triton" if device.type == "cuda" and kernels.usable(device) else "torch"
    if backend == "triton":
        kernels.require(op, device)
        from ...kernels.dag import dag_scan_triton

        return dag_scan_triton
    return {"reference": dag_scan_reference, "torch": dag_scan_torch}[backend]


def dag_scan(q, k, v, source, transition, mark, direct, graph, *, scale=None, backend="auto"):
    r"""Scan a DAG with matrix-valued states on its edges, passed along the line graph.

    Args:
        q, k: (Nn, H, Dk); v: (Nn, H, Dv) node tensors.
        source, mark: (E, H) per edge e = graph.edge_index[:, e].
        transition: (P, H) per line-graph edge j = graph.line_edges[:, j].
        direct: (Nn, H) or None.
        graph: a :class:`DAG`.
        scale: defaults to Dk ** -0.5.
        backend: "auto" (Triton on CUDA, else torch), "reference", "torch" or "triton".

    .. math::
        C_e = \sum_{j: e_{in} \to e} T_j C_{e_{in}} + S_e k_u v_u^\top, \qquad
        y_n = \text{scale}\,\big(\sum_{e: dst(e) = n} M_e q_n^\top C_e + D_n (q_n \cdot k_n) v_n\big)

    Returns y: (Nn, H, Dv) in the dtype of v, accumulated in float32 (float64 for float64 inputs).
    """
    op = "dag_scan"
    check_backend(op, backend, _BACKENDS)
    if not isinstance(graph, DAG):
        raise TypeError(f"{op}: `graph` must be a mdlrnn.ops.DAG (build one with DAG.from_edge_index), got {type(graph).__name__}")
    check_qkv(op, q, k, v, "(Nn, H, Dk)")
    if q.dim() != 3:
        raise ValueError(f"{op}: `q` must have shape (Nn, H, Dk), got {tuple(q.shape)}")
    nodes, heads, dk = q.shape
    if nodes != graph.num_nodes:
        raise ValueError(f"{op}: `q` must have shape (Nn, H, Dk) with Nn = graph.num_nodes = {graph.num_nodes}, got {tuple(q.shape)}")
    check_shape(op, "source", source, (graph.num_edges, heads), "(E, H)")
    check_shape(op, "transition", transition, (graph.num_line_edges, heads), "(P, H)")
    check_shape(op, "mark", mark, (graph.num_edges, heads), "(E, H)")
    if direct is not None:
        check_shape(op, "direct", direct, (nodes, heads), "(Nn, H)")
    check_same_device(op, q, source=source, transition=transition, mark=mark, direct=direct)
    if graph.device != q.device:
        raise ValueError(f"{op}: `graph` is on {graph.device} but `q` is on {q.device}; use graph.to(q.device)")
    if v.numel() == 0 or q.numel() == 0:
        return v.new_zeros(nodes, heads, v.shape[-1])
    scale = dk**-0.5 if scale is None else float(scale)

    dtype = compute_dtype(q, source, transition, mark, direct)
    args = [x if x is None else x.to(dtype) for x in (q, k, v, source, transition, mark, direct)]
    run = _backend_function(op, backend, q.device)
    with torch.autocast(q.device.type, enabled=False):
        return run(*args, graph, scale).to(v.dtype)
