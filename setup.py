"""Builds the compiled kernels only; all metadata lives in pyproject.toml."""

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_TEST = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _openmp_flags(compiler):
    """``-fopenmp`` when this C compiler builds and links an OpenMP program, else ``None``.

    Without OpenMP (e.g. Apple's clang) the kernels still build; their ``prange`` loops then
    run on one thread.
    """
    if os.environ.get("MICA_NO_OPENMP"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_test.c")
        with open(src, "w") as fh:
            fh.write(OPENMP_TEST)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(tmp, "omp_test"),
                                     extra_postargs=["-fopenmp"])
        except Exception:  # CompileError, LinkError: no OpenMP here
            return None
    return ["-fopenmp"]


class BuildExtWithClearErrors(build_ext):
    """Fail the install with one clear message when the kernels cannot be compiled, and
    build them with OpenMP where the compiler has it.

    mica never falls back to slower code at run time because a build went wrong.
    """

    def build_extensions(self):
        flags = _openmp_flags(self.compiler)
        for ext in self.extensions:
            if flags:
                ext.extra_compile_args = list(ext.extra_compile_args) + flags
                ext.extra_link_args = list(ext.extra_link_args) + flags
            ext.define_macros = list(ext.define_macros) + [
                ("MICA_OPENMP", "1" if flags else "0")]
        if not flags:
            sys.stderr.write("mica: the C compiler has no OpenMP; the kernels will run on one "
                             "thread\n")
        super().build_extensions()

    def run(self):
        try:
            super().run()
        except Exception as exc:  # CompileError, missing compiler, missing headers
            sys.stderr.write(
                "\nerror: mica could not compile its Cython kernels (kernels/_ext.pyx).\n"
                "A C compiler and the Python development headers are required "
                "(Debian/Ubuntu: apt-get install gcc python3-dev).\n"
                f"Cause: {exc}\n\n")
            raise


def extensions():
    import numpy
    from Cython.Build import cythonize

    ext = Extension(
        "mica_core._ext",
        ["kernels/_ext.pyx"],
        include_dirs=[numpy.get_include()],
        extra_compile_args=["-O3"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    return cythonize([ext], compiler_directives={"language_level": "3"})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtWithClearErrors})
