// SPDX-License-Identifier: MIT
/*
 * xxh3.c - XXH3_64bits with seed 0 and the default secret, written from the
 * published XXH3 algorithm (xxHash, doc/xxhash_spec.md).
 *
 * Only the one variant uksm uses is here: no seed, no custom secret, no
 * streaming state, so every input is hashed in a single pass that touches
 * nothing but the input, the constant secret and the stack.  That keeps it
 * async-signal-safe.
 *
 * Inputs up to 240 bytes take one of the short paths, each a handful of
 * multiplies.  Longer inputs run the stripe loop: eight 64-bit accumulators
 * each take one 8-byte word of every 64-byte stripe, and are scrambled once
 * per 1 KiB block.  On x86-64 that loop runs on AVX2 registers, four
 * accumulators to a register, where the CPU has them (checked at each call:
 * one load of what the loader's CPU probe left), else on SSE2, two to a
 * register; elsewhere it runs on plain 64-bit integers.  All give the same
 * bits; defining UKSM_XXH3_NO_AVX2 or UKSM_XXH3_SCALAR forces the narrower
 * ones so that the tests can check them on any x86-64 too.
 */
#include "uksm_xxh3.h"

#include <string.h>

#if defined(__SSE2__) && !defined(UKSM_XXH3_SCALAR)
#define XXH3_SSE2 1
#include <emmintrin.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
	!defined(UKSM_XXH3_SCALAR) && !defined(UKSM_XXH3_NO_AVX2)
#define XXH3_AVX2 1
#include <immintrin.h>
#endif

#ifndef __always_inline
#define __always_inline inline __attribute__((__always_inline__))
#endif

#define PRIME32_1	0x9E3779B1U
#define PRIME32_2	0x85EBCA77U
#define PRIME32_3	0xC2B2AE3DU
#define PRIME64_1	0x9E3779B185EBCA87ULL
#define PRIME64_2	0xC2B2AE3D27D4EB4FULL
#define PRIME64_3	0x165667B19E3779F9ULL
#define PRIME64_4	0x85EBCA77C2B2AE63ULL
#define PRIME64_5	0x27D4EB2F165667C5ULL
#define PRIME_MX1	0x165667919E3779F9ULL
#define PRIME_MX2	0x9FB21C651E98DF25ULL

#define STRIPE_LEN		64
#define SECRET_SIZE		192
/* Each stripe reads the secret 8 bytes further on than the one before. */
#define SECRET_CONSUME_RATE	8
#define STRIPES_PER_BLOCK	((SECRET_SIZE - STRIPE_LEN) / SECRET_CONSUME_RATE)
#define BLOCK_LEN		(STRIPE_LEN * STRIPES_PER_BLOCK)
/* Offsets into the secret fixed by the algorithm for particular steps. */
#define SECRET_MERGEACCS_START	11
#define SECRET_LASTACC_START	7
#define MIDSIZE_STARTOFFSET	3
#define MIDSIZE_LASTOFFSET	17
#define SECRET_SIZE_MIN		136

/* The default secret, kSecret in the reference: part of the algorithm. */
static const uint8_t secret[SECRET_SIZE] __attribute__((__aligned__(64))) = {
	0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe,
	0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
	0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb,
	0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
	0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78,
	0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
	0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e,
	0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
	0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
	0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
	0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e,
	0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
	0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f,
	0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
	0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
	0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
	0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3,
	0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
	0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49,
	0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
	0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc,
	0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
	0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28,
	0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

/*
 * XXH3 is defined on little-endian words.  memcpy() makes the loads safe
 * at any alignment and compiles to a plain load; big-endian hosts swap.
 */
static __always_inline uint32_t read32(const uint8_t *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap32(v);
#endif
	return v;
}

static __always_inline uint64_t read64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	return v;
}

static __always_inline uint64_t rotl64(uint64_t x, int r)
{
	return (x << r) | (x >> (64 - r));
}

