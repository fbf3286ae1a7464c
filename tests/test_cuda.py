"""GPU-only behaviour: CUDA-graph capture, out-of-range targets without device asserts, the
kernels' launch shapes (narrow rows, wide rows, block-wide rows, unaligned rows). Skipped
cleanly without a CUDA device."""

import pytest
import torch
import torch.nn.functional as F

import softmax_ce
from conftest import require_compiled
from helpers import truth_cross_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _compiled():
    require_compiled("cuda")


@pytest.mark.parametrize("inplace,kind,reduction", [
    (False, "index", "mean"),  # the gradient formed in the forward pass
    (False, "index", "sum"),
    (False, "prob", "mean"),
    (True, "index", "mean"),   # the in-place gradient, formed in the backward
])
def test_cuda_graph_capture_forward_backward(inplace, kind, reduction):
    _compiled()
    torch.manual_seed(0)
    x0 = torch.randn(64, 1000, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    if kind == "prob":
        t = torch.softmax(torch.randn(64, 1000, device="cuda"), 1)
    x = x0.clone().requires_grad_()
    kw = dict(label_smoothing=0.1, reduction=reduction)

    def step():
        x.grad = None
        loss = softmax_ce.cross_entropy(x, t, inplace_backward=inplace, **kw)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            with torch.no_grad():
                x.copy_(x0)
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        x.copy_(x0)
    x.grad = None
    with torch.cuda.graph(graph):
        loss = softmax_ce.cross_entropy(x, t, inplace_backward=inplace, **kw)
        loss.backward()
    with torch.no_grad():
        x.copy_(x0)
    graph.replay()
    torch.cuda.synchronize()
    xr = x0.clone().requires_grad_()
    ref = F.cross_entropy(xr, t, **kw)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, xr.grad)


def test_out_of_range_target_is_nan_and_recorded():
    _compiled()
    softmax_ce.cuda_take_target_error()  # clear
    x = torch.randn(4, 5, device="cuda", requires_grad=True)
    t = torch.tensor([0, 7, 2, 3], device="cuda")
    loss = softmax_ce.cross_entropy(x, t, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    loss.sum().backward()
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2, 3]]).all()
    assert softmax_ce.cuda_take_target_error() == 7
    assert softmax_ce.cuda_take_target_error() is None
    # the context is healthy afterwards
    torch.testing.assert_close(softmax_ce.cross_entropy(x, torch.tensor([0, 1, 2, 3], device="cuda")),
                               F.cross_entropy(x, torch.tensor([0, 1, 2, 3], device="cuda")))


@pytest.mark.parametrize("shape,dtype", [
    ((33, 3), torch.float32),          # one pack per row
    ((65, 10), torch.float32),         # 4 threads per row
    ((31, 1001), torch.float32),       # a warp per row, rows not 16-byte aligned
    ((17, 32000), torch.float32),      # a 256-thread block per row; fused (Hopper): 4 blocks
    ((9, 128256), torch.bfloat16),     # a 1024-thread block per row
    ((7, 50257), torch.float16),       # odd vocabulary (rows not aligned)
    ((4, 9000), torch.float32),        # fused (Hopper): a cluster of 2
    ((3, 300000), torch.float32),      # fused: 8 slices of 150 KB (opt-in shared memory)
    ((2, 700001), torch.float32),      # fused: 8 slices larger than shared memory, unaligned
    ((5, 7, 33, 9), torch.float32),    # inner > 1
    ((6, 300), torch.float64),
])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3},
                                     {"softcap": 20.0}, {"weight": True}])
@pytest.mark.parametrize("reduction", ["none", "mean"])  # mean: one fused forward+backward kernel
def test_launch_shapes(shape, dtype, options, reduction):
    _compiled()
    torch.manual_seed(0)
    C = shape[1]
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    t = torch.randint(0, C, (shape[0],) + shape[2:], device="cuda")
    kw = dict(options)
    w = None
    if kw.pop("weight", False):
        w = torch.rand(C, device="cuda") + 0.5
    xr = x.clone().requires_grad_()
    ours = softmax_ce.cross_entropy(xr, t, w.to(dtype) if w is not None else None,
                                    reduction=reduction, **kw)
    up = torch.randn(ours.shape, device="cuda")
    (g,) = torch.autograd.grad(ours, xr, up.to(ours.dtype))
    xd = x.double().requires_grad_()  # the float64 truth, in torch's own ops
    ref = truth_cross_entropy(xd, t, w.double() if w is not None else None, reduction=reduction,
                              **kw)
    (g_ref,) = torch.autograd.grad(ref, xd, up.double())
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=tol * 0.1 + 1e-7)


@pytest.mark.parametrize("C", [1000, 20000])  # 20000: the fused kernel's shared-memory row cache
def test_unaligned_logits_pointer(C):
    """Logits whose data pointer is not 16-byte aligned (a storage offset of one element)."""
    _compiled()
    base = torch.randn(8 * C + 1, device="cuda")
    x = base[1:].view(8, C)
    assert x.data_ptr() % 16 != 0
    t = torch.randint(0, C, (8,), device="cuda")
    xr = x.clone().requires_grad_()  # aligned copy for the reference
    xo = x.detach().requires_grad_()
    ours = softmax_ce.cross_entropy(xo, t)
    ref = F.cross_entropy(xr, t)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(xo.grad, xr.grad)
    for fn, tfn in ((softmax_ce.softmax, F.softmax), (softmax_ce.log_softmax, F.log_softmax)):
        torch.testing.assert_close(fn(x, 1), tfn(x, 1))


