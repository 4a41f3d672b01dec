"""The Triton grid kernels against the float64 step-by-step reference at real sizes, on the GPU.

1D grids of 196 (B=64) to 16384 positions (B=2) and 2D grids of 14x14 (B=64) to 128x128 (B=2), H=3, D=64,
transitions over (-1, 1) with some exactly zero; float32 and bfloat16 inputs; the output and every gradient.
LightNet's causal and global modes on the same grids and its box mode on the 2D ones (`--ops lightnet,
lightnet_box,lightnet_global`; their reference is the float64 torch path). The kernels' outputs are poisoned
with NaN before they run (kernels.POISON), so anything a kernel fails to write shows up.
Bounds (DEVELOPERS' brief): float32 1e-5, bfloat16 1e-2 relative error ||out - ref|| / ||ref||. Prints a table,
writes JSON and exits 1 on any failure.

    python benchmarks/check_kernels.py [--dims 1,2] [--ops grid_scan,lightnet,lightnet_box] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mdlrnn import grid_scan, kernels, lightnet_scan
from mdlrnn.testing import grid_inputs, relative_error

CASES = {
    1: [((196,), 64), ((1024,), 16), ((4096,), 4), ((16384,), 2)],
    2: [((14, 14), 64), ((32, 32), 16), ((37, 29), 4), ((64, 64), 8), ((128, 128), 2)],  # one tile up to 32x32
}
BOUNDS = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
NAMES = ("q", "k", "v", "source", "transition", "mark", "direct")


def check(sizes, batch, heads: int, dim: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    inputs = grid_inputs(batch, sizes, heads, dim, dim, generator=gen)
    t = torch.tanh(2 * torch.randn(inputs["transition"].shape, generator=gen, dtype=torch.float64))
    t.view(-1)[::97] = 0.0
    inputs["transition"] = t
    inputs = {k: x.cuda() for k, x in inputs.items()}
    weight = torch.randn(batch, *sizes, heads, dim, generator=gen, dtype=torch.float64).cuda()
    rows = []
    for dtype, bound in BOUNDS.items():
        # the reference sees what the kernels see: the inputs rounded to their dtype
        rounded = {k: x.to(dtype).double() for k, x in inputs.items()}
        ref_leaves = {k: x.clone().requires_grad_() for k, x in rounded.items()}
        ref = grid_scan(**ref_leaves, backend="reference")
        (ref * weight).sum().backward()
        leaves = {k: x.to(dtype).requires_grad_() for k, x in rounded.items()}
        y = grid_scan(**leaves, backend="triton")
        (y.double() * weight).sum().backward()
        errors = {"y": relative_error(y, ref)}
        errors.update({k: relative_error(leaves[k].grad, ref_leaves[k].grad) for k in NAMES})
        rows.append(dict(op="grid_scan", sizes=sizes, batch=batch, dtype=str(dtype).replace("torch.", ""), bound=bound,
                         errors=errors, worst=max(errors.values()), ok=max(errors.values()) < bound))
    return rows


def check_lightnet(sizes, batch, heads: int, dim: int, seed: int, mode: str = "causal", spread: float = 8.0,
                   rotary: bool = True) -> list[dict]:
    """LightNet's causal or box mode with logits k ~ spread N(0, 1) (the running maxima at work), with or without
    rotary angles, against the float64 torch path (itself checked against the step-by-step reference to 1e-12 in
    the tests: the reference keeps every position's region, quadratic memory at these sizes)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *sizes, heads, dim)
    q, k, v = (torch.randn(*shape, generator=gen, dtype=torch.float64).cuda() for _ in range(3))
    k = spread * k
    angles = (6 * torch.rand(*shape, generator=gen, dtype=torch.float64)).cuda() if rotary else None
    weight = torch.randn(*shape, generator=gen, dtype=torch.float64).cuda()
    rows = []
    for dtype, bound in BOUNDS.items():
        rounded = [x.to(dtype).double() for x in (q, k, v)]
        ref_leaves = [x.clone().requires_grad_() for x in rounded]
        ref = lightnet_scan(*ref_leaves, mode=mode, angles=angles, backend="torch")
        (ref * weight).sum().backward()
        leaves = [x.to(dtype).requires_grad_() for x in rounded]
        y = lightnet_scan(*leaves, mode=mode, angles=None if angles is None else angles.to(dtype), backend="triton")
        (y.double() * weight).sum().backward()
        errors = {"y": relative_error(y, ref)}
        errors.update({name: relative_error(a.grad, b.grad) for name, a, b in zip("qkv", leaves, ref_leaves)})
        name = f"lightnet {mode}" if mode != "box" else f"box {'tiles' if spread < 10 else 'sweeps'}"
        name = name if rotary else name.replace("lightnet ", "") + " plain"
        rows.append(dict(op=name, sizes=sizes, batch=batch, dtype=str(dtype).replace("torch.", ""),
                         bound=bound, errors=errors, worst=max(errors.values()), ok=max(errors.values()) < bound))
        del ref, y, ref_leaves, leaves
        torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "check_kernels.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dims", default="1,2", help="comma-separated grid dimensionalities")
    parser.add_argument("--ops", default="grid_scan,lightnet,lightnet_box,lightnet_global",
                        help="grid_scan, lightnet (causal mode, with and without angles), lightnet_box (box mode, "
                             "2D grids), lightnet_global")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float64 reference must not pass through tf32
    kernels.POISON = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, H=3, D=64, outputs poisoned with NaN")
    print(f"{'op':>16}{'grid':>8}{'B':>4}{'dtype':>10}{'y':>10}{'worst grad':>12}{'(which)':>12}{'bound':>8}  ok")
    rows = []
    # box mode: logits spread 8 take the tiled products, spread 30 (over 60 from the first position) the sweeps
    # causal mode with rotary angles (the models' use) and without (the benchmarks')
    checks = {"grid_scan": check, "lightnet": lambda *a: check_lightnet(*a) + check_lightnet(*a, rotary=False),
              "lightnet_box": lambda *a: check_lightnet(*a, mode="box") + check_lightnet(*a, mode="box", spread=30.0),
              "lightnet_global": lambda *a: check_lightnet(*a, mode="global")}
    cases = [case for n in map(int, args.dims.split(",")) for case in CASES[n]]
    # box mode on a 1D grid is causal mode
    for op, sizes, batch in [(op, *case) for op in args.ops.split(",") for case in cases
                             if op != "lightnet_box" or len(case[0]) > 1]:
        for row in checks[op](sizes, batch, 3, 64, args.seed):
            grads = {k: e for k, e in row["errors"].items() if k != "y"}
            which = max(grads, key=grads.get)
            print(f"{row['op']:>16}{'x'.join(map(str, sizes)):>8}{batch:>4}{row['dtype']:>10}{row['errors']['y']:10.1e}"
                  f"{grads[which]:12.1e}{which:>12}{row['bound']:8.0e}  {'yes' if row['ok'] else 'NO'}")
            rows.append(row)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