/* The full 64x64->128 product, folded to 64 bits by xoring its halves. */
static __always_inline uint64_t mul128_fold64(uint64_t a, uint64_t b)
{
#if defined(__SIZEOF_INT128__) && !defined(UKSM_XXH3_NO_INT128)
	unsigned __int128 p = (unsigned __int128)a * b;

	return (uint64_t)p ^ (uint64_t)(p >> 64);
#else
	/* Schoolbook on 32-bit halves; the cross sum cannot overflow. */
	uint64_t lo_lo = (a & 0xFFFFFFFFULL) * (b & 0xFFFFFFFFULL);
	uint64_t hi_lo = (a >> 32) * (b & 0xFFFFFFFFULL);
	uint64_t lo_hi = (a & 0xFFFFFFFFULL) * (b >> 32);
	uint64_t hi_hi = (a >> 32) * (b >> 32);
	uint64_t cross = (lo_lo >> 32) + (hi_lo & 0xFFFFFFFFULL) + lo_hi;
	uint64_t upper = (hi_lo >> 32) + (cross >> 32) + hi_hi;
	uint64_t lower = (cross << 32) | (lo_lo & 0xFFFFFFFFULL);

	return lower ^ upper;
#endif
}

/* XXH64's final mix: the 0..3 byte paths end with it. */
static __always_inline uint64_t xxh64_avalanche(uint64_t h)
{
	h ^= h >> 33;
	h *= PRIME64_2;
	h ^= h >> 29;
	h *= PRIME64_3;
	h ^= h >> 32;
	return h;
}

/* XXH3's own final mix, cheaper than XXH64's: input already well mixed. */
static __always_inline uint64_t xxh3_avalanche(uint64_t h)
{
	h ^= h >> 37;
	h *= PRIME_MX1;
	h ^= h >> 32;
	return h;
}

/*
 * The 4..8 byte path packs the input into one 64-bit word, which a single
 * multiply would leave weak in its low bits; rrmxmx mixes harder.
 */
static __always_inline uint64_t rrmxmx(uint64_t h, uint64_t len)
{
	h ^= rotl64(h, 49) ^ rotl64(h, 24);
	h *= PRIME_MX2;
	h ^= (h >> 35) + len;
	h *= PRIME_MX2;
	h ^= h >> 28;
	return h;
}

static uint64_t len_0(void)
{
	return xxh64_avalanche(read64(secret + 56) ^ read64(secret + 64));
}

/* 1..3 bytes: the first, middle and last byte, which cover them all. */
static uint64_t len_1to3(const uint8_t *p, size_t len)
{
	uint32_t c1 = p[0], c2 = p[len >> 1], c3 = p[len - 1];
	uint32_t combined = (c1 << 16) | (c2 << 24) | c3 | ((uint32_t)len << 8);
	uint64_t bitflip = read32(secret) ^ read32(secret + 4);

	return xxh64_avalanche((uint64_t)combined ^ bitflip);
}

/* 4..8 bytes: the first and last 4 bytes, overlapping when len < 8. */
static uint64_t len_4to8(const uint8_t *p, size_t len)
{
	uint64_t in1 = read32(p), in2 = read32(p + len - 4);
	uint64_t bitflip = read64(secret + 8) ^ read64(secret + 16);
	uint64_t keyed = (in2 + (in1 << 32)) ^ bitflip;

	return rrmxmx(keyed, len);
}

/* 9..16 bytes: the first and last 8 bytes, overlapping when len < 16. */
static uint64_t len_9to16(const uint8_t *p, size_t len)
{
	uint64_t lo = read64(p) ^ read64(secret + 24) ^ read64(secret + 32);
	uint64_t hi = read64(p + len - 8) ^ read64(secret + 40) ^ read64(secret + 48);
	uint64_t acc = len + __builtin_bswap64(lo) + hi + mul128_fold64(lo, hi);

	return xxh3_avalanche(acc);
}

/* 16 bytes of input against 16 of secret, one 128-bit multiply. */
static __always_inline uint64_t mix16(const uint8_t *p, const uint8_t *s)
{
	return mul128_fold64(read64(p) ^ read64(s), read64(p + 8) ^ read64(s + 8));
}

/*
 * 17..128 bytes: pairs of 16-byte blocks taken from both ends towards the
 * middle, so every byte is read at least once with no tail loop.
 */
static uint64_t len_17to128(const uint8_t *p, size_t len)
{
	uint64_t acc = len * PRIME64_1;

	if (len > 32) {
		if (len > 64) {
			if (len > 96) {
				acc += mix16(p + 48, secret + 96);
				acc += mix16(p + len - 64, secret + 112);
			}
			acc += mix16(p + 32, secret + 64);
			acc += mix16(p + len - 48, secret + 80);
		}
		acc += mix16(p + 16, secret + 32);
		acc += mix16(p + len - 32, secret + 48);
	}
	acc += mix16(p, secret);
	acc += mix16(p + len - 16, secret + 16);
	return xxh3_avalanche(acc);
}

