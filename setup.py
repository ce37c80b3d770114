# The only reason for setup.py: cffi_modules compiles the C core (csrc/) into
# uksm._native, and the benchmark harness's timed loops (csrc/bench/) into
# uksm.bench._swaphelper, during both `pip install .` and `pip install -e .`.
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder", "csrc/build_bench.py:ffibuilder"])
