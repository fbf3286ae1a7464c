"""softmax_ce.patch(): torch.nn.functional.cross_entropy and torch.nn.CrossEntropyLoss routed
through softmax_ce, as a call and as a context manager; torch's results; a third-party-style
training loop gets ours."""

import pytest
import torch

import softmax_ce

TORCH_CE = torch.nn.functional.cross_entropy  # torch's own, bound before any patch


@pytest.fixture(autouse=True)
def _restore():
    yield
    softmax_ce.unpatch()
    assert torch.nn.functional.cross_entropy is TORCH_CE


def _ours(loss) -> bool:
    """Whether a loss came from softmax_ce's autograd.Functions (or the host path's C++ node)."""
    fns = [loss.grad_fn] + [f for f, _ in loss.grad_fn.next_functions if f is not None]
    return any("CrossEntropyFunction" in type(f).__name__ or "HostCeFunction" in f.name()
               for f in fns)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(16, 10, generator=g, requires_grad=True),
            torch.randint(0, 10, (16,), generator=g))


def third_party_step(model, x, y):
    """As a library we don't own writes it: the function looked up at each call."""
    return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)


def test_context_manager_routes_function_and_module():
    x, t = _problem()
    assert not _ours(torch.nn.functional.cross_entropy(x, t))
    with softmax_ce.patch():
        assert softmax_ce.is_patched()
        loss = torch.nn.functional.cross_entropy(x, t, reduction="sum", label_smoothing=0.2)
        assert _ours(loss)
        torch.testing.assert_close(loss, TORCH_CE(x, t, reduction="sum", label_smoothing=0.2))
        module_loss = torch.nn.CrossEntropyLoss(ignore_index=3)(x, t)
        assert _ours(module_loss)
        torch.testing.assert_close(module_loss, TORCH_CE(x, t, ignore_index=3))
        (g,) = torch.autograd.grad(module_loss, x)
        (g_ref,) = torch.autograd.grad(TORCH_CE(x, t, ignore_index=3), x)
        torch.testing.assert_close(g, g_ref)
    assert not softmax_ce.is_patched()
    assert torch.nn.functional.cross_entropy is TORCH_CE


def test_call_form_nesting_and_exceptions():
    softmax_ce.patch()
    with softmax_ce.patch():
        assert torch.nn.functional.cross_entropy is not TORCH_CE
    assert torch.nn.functional.cross_entropy is not TORCH_CE  # the outer call's patch holds
    softmax_ce.unpatch()
    assert torch.nn.functional.cross_entropy is TORCH_CE
    with pytest.raises(ZeroDivisionError):
        with softmax_ce.patch():
            1 / 0
    assert torch.nn.functional.cross_entropy is TORCH_CE


def test_errors_are_torchs():
    x, t = _problem()
    with softmax_ce.patch():
        with pytest.raises(ValueError):
            torch.nn.functional.cross_entropy(x, t, reduction="avg")
        with pytest.raises(IndexError):
            torch.nn.functional.cross_entropy(x, torch.full_like(t, 10))


def test_third_party_training_loop_gets_ours_with_torchs_results():
    def train(patched):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(64, 10)
        y = torch.randint(0, 5, (64,))
        losses, used = [], []
        for _ in range(5):
            if patched:
                with softmax_ce.patch():
                    loss = third_party_step(model, x, y)
            else:
                loss = third_party_step(model, x, y)
            used.append(_ours(loss))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, used, [p.detach().clone() for p in model.parameters()]

    ours, used_ours, params_ours = train(True)
    theirs, used_theirs, params_theirs = train(False)
    assert all(used_ours) and not any(used_theirs)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs))
    for a, b in zip(params_ours, params_theirs):
        torch.testing.assert_close(a, b)


def test_torch_function_overrides_go_to_torch():
    calls = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x, t = _problem()
    with softmax_ce.patch():
        loss = torch.nn.functional.cross_entropy(x.detach().as_subclass(Logged), t)
    assert calls  # the override was consulted, as without the patch
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), TORCH_CE(x.detach(), t))


def test_dtensor_arguments_give_torchs_result():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        x, t = _problem()
        xd = distribute_tensor(x.detach(), mesh, [Replicate()])
        td = distribute_tensor(t, mesh, [Replicate()])
        with softmax_ce.patch():
            loss = torch.nn.functional.cross_entropy(xd, td)
        torch.testing.assert_close(loss.full_tensor(), TORCH_CE(x.detach(), t))
    finally:
        dist.destroy_process_group()


def test_a_device_without_compiled_kernels_goes_to_torch_with_one_warning(monkeypatch):
    """Where the compiled kernels do not serve a device (a GPU without the CUDA kernels built),
    the pure-PyTorch reference would be slower than torch: patch() sends those calls to torch's
    function and says so once per device type."""
    import importlib

    from softmax_ce import ops

    patch_module = importlib.import_module("softmax_ce.patch")  # softmax_ce.patch: the function

    monkeypatch.setattr(patch_module, "_compiled", {})
    monkeypatch.setattr(ops, "implementation", lambda device, per_op=False: "reference")
    x, t = _problem()
    with softmax_ce.patch():
        with pytest.warns(RuntimeWarning, match="no compiled kernels for cpu"):
            loss = torch.nn.functional.cross_entropy(x, t)
        assert not _ours(loss)
        torch.testing.assert_close(loss, TORCH_CE(x, t), rtol=0, atol=0)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: no second warning
            assert not _ours(torch.nn.functional.cross_entropy(x, t))
    monkeypatch.setattr(patch_module, "_compiled", {})
    monkeypatch.undo()
    with softmax_ce.patch():  # the kernels there: ours
        assert _ours(torch.nn.functional.cross_entropy(x, t))