/*
 * 129..240 bytes: the first 128 bytes against the start of the secret,
 * then, after an avalanche, the remaining whole 16-byte blocks against the
 * secret again at an odd offset, and the last 16 bytes on their own.
 */
static uint64_t len_129to240(const uint8_t *p, size_t len)
{
	uint64_t acc = len * PRIME64_1;
	size_t rounds = len / 16;
	size_t i;

	for (i = 0; i < 8; i++)
		acc += mix16(p + 16 * i, secret + 16 * i);
	acc = xxh3_avalanche(acc);
	for (i = 8; i < rounds; i++)
		acc += mix16(p + 16 * i, secret + 16 * (i - 8) + MIDSIZE_STARTOFFSET);
	acc += mix16(p + len - 16, secret + SECRET_SIZE_MIN - MIDSIZE_LASTOFFSET);
	return xxh3_avalanche(acc);
}

/* The accumulators' starting values, fixed by the algorithm. */
#define ACC_INIT { PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3,	\
		   PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1 }

/*
 * The end of every long input: fold the eight accumulators pairwise with
 * 128-bit multiplies against the secret, on top of len * PRIME64_1.
 */
static uint64_t merge_accs(const uint64_t acc[8], size_t len)
{
	const uint8_t *s = secret + SECRET_MERGEACCS_START;
	uint64_t h = len * PRIME64_1;
	int i;

	for (i = 0; i < 4; i++)
		h += mul128_fold64(acc[2 * i] ^ read64(s + 16 * i),
				   acc[2 * i + 1] ^ read64(s + 16 * i + 8));
	return xxh3_avalanche(h);
}

#ifdef XXH3_AVX2

/*
 * The stripe loop on 32-byte lanes: the SSE2 one below, twice as wide.  A
 * page is memory-bound only once the loop is this cheap; these functions
 * alone are built for AVX2, and hash_long_avx2() is called only where the
 * CPU has it.
 */
#define AVX2_INLINE static inline \
	__attribute__((__always_inline__, __target__("avx2")))

AVX2_INLINE __m256i accum_lane256(__m256i acc, const uint8_t *p, const uint8_t *s)
{
	__m256i data = _mm256_loadu_si256((const __m256i *)p);
	__m256i key = _mm256_loadu_si256((const __m256i *)s);
	__m256i dk = _mm256_xor_si256(data, key);
	__m256i dk_hi = _mm256_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
	__m256i prod = _mm256_mul_epu32(dk, dk_hi);
	__m256i swap = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));

	return _mm256_add_epi64(prod, _mm256_add_epi64(acc, swap));
}

AVX2_INLINE __m256i scramble_lane256(__m256i acc, const uint8_t *s)
{
	const __m256i prime = _mm256_set1_epi32((int)PRIME32_1);
	__m256i key = _mm256_loadu_si256((const __m256i *)s);
	__m256i dk = _mm256_xor_si256(_mm256_xor_si256(acc, _mm256_srli_epi64(acc, 47)), key);
	__m256i dk_hi = _mm256_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
	__m256i lo = _mm256_mul_epu32(dk, prime);
	__m256i hi = _mm256_mul_epu32(dk_hi, prime);

	return _mm256_add_epi64(lo, _mm256_slli_epi64(hi, 32));
}

#define ACCUM_STRIPE256(p, s) do {			\
	b0 = accum_lane256(b0, (p), (s));		\
	b1 = accum_lane256(b1, (p) + 32, (s) + 32);	\
} while (0)

