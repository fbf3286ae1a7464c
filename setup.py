"""Builds softmax_ce._C (CPU kernels always, CUDA kernels when CUDA is usable or forced).

Environment switches (all optional):
  SOFTMAX_CE_SKIP_EXTENSION=1  build nothing: the package runs on its pure-PyTorch reference
  SOFTMAX_CE_FORCE_CUDA=1      build the CUDA kernels even without a visible GPU (needs nvcc)
  SOFTMAX_CE_SKIP_CUDA=1       never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST         CUDA architectures, e.g. "8.0;9.0" (torch's own variable)
  SOFTMAX_CE_DEBUG=1           -O0 -g, and device debug info for CUDA
  MAX_JOBS                     parallel compile jobs (torch's own variable)

torch must be importable at build time: pip install --no-build-isolation -e .
"""

import glob
import os
import platform

from setuptools import find_packages, setup

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


def extensions():
    if flag("SOFTMAX_CE_SKIP_EXTENSION"):
        print("softmax_ce: SOFTMAX_CE_SKIP_EXTENSION set, building no extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("softmax_ce: torch is not importable at build time, building no extension "
              "(use pip install --no-build-isolation)")
        return [], {}

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
