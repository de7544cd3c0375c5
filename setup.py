# Builds leakycuda._C: the C++ CPU ops and the device-generic (ATen) ops always, the CUDA kernels when torch
# itself has CUDA and nvcc matches it.
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_version():
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda():
    """CUDA sources are built only when torch has CUDA and nvcc's major version matches it."""
    if _flag("LEAKYCUDA_FORCE_CPU"):
        return False, "LEAKYCUDA_FORCE_CPU is set"
    nvcc = _nvcc_version()
    if _flag("LEAKYCUDA_FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit("LEAKYCUDA_FORCE_CUDA=1 but this torch (%s) has no CUDA; install a CUDA build "
                     "of torch first" % torch.__version__)
        return True, "LEAKYCUDA_FORCE_CUDA is set"
    if torch.version.cuda is None:
        return False, "torch %s is a CPU build" % torch.__version__
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME)"
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc[0] != torch_major:
        return False, "nvcc %d.%d does not match torch's CUDA %s" % (nvcc + (torch.version.cuda,))
    return True, "torch CUDA %s, nvcc %d.%d" % ((torch.version.cuda,) + nvcc)


# Where the generated CUDA compile units go (csrc/gen_units.py): the build directory, never the sources.
UNITS_DIR = os.path.join("build", "leakycuda_units")


def _gen_units():
    spec = importlib.util.spec_from_file_location("leakycuda_gen_units", os.path.join(HERE, "csrc", "gen_units.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_sources(with_cuda, units_dir=UNITS_DIR):
    """The sources of leakycuda._C: the op library, the CPU and device-generic code; with CUDA also the
    launchers (csrc/cuda/*.cu) and one generated unit per (storage type, activation) of the leaky stack's
    instance list, written into units_dir."""
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/generic/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        sources += [os.path.join(units_dir, os.path.basename(p)) for p in _gen_units().write("launch", units_dir)]
    return sources


def extension(with_cuda):
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if with_cuda:
        return CUDAExtension(
            "leakycuda._C",
            extension_sources(True),
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("LEAKYCUDA_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "leakycuda._C",
        extension_sources(False),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


class Build(BuildExtension):
    """Builds the extension, then records what it was built against in leakycuda/_build_info.py."""

    with_cuda = False

    def run(self):
        super().run()
        info = {
            "torch_version": torch.__version__,
            "cuda_version": torch.version.cuda if self.with_cuda else None,
            "with_cuda": self.with_cuda,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if self.with_cuda else None,
        }
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("leakycuda._C")), "_build_info.py")
        with open(target, "w") as f:
            f.write("# Written by setup.py: what leakycuda._C was built against.\n")
            for k, v in info.items():
                f.write("%s = %r\n" % (k, v))


if __name__ == "__main__":  # as pip and `python setup.py` run it; tests import it for extension_sources
    Build.with_cuda, why = _want_cuda()
    print("leakycuda: building %s kernels (%s)" % ("CPU and CUDA" if Build.with_cuda else "CPU", why))
    setup(ext_modules=[extension(Build.with_cuda)], cmdclass={"build_ext": Build})
