"""Builds softmax_ce._C (CPU kernels always, CUDA kernels when CUDA is usable or forced).

Environment switches (all optional):
  SOFTMAX_CE_SKIP_EXTENSION=1  build nothing: the package runs on its pure-PyTorch reference
  SOFTMAX_CE_FORCE_CUDA=1      build the CUDA kernels even without a visible GPU (needs nvcc)
  SOFTMAX_CE_SKIP_CUDA=1       never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST         CUDA architectures, e.g. "8.0;9.0" (torch's own variable)
  SOFTMAX_CE_DEBUG=1           -O0 -g, and device debug info for CUDA
  MAX_JOBS                     parallel compile jobs (torch's own variable)
  SOFTMAX_CE_ANY_TORCH=1       build against a torch outside the supported range (untested)

torch must be importable at build time, so that the kernels are built against the torch that
will load them:

    pip install --no-build-isolation .

pip's default build runs in an isolated environment without torch; such a build of a wheel stops
here with that one-line fix rather than producing a package without its kernels. A package on
purpose without them (the pure-PyTorch reference serves every op, slower):
SOFTMAX_CE_SKIP_EXTENSION=1 pip install . (the import then says nothing about them). Metadata and
source distributions need no torch.
"""

import glob
import os
import platform
import re
import sys

import setuptools
from setuptools import find_packages, setup

# pyproject.toml's SPDX license needs setuptools 77; without build isolation the build uses the
# environment's setuptools (a new venv of Python 3.11 has 65.5), whose error would be a page of
# schema
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(
        f"\nsoftmax_ce: building needs setuptools>=77 (this environment has "
        f"{setuptools.__version__}): pip install -U 'setuptools>=77' wheel\n"
    )

HERE = os.path.dirname(os.path.abspath(__file__))

# Per-ISA CPU kernel variants (ATen's CPU_CAPABILITY convention): these files are compiled alone
# with their own flags and chosen at run time, so a CPU without AVX-512 never runs AVX-512 code.
# -ffp-contract=off: a multiply and an add are fused only where the code says so (fmadd), so one
# formula written in two kernels (the fused forward+backward and the backward) rounds the same way
# whatever the compiler inlines: the gradient they give is the same bits.
ISA_FLAGS = {
    "csrc/cpu/isa_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-ffp-contract=off",
                              "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "csrc/cpu/isa_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2",
                                "-mfma", "-mf16c", "-ffp-contract=off", "-DCPU_CAPABILITY=AVX512",
                                "-DCPU_CAPABILITY_AVX512"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# setup.py commands that build or install the package (not metadata or a source distribution)
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "develop", "editable_wheel",
                  "install"}

NO_TORCH = """
softmax_ce: cannot build its compiled kernels: torch is not importable in this build
environment (pip builds in an isolated environment unless told otherwise). Build them against
the torch you have installed:

    pip install --no-build-isolation <this source, e.g. . or ".[hf]">

(or, for the pure-PyTorch package without compiled kernels, slower:
SOFTMAX_CE_SKIP_EXTENSION=1 pip install ...)
"""


def skipped_build_py():
    """build_py that also writes softmax_ce/_no_extension.py into the built package."""
    from setuptools.command.build_py import build_py

    class BuildPy(build_py):
        def run(self):
            super().run()
            if getattr(self, "editable_mode", False):  # the source tree itself: no marker in it
                return
            path = os.path.join(self.build_lib, "softmax_ce", "_no_extension.py")
            with open(path, "w") as f:
                f.write('"""Built with SOFTMAX_CE_SKIP_EXTENSION=1: no compiled kernels, on '
                        'purpose."""\n')

    return BuildPy


def torch_range():
    """(floor, first release not supported), e.g. ("2.8", "2.16"), from pyproject.toml's
    dependency on torch: the one place the range is written."""
    with open(os.path.join(HERE, "pyproject.toml")) as f:
        match = re.search(r'"torch>=([0-9.]+),<([0-9.]+)"', f.read())
    return match.group(1), match.group(2)


def check_torch_version(version):
    """Stop a build against a torch outside the declared range: pip would then replace that torch
    to satisfy the dependency, and kernels built against the old one would not load in the new."""
    if flag("SOFTMAX_CE_ANY_TORCH"):
        return
    floor, below = torch_range()
    release = tuple(int(p) for p in re.match(r"(\d+)\.(\d+)", version).groups())
    as_tuple = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    if not as_tuple(floor) <= release < as_tuple(below):
        raise SystemExit(
            f"\nsoftmax_ce: this environment has torch {version}; softmax_ce supports "
            f"torch>={floor},<{below} (tested at both ends). Install a supported torch first, "
            "e.g.\n\n"
            f"    pip install 'torch>={floor},<{below}'\n\n"
            "then build again (SOFTMAX_CE_ANY_TORCH=1 builds against it anyway, untested).\n"
        )


def extensions():
    if flag("SOFTMAX_CE_SKIP_EXTENSION"):
        print("softmax_ce: SOFTMAX_CE_SKIP_EXTENSION set, building no extension")
        return [], {"build_py": skipped_build_py()}
    building = any(arg in BUILD_COMMANDS for arg in sys.argv[1:])
    try:
        import torch
    except ImportError:
        if building:
            raise SystemExit(NO_TORCH) from None
        return [], {}  # metadata or a source distribution: no torch needed
    if building:
        check_torch_version(torch.__version__)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = flag("SOFTMAX_CE_DEBUG")
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    cxx += ["-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-sign-compare", "-Wno-unknown-pragmas", "-Wno-psabi",
            "-Wno-maybe-uninitialized"]
    sources = sorted(glob.glob("csrc/module.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))

    if flag("SOFTMAX_CE_SKIP_CUDA"):
        with_cuda = False
    elif flag("SOFTMAX_CE_FORCE_CUDA"):
        with_cuda = True
    else:
        with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and \
            torch.cuda.is_available()
    kwargs = dict(
        name="softmax_ce._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda and cuda_sources:
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "--extended-lambda",
                "-DSOFTMAX_CE_WITH_CUDA"]
        if debug:
            nvcc = ["-O0", "-g", "-G", "--expt-relaxed-constexpr", "--extended-lambda",
                    "-DSOFTMAX_CE_WITH_CUDA"]
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DSOFTMAX_CE_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
        print(f"softmax_ce: building CPU and CUDA kernels "
              f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})")
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
        print("softmax_ce: building CPU kernels")
    class Build(BuildExtension):
        """torch's BuildExtension, plus per-file ISA flags for the CPU kernel variants."""

        def build_extension(self, ext):
            objects = []
            for source, isa_flags in ISA_FLAGS.items():
                if not X86 or source not in ext.sources:
                    continue
                ext.sources.remove(source)
                args = dict(ext.extra_compile_args)
                args["cxx"] = list(args["cxx"]) + isa_flags
                objects += self.compiler.compile(
                    [source], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args,
                    depends=ext.depends,
                )
            ext.extra_objects = objects + list(ext.extra_objects or [])
            super().build_extension(ext)

    return [ext], {"build_ext": Build}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["softmax_ce", "softmax_ce.*"]),
    package_data={"softmax_ce": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
