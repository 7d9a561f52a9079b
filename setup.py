"""Only the compiled attribute reader lives here; everything else is in pyproject.toml.

Optional: without a C compiler the install still succeeds and the collector uses the Python
reader (collector/scan.py), which gives the same results more slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "collector.signals._scan", ["collector/signals/_scan.c"], optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)])
