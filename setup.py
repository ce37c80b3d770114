# The only reason for setup.py: cffi_modules compiles the C core (csrc/) into
# uksm._native during both `pip install .` and `pip install -e .`.
from setuptools import setup

setup(cffi_modules=["csrc/build_native.py:ffibuilder"])
