# The compiled C core, built by csrc/build_native.py (cffi, API mode).
# Only uksm._core touches it (and uksm.handler, through ctypes.PyDLL, for the
# handler functions that take Python objects); see csrc/uksm.h for every function.
from typing import Any

ffi: Any
lib: Any
