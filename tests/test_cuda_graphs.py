"""CUDA graphs around the kernels (GPU only): torch.compile(mode="reduce-overhead") of the pLSTM and LightNet layers
matches eager from the first call at a new grid size, whose index tables are built while the graph warms up and
must stay out of its memory pool; a manual capture of a warmed-up step replays the eager result."""

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.cudagraph_trees import reset_cudagraph_trees

from mdlrnn.layers import PLSTM2D, LightNetAttention
from mdlrnn.testing import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each case compiles from scratch (no recompile limit across cases) and counts its own skipped graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    reset_cudagraph_trees()  # its graphs' memory pools released

LAYERS = {
    "plstm2d": lambda: PLSTM2D(64, 2),
    "lightnet_causal": lambda: LightNetAttention(64, 2, mode="causal"),
    "lightnet_global": lambda: LightNetAttention(64, 2, mode="global"),
    "lightnet_box": lambda: LightNetAttention(64, 2, mode="box"),  # its op outside the graphs (it reads the host)
}


def forward_backward(layer, x):
    """Output and the gradients of x and every parameter, cloned (a graph's replay overwrites its outputs)."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.square().mean().backward()
    return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.skipif(
    name == "lightnet_box" and not hasattr(torch.Tag, "cudagraph_unsafe"), reason="needs torch >= 2.9's cudagraph_unsafe"))
    for name in LAYERS])
@pytest.mark.parametrize("base", [(19, 23), (37, 29)])  # one tile; tiles with border states
def test_reduce_overhead_matches_eager_from_the_first_call(name, base):
    torch.manual_seed(0)
    sizes = (base[0] + 2 * list(LAYERS).index(name), base[1])  # sizes no other case uses: its tables are new
    layer = LAYERS[name]().cuda()
    compiled = torch.compile(layer, mode="reduce-overhead")
    inputs = [torch.randn(2, *sizes, 64, device="cuda") for _ in range(4)]  # warm-up, recording, two replays
    results = [forward_backward(compiled, x) for x in inputs]  # compiled first: its warm-up builds the tables
    if name != "lightnet_box":  # the others run in CUDA graphs, not eagerly behind a skipped graph
        assert counters["inductor"]["cudagraph_skips"] == 0
    for x, got in zip(inputs, results):
        expected = forward_backward(layer, x)
        assert max(relative_error(a, b) for a, b in zip(got, expected)) < 1e-4


def test_manual_capture_replays_the_eager_step():
    torch.manual_seed(0)
    layer = PLSTM2D(64, 2).cuda()
    x = torch.randn(2, 21, 17, 64, device="cuda")
    expected = forward_backward(layer, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward_backward(layer, x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = forward_backward(layer, x)
    graph.replay()
    assert max(relative_error(a, b) for a, b in zip(results, expected)) < 1e-5
