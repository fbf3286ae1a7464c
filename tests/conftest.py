"""Shared fixtures: which implementation (compiled kernels or the reference) and which device."""

import os

import pytest
import torch

import softmax_ce
from softmax_ce import ops

REQUIRE_EXTENSION = os.environ.get("SOFTMAX_CE_REQUIRE_EXTENSION", "0") not in ("", "0")
DEVICES = ["cpu", "cuda"]


try:  # hypothesis profiles for tests/test_fuzz.py: "ci" by default, "long" on request
    from hypothesis import HealthCheck, settings

    # the implementation fixture is function-scoped on purpose: it holds for all examples
    _health = [HealthCheck.too_slow, HealthCheck.data_too_large,
               HealthCheck.function_scoped_fixture]
    settings.register_profile("ci", max_examples=120, deadline=None, derandomize=True,
                              print_blob=True, suppress_health_check=_health)
    settings.register_profile("long", max_examples=3000, deadline=None, print_blob=True,
                              suppress_health_check=_health)
    settings.load_profile("ci")
except ImportError:  # test_fuzz.py skips itself without hypothesis (fails where required)
    pass


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (run with -m slow)")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


def require_compiled(device):
    """Skip a test that needs the compiled kernels of a present device where they are missing;
    with SOFTMAX_CE_REQUIRE_EXTENSION=1 (CI, the README's test command) fail instead, on the CPU
    and on a GPU alike."""
    if ops.implementation(device) != "compiled":
        per_op = ops.implementation(device, per_op=True)
        missing = sorted(name for name, served in per_op.items() if served != "compiled")
        message = (f"no compiled kernels for {device} ({', '.join(missing)}): "
                   f"{softmax_ce.extension_error}")
        if REQUIRE_EXTENSION:
            pytest.fail(message)
        pytest.skip(message)


def _use_implementation(name, device):
    if name == "compiled":
        require_compiled(device)
    return ops.force_reference(name == "reference")


@pytest.fixture(params=["compiled", "reference"])
def impl(request, device):
    """Runs the test with the compiled kernels, then with the pure-PyTorch reference, on each
    device."""
    with _use_implementation(request.param, device):
        yield request.param


@pytest.fixture(params=["compiled", "reference"])
def cpu_impl(request):
    """As impl, for tests whose tensors live on the CPU."""
    with _use_implementation(request.param, "cpu"):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def hide_package(monkeypatch):
    """hide_package("matplotlib"): importing that package (or anything in it) raises ImportError
    for the rest of the test, as where it is not installed."""
    import builtins

    real_import = builtins.__import__

    def hide(package):
        def guarded_import(name, *args, **kwargs):
            if name.split(".")[0] == package:
                raise ImportError(f"No module named '{package}'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", guarded_import)

    return hide
