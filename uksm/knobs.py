"""The pool's knobs and sizes, checked where they are given.

A knob of /sys/kernel/mm/ksm is a file the kernel parses and refuses:
echo -1 > pages_to_scan fails with EINVAL and nothing changes.  A pool's
knobs are keywords and attributes instead, and they get the same
treatment here, once, for the constructor and the setters alike: a wrong
type is a TypeError, a value out of range (negative, NaN, infinite,
beyond the C core's unsigned int) a ValueError naming the knob, before
anything reaches the scanner or the C core.  Sizes (capacity,
max_resident, swap_batch...) are parsed by parse_size(), the one reading
of "512MiB" the whole package shares (uksm.parse_size).

Nothing here knows a pool: these are pure functions of their arguments,
at the bottom of the package's imports.
"""

from __future__ import annotations

import fractions
import math
import re
from typing import Any, Optional, TypedDict

import numpy as np

# Every unit is 1024-based, whatever its spelling, as systemd and docker
# read memory sizes: a user writing "1GB" for a memory limit means 1 GiB far
# more often than 10**9 bytes, and one reading keeps "1G" and "1GB" equal.
_UNIT_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(
    r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:([kmgtpe])(?:i?b)?|b)?\s*", re.IGNORECASE
)
_SIZE_EXAMPLES = "e.g. 4096, '512k', '64MiB', '1.5GiB' or '2 TB'"


class Knobs(TypedDict):
    """A pool's knobs, checked: what Pool keeps and the scanner reads (the
    sysfs files of /sys/kernel/mm/ksm, and uksm's own)."""

    pages_to_scan: int
    sleep_millisecs: int
    max_page_sharing: int
    use_zero_pages: bool
    smart_scan: bool
    checksum: str
    advisor_mode: str
    advisor_target_scan_time: float
    advisor_min_pages_to_scan: int
    advisor_max_pages_to_scan: int
    advisor_max_cpu: int
    compact_threshold: float
    map_count_reserve: Optional[int]


# The C core's knobs are unsigned int, as the kernel's sysfs files are.
_UINT_MAX = (1 << 32) - 1


def parse_size(value: Any, what: str = "size") -> int:
    """Bytes from an int or a size string such as "512MiB".

    A string is a number (a decimal fraction is allowed) and an optional
    unit, case-insensitive, with optional space between: B, K, M, G, T, P,
    E, each also spelt KB/KiB, MB/MiB and so on.  Every unit is 1024-based,
    as systemd and docker read them: "1GB" == "1G" == "1GiB" == 2**30 bytes,
    "2TB" is 2 * 2**40.  A fraction is rounded up to whole bytes
    ("1.5k" is 1536, "0.1k" is 103).  The result must be positive.
    """
    if isinstance(value, bool):
        raise TypeError(
            f"{what} must be an int or a size string ({_SIZE_EXAMPLES}), not bool {value!r}"
        )
    if isinstance(value, (int, np.integer)):
        size = int(value)
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if not m:
            raise ValueError(
                f"{what}: cannot parse {value!r} as a size: give a positive "
                f"number of bytes and an optional unit B, K, M, G, T, P or E "
                f"(KB and KiB alike are 1024), {_SIZE_EXAMPLES}"
            )
        shift = _UNIT_SHIFT[(m.group(2) or "").lower()]
        # exact arithmetic: float would round "1.1E" to a few hundred bytes off
        size = math.ceil(fractions.Fraction(m.group(1)) * (1 << shift))
    else:
        raise TypeError(
            f"{what} must be an int or a size string ({_SIZE_EXAMPLES}), "
            f"not {type(value).__name__} {value!r}"
        )
    if size <= 0:
        raise ValueError(f"{what} must be a positive number of bytes, got {value!r}")
    return size


def _int_knob(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    allowed = f"an int in [{minimum}, {maximum}]" if maximum is not None else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        # floats too, NaN and infinity among them: a page count is whole
        raise TypeError(f"{name} must be {allowed}, not {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def _uint_knob(name: str, value: Any, minimum: int) -> int:
    return _int_knob(name, value, minimum, _UINT_MAX)


def _max_sharing_knob(name: str, value: Any) -> int:
    # swap counts a slot's mappers in 16 bits (csrc/swap.c swap_map)
    return _int_knob(name, value, 2, 65535)


def _bool_knob(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, not {value!r}")


def _float_knob(name: str, value: Any, allowed: str) -> float:
    """A finite real number (NaN compares false with everything, so it
    would pass any range check and poison the scanner's arithmetic)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be {allowed}, not {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def _scan_time_knob(name: str, value: Any) -> float:
    allowed = "a finite number of seconds > 0"
    v = _float_knob(name, value, allowed)
    if v <= 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v


def _cpu_knob(name: str, value: Any) -> int:
    # a share of one CPU, in percent, as the kernel's advisor_max_cpu
    return _int_knob(name, value, 1, 100)


def _map_count_reserve_knob(name: str, value: Any) -> Optional[int]:
    # mappings, as vm.max_map_count counts them (an int sysctl)
    return None if value is None else _int_knob(name, value, 0, 2**31 - 1)


def _compact_threshold_knob(name: str, value: Any) -> float:
    allowed = "0 (off) or a finite ratio >= 1"
    v = _float_knob(name, value, allowed)
    if v != 0 and v < 1:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return v
