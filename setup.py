"""Builds the compiled drafting core; everything else is declared in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

setup(
    ext_modules=[
        Pybind11Extension(
            "quickdraft.suffix_cache._core",
            ["suffix_cache/_core.cpp"],
            include_dirs=["suffix_cache"],
            depends=["suffix_cache/csrc/ngram_table.h"],
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]
)
