"""Build glue for the Cython ring buffer; all metadata lives in pyproject.toml.

setuptools cannot declare a cythonized extension from pyproject.toml alone, hence this file.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

ring = Extension(
    "kmnode.ring._ring",
    sources=["kmnode/ring/_ring.pyx"],
    extra_compile_args=["-O3"],
    libraries=["rt"],
)

setup(ext_modules=cythonize([ring], language_level="3", compiler_directives={"boundscheck": False}))