__attribute__((__target__("avx2")))
static uint64_t hash_long_avx2(const uint8_t *p, size_t len)
{
	uint64_t acc[8] __attribute__((__aligned__(32))) = ACC_INIT;
	const uint8_t *scr = secret + SECRET_SIZE - STRIPE_LEN;
	size_t nb_blocks = (len - 1) / BLOCK_LEN;
	size_t n, i, nb_stripes;
	const uint8_t *end = p + len;
	__m256i b0 = _mm256_load_si256((const __m256i *)&acc[0]);
	__m256i b1 = _mm256_load_si256((const __m256i *)&acc[4]);

	for (n = 0; n < nb_blocks; n++, p += BLOCK_LEN) {
		for (i = 0; i < STRIPES_PER_BLOCK; i++)
			ACCUM_STRIPE256(p + i * STRIPE_LEN, secret + i * SECRET_CONSUME_RATE);
		b0 = scramble_lane256(b0, scr);
		b1 = scramble_lane256(b1, scr + 32);
	}
	/* the last, partial block and the last 64 bytes, as hash_long() */
	nb_stripes = ((len - 1) - BLOCK_LEN * nb_blocks) / STRIPE_LEN;
	for (i = 0; i < nb_stripes; i++)
		ACCUM_STRIPE256(p + i * STRIPE_LEN, secret + i * SECRET_CONSUME_RATE);
	ACCUM_STRIPE256(end - STRIPE_LEN,
			secret + SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START);
	_mm256_store_si256((__m256i *)&acc[0], b0);
	_mm256_store_si256((__m256i *)&acc[4], b1);
	/* no AVX-to-SSE transition penalty in the caller's code after us */
	_mm256_zeroupper();
	return merge_accs(acc, len);
}

#endif /* XXH3_AVX2 */

#ifdef XXH3_SSE2

/*
 * One 16-byte lane of a stripe: two accumulators in one register.  The
 * keyed word's low half times its high half is one pmuludq; the raw input
 * is added with its two words swapped, as the scalar acc[i ^ 1] += v does,
 * so that no input bit is lost if the product is zero.
 */
static __always_inline __m128i accum_lane(__m128i acc, const uint8_t *p,
					  const uint8_t *s)
{
	__m128i data = _mm_loadu_si128((const __m128i *)p);
	__m128i key = _mm_loadu_si128((const __m128i *)s);
	__m128i dk = _mm_xor_si128(data, key);
	__m128i dk_hi = _mm_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
	__m128i prod = _mm_mul_epu32(dk, dk_hi);
	__m128i swap = _mm_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));

	return _mm_add_epi64(prod, _mm_add_epi64(acc, swap));
}

/*
 * Scramble once per block so the accumulators' high bits feed back into
 * the low ones.  SSE2 has no 64x32 multiply, so the product by PRIME32_1
 * is built from two 32x32 ones: low half, plus high half shifted up.
 */
static __always_inline __m128i scramble_lane(__m128i acc, const uint8_t *s)
{
	const __m128i prime = _mm_set1_epi32((int)PRIME32_1);
	__m128i key = _mm_loadu_si128((const __m128i *)s);
	__m128i dk = _mm_xor_si128(_mm_xor_si128(acc, _mm_srli_epi64(acc, 47)), key);
	__m128i dk_hi = _mm_shuffle_epi32(dk, _MM_SHUFFLE(0, 3, 0, 1));
	__m128i lo = _mm_mul_epu32(dk, prime);
	__m128i hi = _mm_mul_epu32(dk_hi, prime);

	return _mm_add_epi64(lo, _mm_slli_epi64(hi, 32));
}

/*
 * The four accumulator registers are passed and returned by value through
 * always-inlined helpers so that they stay in xmm registers for the whole
 * input instead of going through memory every stripe.
 */
#define ACCUM_STRIPE(p, s) do {				\
	a0 = accum_lane(a0, (p), (s));			\
	a1 = accum_lane(a1, (p) + 16, (s) + 16);	\
	a2 = accum_lane(a2, (p) + 32, (s) + 32);	\
	a3 = accum_lane(a3, (p) + 48, (s) + 48);	\
} while (0)

