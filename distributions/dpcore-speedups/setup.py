"""The extension module of dpcore-speedups (the metadata is in pyproject.toml)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("dpcore_speedups", sources=["dpcore_speedups.c"])], py_modules=[])
