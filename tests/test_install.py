"""Installing: a build without torch stops with the one-line fix (never a package silently
without its kernels), metadata needs no torch, and an install without kernels says so at import
and in `info` (unless it was built without them on purpose)."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import softmax_ce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# setup.py run as pip's build backend would run it, in a process where torch does not import
NO_TORCH_SETUP = (
    "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py'] + sys.argv[1:]; "
    "runpy.run_path('setup.py', run_name='__main__')"
)


def _setup(*args, env=None):
    return subprocess.run([sys.executable, "-c", NO_TORCH_SETUP, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("command", ["bdist_wheel", "build_ext", "install"])
def test_a_build_without_torch_stops_with_the_fix(command):
    run = _setup(command)
    assert run.returncode != 0
    assert "torch is not importable" in run.stderr
    assert "pip install --no-build-isolation" in run.stderr


# setup.py where torch imports as a stand-in of the given version (the range check comes first)
FAKE_TORCH_SETUP = (
    "import runpy, sys, types; torch = types.ModuleType('torch'); torch.__version__ = sys.argv[1]; "
    "sys.modules['torch'] = torch; sys.argv = ['setup.py'] + sys.argv[2:]; "
    "runpy.run_path('setup.py', run_name='__main__')"
)


@pytest.mark.parametrize("version", ["2.6.0+cu124", "2.7.1", "2.16.0", "3.0.0"])
def test_a_build_against_a_torch_outside_the_range_stops_with_the_range(version):
    env = {k: v for k, v in os.environ.items() if k != "SOFTMAX_CE_ANY_TORCH"}
    run = subprocess.run([sys.executable, "-c", FAKE_TORCH_SETUP, version, "build_ext"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode != 0
    assert f"this environment has torch {version}; softmax_ce supports torch>=" in run.stderr
    assert "pip install 'torch>=" in run.stderr


def test_metadata_needs_no_torch(tmp_path):
    run = _setup("-q", "egg_info", "--egg-base", str(tmp_path))
    assert run.returncode == 0, run.stderr
    (info,) = [p for p in os.listdir(tmp_path) if p.endswith(".egg-info")]
    with open(tmp_path / info / "PKG-INFO") as f:
        meta = f.read()
    assert "License-Expression: BSD-3-Clause" in meta
    assert "Requires-Dist: torch" in meta


def _copy_package(tmp_path, extra=None):
    """softmax_ce's Python files (no compiled module) where no setup.py is beside them, with
    `extra` {file name: text} added."""
    dest = tmp_path / "site" / "softmax_ce"
    shutil.copytree(os.path.join(ROOT, "softmax_ce"), dest,
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__",
                                                  "_no_extension.py"))
    for name, text in (extra or {}).items():
        (dest / name).write_text(text)
    return tmp_path / "site"


def _import(site, code="import softmax_ce"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTMAX_CE_")}
    env["PYTHONPATH"] = str(site)
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", code],
                          cwd=str(site), capture_output=True, text=True, timeout=300, env=env)


def test_an_install_without_kernels_warns_at_import_with_the_command(tmp_path):
    site = _copy_package(tmp_path)
    run = _import(site, "import softmax_ce, torch; print(softmax_ce.__file__); "
                        "print(softmax_ce.cross_entropy(torch.zeros(2, 4), torch.tensor([0, 1])))")
    assert run.returncode == 0, run.stderr
    assert str(site) in run.stdout  # the copy, not the checkout
    assert "tensor(1.3863)" in run.stdout  # log(4): the reference serves
    assert "RuntimeWarning" in run.stderr and "compiled kernels are missing" in run.stderr
    assert "pip install --no-build-isolation" in run.stderr
    info = _import(site, "import warnings; warnings.simplefilter('ignore'); "
                         "from softmax_ce.__main__ import main; main(['info'])")
    assert "extension: not loaded" in info.stdout
    assert "to build the kernels against this torch: pip install --no-build-isolation" \
        in info.stdout


def test_a_kernel_module_that_does_not_load_is_named(tmp_path):
    import sysconfig

    name = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    site = _copy_package(tmp_path, {name: "not a shared object"})
    run = _import(site)
    assert run.returncode == 0, run.stderr
    assert f"{name} does not load with torch" in run.stderr
    assert "pip install --no-build-isolation" in run.stderr


def test_an_install_without_kernels_on_purpose_is_quiet(tmp_path):
    site = _copy_package(tmp_path, {"_no_extension.py": '"""on purpose"""\n'})
    run = _import(site, "import softmax_ce; print(softmax_ce.build_info()['extension_error'])")
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr
    assert "SOFTMAX_CE_SKIP_EXTENSION=1" in run.stdout


def test_disabled_on_purpose_is_quiet(tmp_path):
    site = _copy_package(tmp_path)
    env_code = ("import os; os.environ['SOFTMAX_CE_DISABLE_EXTENSION'] = '1'; import softmax_ce; "
                "print(softmax_ce.build_info()['extension_error'])")
    run = _import(site, env_code)
    assert run.returncode == 0, run.stderr
    assert "RuntimeWarning" not in run.stderr and "SOFTMAX_CE_DISABLE_EXTENSION" in run.stdout


def test_a_device_the_kernels_do_not_serve_is_told_once(monkeypatch):
    """With the extension loaded but without kernels for a device type (a GPU, an extension built
    without CUDA), the reference serves that device: its first call warns once, and the values
    are the reference's. The dispatcher reaches the reference kernel only for such a device, so
    the test calls that kernel as the dispatcher would, with the kernel lookup saying none."""
    from softmax_ce import ops

    assert ops._extension_module() is softmax_ce._C
    monkeypatch.setattr(ops, "_extension_module", lambda: object())  # loaded, whether built or not
    monkeypatch.setattr(ops, "_noticed", set())
    monkeypatch.setattr(ops, "_has_compiled_kernel", lambda name, key: False)
    logits = torch.randn(5, 7, 1, dtype=torch.float64)
    target = torch.randint(0, 7, (5, 1))
    fwd = ops._REFERENCE_KERNELS["ce_fwd"]
    with pytest.warns(RuntimeWarning, match="no kernels for cpu tensors.*softmax_ce info"):
        loss, _ = fwd(logits, target, None, -100, 0.0, 0.0, 0.0)
    torch.testing.assert_close(loss[:, 0], torch.nn.functional.cross_entropy(
        logits[..., 0], target[:, 0], reduction="none"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device type, whichever op
        fwd(logits, target, None, -100, 0.0, 0.0, 0.0)
        ops._REFERENCE_KERNELS["softmax_fwd"](logits, False)
        monkeypatch.setattr(ops, "_noticed", set())
        monkeypatch.setattr(ops, "_extension_module", lambda: None)  # missing: import told
        fwd(logits, target, None, -100, 0.0, 0.0, 0.0)


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def test_the_declared_torch_range_is_the_one_ci_tests_and_the_readme_states():
    import re

    deps = re.search(r"^dependencies = \[(.*)\]$", _read("pyproject.toml"), re.M).group(1)
    floor, below = re.search(r'"torch>=(\d+\.\d+),<(\d+\.\d+)"', deps).groups()
    ci = _read(".ci", "run")
    ci_floor = re.search(r"^TORCH_FLOOR=(\S+)$", ci, re.M).group(1)
    ci_newest = re.search(r"^TORCH_NEWEST=(\S+)$", ci, re.M).group(1)
    minor = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    # CI's floor is the declared floor's first release, its newest the last minor the range allows
    assert ci_floor == floor + ".0"
    assert minor(ci_newest) == (minor(below)[0], minor(below)[1] - 1)
    newest = "%d.%d" % minor(ci_newest)
    readme = _read("README.md")
    assert f"torch {floor} to {newest}" in readme
    assert f"torch {floor} to {newest}" in _read("docs", "build.md")
    # the set-up's own torch is inside the range
    setup_torch = re.search(r"torch==(\d+\.\d+)\.\d+", _read("scripts", "setup_env.sh")).group(1)
    assert minor(floor) <= minor(setup_torch) < minor(below)
