"""The extension module of dpcore-speedups (the metadata is in pyproject.toml)."""

from setuptools import Extension, setup

SOURCES = ["dpcore_speedups.c", "msgpack_read.c", "lines.c", "hold.c"]

setup(ext_modules=[Extension("dpcore_speedups", sources=SOURCES, depends=["records.h"])], py_modules=[])
