"""csrc/xxh3.c, our own XXH3_64bits, against answers from the reference.

The file is compiled on its own with the system C compiler into a small
shared library in a temporary directory and called through ctypes, so this
needs neither the built uksm._native nor xxhash.h.  The expected values were
computed with the reference XXH3_64bits() (xxhash 0.8.1, XXH_INLINE_ALL,
seed 0) on the byte pattern of pattern() below, one length from each of the
algorithm's paths and both sides of every boundary between them.

Each build variant is checked: the default one (on x86-64 the AVX2 loop
where the CPU has it, else the SSE2 one), the SSE2 loop on its own, the
plain 64-bit loop every other architecture gets, and that one again with
the 128-bit multiply done in 32-bit halves, for compilers without __int128.
"""

import ctypes
import os
import random
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

# (length, XXH3_64bits(pattern(length))) from the reference implementation.
KNOWN = [
    (0, 0x2D06800538D394C2),
    (1, 0x8A21D78B1538B1C0),
    (2, 0xA020A917C68E5888),
    (3, 0x5F1FA6D2A3AA5A3B),
    (4, 0xA8A9B82C81542A43),
    (8, 0x67B8F67A80D308A6),
    (9, 0x7DF166798FE37670),
    (16, 0xC0967FEE676A5837),
    (17, 0xBC307578D06E9D93),
    (32, 0xFFDAE7523DD0DAEC),
    (33, 0x27B514591EF37D2D),
    (64, 0x2C6E0B294ABFC3F0),
    (65, 0x31D8DB1918167D5C),
    (96, 0x1EBAB520F4C1E5AF),
    (97, 0x4A2CFEE5178BDE3C),
    (128, 0xA45617BFE9BB88D6),
    (129, 0x4CA31F6B2CFD9A3E),
    (200, 0x96C004E238C9B788),
    (240, 0x2817ED3CDF9547E7),
    (241, 0x02F838DD48200EE8),
    (1000, 0xA60D289B5941235A),
    (1024, 0xCF540FAB21A7C450),
    (1025, 0x644352A0F6E9BD3A),
    (4096, 0xFADB3EEE982A1F2B),
    (8192, 0x910783B27B230E0F),
]

# XXH3_64bits(pattern(4097)[1:]): a page that starts one byte off alignment.
KNOWN_UNALIGNED_PAGE = 0x433FF1159C29E42A

VARIANTS = {
    "default": [],
    "sse2": ["-DUKSM_XXH3_NO_AVX2"],
    "scalar": ["-DUKSM_XXH3_SCALAR"],
    "scalar-no-int128": ["-DUKSM_XXH3_SCALAR", "-DUKSM_XXH3_NO_INT128"],
}


def pattern(n: int) -> bytes:
    """Deterministic bytes; the (i >> 8) term keeps pages from repeating every 256 bytes."""
    return bytes((i * 167 + (i >> 8) + 13) & 0xFF for i in range(n))


def find_cc():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(variant: str, outdir):
    """Compile csrc/xxh3.c alone as @variant; return uksm_xxh3_64 as a callable."""
    cc = find_cc()
    if cc is None:
        pytest.skip("no C compiler found (cc, gcc, clang or $CC) to build csrc/xxh3.c")
    out = outdir / f"libxxh3-{variant}.so"
    cmd = [
        cc,
        "-O2",
        "-std=gnu11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-shared",
        "-fPIC",
        *VARIANTS[variant],
        "-I",
        CSRC,
        os.path.join(CSRC, "xxh3.c"),
        "-o",
        str(out),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    fn = ctypes.CDLL(str(out)).uksm_xxh3_64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_uint64

    def call(data: bytes, offset: int = 0) -> int:
        # A private buffer, so the hash reads from a known alignment.
        buf = ctypes.create_string_buffer(offset + len(data) + 1)
        ctypes.memmove(ctypes.addressof(buf) + offset, data, len(data))
        return fn(ctypes.addressof(buf) + offset, len(data))

    call.variant = variant
    return call


@pytest.fixture(scope="module", params=list(VARIANTS))
def xxh3(request, tmp_path_factory):
    return build(request.param, tmp_path_factory.mktemp("xxh3"))


@pytest.fixture(scope="module")
def xxh3_default(tmp_path_factory):
    return build("default", tmp_path_factory.mktemp("xxh3-default"))


@pytest.mark.parametrize("length,expected", KNOWN, ids=[str(n) for n, _ in KNOWN])
def test_known_answers(xxh3, length, expected):
    assert xxh3(pattern(length)) == expected, f"length {length}"


def test_unaligned_page(xxh3):
    page = pattern(4097)[1:]
    for offset in range(8):
        assert xxh3(page, offset) == KNOWN_UNALIGNED_PAGE, f"offset {offset}"


def test_every_length_agrees_across_variants(xxh3, xxh3_default):
    """Every length through two blocks and a bit, random bytes, shifting
    alignment: each variant gives what the default build gives (the answers
    above tie the default build to the reference)."""
    if xxh3.variant == "default":
        pytest.skip("the default build is the one the others are compared with")
    rnd = random.Random(1234)
    data = bytes(rnd.getrandbits(8) for _ in range(2200))
    for n in range(len(data) + 1):
        assert xxh3(data[:n], n % 16) == xxh3_default(data[:n]), f"length {n}"
