"""Builds the compiled kernels only; all metadata lives in pyproject.toml."""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtWithClearErrors(build_ext):
    """Fail the install with one clear message when the kernels cannot be compiled.

    mica never falls back to slower code at run time because a build went wrong.
    """

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
