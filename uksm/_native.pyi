# The compiled C core, built by csrc/build_native.py (cffi, API mode).
# Only uksm._core touches it; see csrc/uksm.h for every function.
from typing import Any

ffi: Any
lib: Any
