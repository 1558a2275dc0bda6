"""Build of the optional C kernel library of ``binarize.engine`` (everything else is in pyproject.toml).

The extension is optional: without a C compiler (or if the build fails) the package installs
anyway and the engine falls back to its pure-PyTorch path with a one-line warning.  OpenMP is
used when the compiler accepts it.  Build in place for development with
``python setup.py build_ext --inplace``.
"""
from __future__ import annotations

import glob
import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL_DIR = "binarize/engine/csrc"
# one kernel family per file (see the file map in bitconv.h), all compiled into one library
KERNEL_SOURCES = sorted(glob.glob(f"{KERNEL_DIR}/*.c"))
KERNEL_HEADERS = sorted(glob.glob(f"{KERNEL_DIR}/*.h"))
# the library's interface: everything else stays local to it (GCC exports the resolvers of
# target_clones functions shared between files even with -fvisibility=hidden)
EXPORTS_SCRIPT = "{\n  global: bz_*; PyInit__bitconv;\n  local: *;\n};\n"


def _compiler_accepts(compiler, flags: list[str]) -> bool:
    """True if ``compiler`` compiles and links a tiny OpenMP program with ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as handle:
            handle.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception:  # noqa: BLE001 - any compiler failure means "no"
            return False
    return True


class BuildKernels(build_ext):
    """Adds optimisation and OpenMP flags that fit the compiler in use."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "msvc":
            base, openmp = ["/O2", "/fp:precise"], ["/openmp"]
            link_openmp: list[str] = []
        else:
            base = ["-O3", "-std=c99", "-ffp-contract=off", "-fvisibility=hidden"]
            openmp = ["-fopenmp"]
            link_openmp = ["-fopenmp"]
        use_openmp = os.environ.get("BINARIZE_NO_OPENMP") != "1" and _compiler_accepts(self.compiler, openmp)
        link = list(link_openmp if use_openmp else [])
        if self.compiler.compiler_type == "unix" and sys.platform.startswith("linux"):
            os.makedirs(self.build_temp, exist_ok=True)
            script = os.path.join(self.build_temp, "bitconv.map")
            with open(script, "w") as handle:
                handle.write(EXPORTS_SCRIPT)
            link.append(f"-Wl,--version-script={script}")
        for ext in self.extensions:
            ext.extra_compile_args = base + (openmp if use_openmp else [])
            ext.extra_link_args = link
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "binarize.engine._bitconv",
            sources=KERNEL_SOURCES,
            depends=KERNEL_HEADERS,
            define_macros=[("BZ_PYTHON_MODULE", "1")],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildKernels},
)