# (16, 8000): 256-thread blocks holding the whole row in shared memory; (8, 50257): 1024 threads,
# the whole row; (3, 128256): 1024 threads, part of the row (the rest read again from L2)
@pytest.mark.parametrize("shape", [(40, 1000), (16, 8000), (8, 50257), (3, 128256),
                                   (3, 5, 17, 4), (129, 4)])
def test_softmax_shapes(shape):
    _compiled()
    x = torch.randn(shape, device="cuda", requires_grad=True)
    g = torch.randn(shape, device="cuda")
    for fn, tfn in ((softmax_ce.softmax, F.softmax), (softmax_ce.log_softmax, F.log_softmax)):
        y = fn(x, 1)
        (gx,) = torch.autograd.grad(y, x, g)
        y_ref = tfn(x, 1)
        (gx_ref,) = torch.autograd.grad(y_ref, x, g)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_regression_target_error_read_on_the_current_stream():
    """Bug: cuda_take_target_error read the record with a copy on the legacy default stream,
    which does not wait for PyTorch's (non-blocking) streams: a kernel still queued on a side
    stream recorded its error after the read. The read is now ordered on the current stream."""
    _compiled()
    softmax_ce.cuda_take_target_error()
    x = torch.randn(256, 1000, device="cuda")
    t = torch.randint(0, 1000, (256,), device="cuda")
    t[-1] = 5000
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keeps the stream busy well past the host's next steps
        loss = softmax_ce.cross_entropy(x, t, reduction="none")
        assert softmax_ce.cuda_take_target_error() == 5000
    assert torch.isnan(loss[-1])
    assert softmax_ce.cuda_take_target_error() is None


def test_regression_weighted_mean_out_of_range_target_no_device_assert():
    """Bug: the weighted mean's denominator indexed `weight` with the raw target: an
    out-of-range class was a device-side assert (a poisoned context) instead of NaN and a
    recorded value."""
    _compiled()
    softmax_ce.cuda_take_target_error()
    x = torch.randn(4, 5, device="cuda", requires_grad=True)
    w = torch.rand(5, device="cuda") + 0.5
    loss = softmax_ce.cross_entropy(x, torch.tensor([0, 1, 9, 2], device="cuda"), w)
    loss.backward()
    assert torch.isnan(loss)
    assert softmax_ce.cuda_take_target_error() == 9
    t = torch.tensor([0, 1, 3, 2], device="cuda")  # the context is healthy afterwards
    torch.testing.assert_close(softmax_ce.cross_entropy(x, t, w), F.cross_entropy(x, t, w))


@pytest.mark.parametrize("C", [5, 40000])  # 40000: the fused kernel's cluster of blocks
def test_out_of_range_target_in_a_fused_mean(C):
    """An out-of-range class in the fused forward+backward (mean): a NaN loss, a NaN gradient row
    where the class is bad, the others as torch's, and the value recorded."""
    _compiled()
    softmax_ce.cuda_take_target_error()
    x = torch.randn(3, C, device="cuda", requires_grad=True)
    t = torch.tensor([0, C + 4, 2], device="cuda")
    loss = softmax_ce.cross_entropy(x, t, reduction="sum")
    loss.backward()
    assert torch.isnan(loss)
    assert softmax_ce.cuda_take_target_error() == C + 4
    assert torch.isnan(x.grad[1]).all()
    xr = x.detach()[[0, 2]].requires_grad_()
    F.cross_entropy(xr, t[[0, 2]], reduction="sum").backward()
    torch.testing.assert_close(x.grad[[0, 2]], xr.grad)


def test_steady_state_step_does_not_synchronise(tmp_path):
    """A training step's steady state on CUDA makes no host synchronisation: the fused loss, the
    fused head, and both over a process group (NCCL at world size 1; the first calls agree on
    the headers and cache the device constants). The results match the single-device ones."""
    import torch.distributed as dist

    require_compiled("cuda")
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(64, 1000, device="cuda", generator=g, requires_grad=True)
        h = torch.randn(64, 32, device="cuda", generator=g, requires_grad=True)
        W = torch.randn(1000, 32, device="cuda", generator=g, requires_grad=True)
        t = torch.randint(0, 1000, (64,), device="cuda", generator=g)
        group = dist.group.WORLD

        def step():
            losses = [softmax_ce.cross_entropy(x, t, label_smoothing=0.1),
                      softmax_ce.linear_cross_entropy(h, W, t),
                      softmax_ce.cross_entropy(x, t, label_smoothing=0.1, process_group=group),
                      softmax_ce.linear_cross_entropy(h, W, t, process_group=group)]
            for loss in losses:
                loss.backward()
            return torch.stack([loss.detach() for loss in losses])

        first = step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steady = step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.testing.assert_close(steady, first)
        torch.testing.assert_close(steady[2], steady[0])
        torch.testing.assert_close(steady[3], steady[1])
    finally:
        dist.destroy_process_group()