static uint64_t hash_long(const uint8_t *p, size_t len)
{
	uint64_t acc[8] __attribute__((__aligned__(16))) = ACC_INIT;
	const uint8_t *scr = secret + SECRET_SIZE - STRIPE_LEN;
	size_t nb_blocks = (len - 1) / BLOCK_LEN;
	size_t n, i, nb_stripes;
	const uint8_t *end = p + len;
	__m128i a0, a1, a2, a3;

	a0 = _mm_load_si128((const __m128i *)&acc[0]);
	a1 = _mm_load_si128((const __m128i *)&acc[2]);
	a2 = _mm_load_si128((const __m128i *)&acc[4]);
	a3 = _mm_load_si128((const __m128i *)&acc[6]);

	for (n = 0; n < nb_blocks; n++, p += BLOCK_LEN) {
		for (i = 0; i < STRIPES_PER_BLOCK; i++)
			ACCUM_STRIPE(p + i * STRIPE_LEN, secret + i * SECRET_CONSUME_RATE);
		a0 = scramble_lane(a0, scr);
		a1 = scramble_lane(a1, scr + 16);
		a2 = scramble_lane(a2, scr + 32);
		a3 = scramble_lane(a3, scr + 48);
	}
	/* The last, partial block: its whole stripes, not scrambled... */
	nb_stripes = ((len - 1) - BLOCK_LEN * nb_blocks) / STRIPE_LEN;
	for (i = 0; i < nb_stripes; i++)
		ACCUM_STRIPE(p + i * STRIPE_LEN, secret + i * SECRET_CONSUME_RATE);
	/* ...then the input's last 64 bytes, overlapping what came before. */
	ACCUM_STRIPE(end - STRIPE_LEN,
		     secret + SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START);

	_mm_store_si128((__m128i *)&acc[0], a0);
	_mm_store_si128((__m128i *)&acc[2], a1);
	_mm_store_si128((__m128i *)&acc[4], a2);
	_mm_store_si128((__m128i *)&acc[6], a3);
	return merge_accs(acc, len);
}

#else /* !XXH3_SSE2 */

/*
 * One stripe: each accumulator gets its keyed word's low half times its
 * high half, and its neighbour's raw word, so that no input bit is lost
 * if the product is zero.
 */
static __always_inline void accum_stripe(uint64_t acc[8], const uint8_t *p,
					 const uint8_t *s)
{
	int i;

	for (i = 0; i < 8; i++) {
		uint64_t v = read64(p + 8 * i);
		uint64_t k = v ^ read64(s + 8 * i);

		acc[i ^ 1] += v;
		acc[i] += (uint64_t)(uint32_t)k * (k >> 32);
	}
}

/* Once per block: feed the accumulators' high bits back into the low. */
static __always_inline void scramble(uint64_t acc[8], const uint8_t *s)
{
	int i;

	for (i = 0; i < 8; i++) {
		uint64_t a = acc[i];

		a ^= a >> 47;
		a ^= read64(s + 8 * i);
		acc[i] = a * PRIME32_1;
	}
}

static uint64_t hash_long(const uint8_t *p, size_t len)
{
	uint64_t acc[8] = ACC_INIT;
	size_t nb_blocks = (len - 1) / BLOCK_LEN;
	size_t n, i, nb_stripes;
	const uint8_t *end = p + len;

	for (n = 0; n < nb_blocks; n++, p += BLOCK_LEN) {
		for (i = 0; i < STRIPES_PER_BLOCK; i++)
			accum_stripe(acc, p + i * STRIPE_LEN,
				     secret + i * SECRET_CONSUME_RATE);
		scramble(acc, secret + SECRET_SIZE - STRIPE_LEN);
	}
	/* The last, partial block: its whole stripes, not scrambled... */
	nb_stripes = ((len - 1) - BLOCK_LEN * nb_blocks) / STRIPE_LEN;
	for (i = 0; i < nb_stripes; i++)
		accum_stripe(acc, p + i * STRIPE_LEN,
			     secret + i * SECRET_CONSUME_RATE);
	/* ...then the input's last 64 bytes, overlapping what came before. */
	accum_stripe(acc, end - STRIPE_LEN,
		     secret + SECRET_SIZE - STRIPE_LEN - SECRET_LASTACC_START);
	return merge_accs(acc, len);
}

#endif /* XXH3_SSE2 */

uint64_t uksm_xxh3_64(const void *data, size_t len)
{
	const uint8_t *p = data;

	if (len <= 16) {
		if (len > 8)
			return len_9to16(p, len);
		if (len >= 4)
			return len_4to8(p, len);
		if (len)
			return len_1to3(p, len);
		return len_0();
	}
	if (len <= 128)
		return len_17to128(p, len);
	if (len <= 240)
		return len_129to240(p, len);
#ifdef XXH3_AVX2
	if (__builtin_cpu_supports("avx2"))
		return hash_long_avx2(p, len);
#endif
	return hash_long(p, len);
}
