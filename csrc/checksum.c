// SPDX-License-Identifier: MIT
/*
 * checksum.c - page checksums, read where the page is: a private page
 * through its own mapping, which is readable in every state but NONE.
 *
 * The checksum only decides whether a page has been stable since the last
 * scan and where to look for its twins; every merge is confirmed by memcmp
 * under write-protect, so a collision can cost a compare, never data.
 */
#include "uksm_internal.h"

#include <string.h>

#include "uksm_xxh3.h"

/* pages per hold of pool->lock: one pagemap read each */
#define CHUNK	64

#define rol32(x, k)	(((x) << (k)) | ((x) >> (32 - (k))))

#define __jhash_mix(a, b, c)			\
{						\
	a -= c;  a ^= rol32(c, 4);  c += b;	\
	b -= a;  b ^= rol32(a, 6);  a += c;	\
	c -= b;  c ^= rol32(b, 8);  b += a;	\
	a -= c;  a ^= rol32(c, 16); c += b;	\
	b -= a;  b ^= rol32(a, 19); a += c;	\
	c -= b;  c ^= rol32(b, 4);  b += a;	\
}

#define __jhash_final(a, b, c)			\
{						\
	c ^= b; c -= rol32(b, 14);		\
	a ^= c; a -= rol32(c, 11);		\
	b ^= a; b -= rol32(a, 25);		\
	c ^= b; c -= rol32(b, 16);		\
	a ^= c; a -= rol32(c, 4);		\
	b ^= a; b -= rol32(a, 14);		\
	c ^= b; c -= rol32(b, 24);		\
}

#define JHASH_INITVAL	0xdeadbeef

/* jhash2 - include/linux/jhash.h, word for word: what calc_checksum() used. */
uint32_t uksm_jhash2(const uint32_t *k, uint32_t length, uint32_t initval)
{
	uint32_t a, b, c;

	a = b = c = JHASH_INITVAL + (length << 2) + initval;
	while (length > 3) {
		a += k[0];
		b += k[1];
		c += k[2];
		__jhash_mix(a, b, c);
		length -= 3;
		k += 3;
	}
	switch (length) {
	case 3: c += k[2];	/* fall through */
	case 2: b += k[1];	/* fall through */
	case 1: a += k[0];
		__jhash_final(a, b, c);
		break;
	case 0:
		break;
	}
	return c;
}

/*
 * jhash2 of four pages at once, one page per 32-bit lane of an SSE2
 * register.  jhash2 is one long dependency chain per page, so a page at a
 * time leaves most of the CPU idle; four chains side by side run in the
 * time of about two.  Words are loaded 4 x 4 and transposed so each lane
 * gets its own page's words in order.  Same result as uksm_jhash2(..., 17):
 * the tests check them against each other.
 */
#define LANES 4

#ifdef __SSE2__
#include <emmintrin.h>

static inline __m128i rolv(__m128i x, int k)
{
	return _mm_or_si128(_mm_slli_epi32(x, k), _mm_srli_epi32(x, 32 - k));
}

#define MIXV(a, b, c)								\
do {										\
	a = _mm_sub_epi32(a, c); a = _mm_xor_si128(a, rolv(c, 4));  c = _mm_add_epi32(c, b);	\
	b = _mm_sub_epi32(b, a); b = _mm_xor_si128(b, rolv(a, 6));  a = _mm_add_epi32(a, c);	\
	c = _mm_sub_epi32(c, b); c = _mm_xor_si128(c, rolv(b, 8));  b = _mm_add_epi32(b, a);	\
	a = _mm_sub_epi32(a, c); a = _mm_xor_si128(a, rolv(c, 16)); c = _mm_add_epi32(c, b);	\
	b = _mm_sub_epi32(b, a); b = _mm_xor_si128(b, rolv(a, 19)); a = _mm_add_epi32(a, c);	\
	c = _mm_sub_epi32(c, b); c = _mm_xor_si128(c, rolv(b, 4));  b = _mm_add_epi32(b, a);	\
} while (0)

#define TRANSPOSE4(r0, r1, r2, r3)					\
do {									\
	__m128i t0 = _mm_unpacklo_epi32(r0, r1), t1 = _mm_unpacklo_epi32(r2, r3);	\
	__m128i t2 = _mm_unpackhi_epi32(r0, r1), t3 = _mm_unpackhi_epi32(r2, r3);	\
	r0 = _mm_unpacklo_epi64(t0, t1); r1 = _mm_unpackhi_epi64(t0, t1);	\
	r2 = _mm_unpacklo_epi64(t2, t3); r3 = _mm_unpackhi_epi64(t2, t3);	\
} while (0)

static void jhash2_page_x4(const uint32_t *const k[LANES], uint64_t out[LANES])
{
	const uint32_t words = PG / 4;	/* 1024 = 85 * 12 + 3 + 1 */
	__m128i a = _mm_set1_epi32((int)(JHASH_INITVAL + (words << 2) + 17));
	__m128i b = a, c = a;
	uint32_t A[LANES], B[LANES], C[LANES], i = 0;

	for (; i + 12 <= words - 1; i += 12) {	/* 12 words: four rounds */
		__m128i w[12];

		for (int q = 0; q < 3; q++) {
			__m128i r0 = _mm_loadu_si128((const __m128i *)(k[0] + i + 4 * q));
			__m128i r1 = _mm_loadu_si128((const __m128i *)(k[1] + i + 4 * q));
			__m128i r2 = _mm_loadu_si128((const __m128i *)(k[2] + i + 4 * q));
			__m128i r3 = _mm_loadu_si128((const __m128i *)(k[3] + i + 4 * q));

			TRANSPOSE4(r0, r1, r2, r3);
			w[4 * q] = r0;
			w[4 * q + 1] = r1;
			w[4 * q + 2] = r2;
			w[4 * q + 3] = r3;
		}
		for (int r = 0; r < 4; r++) {
			a = _mm_add_epi32(a, w[3 * r]);
			b = _mm_add_epi32(b, w[3 * r + 1]);
			c = _mm_add_epi32(c, w[3 * r + 2]);
			MIXV(a, b, c);
		}
	}
	for (; i + 3 < words; i += 3) {
		a = _mm_add_epi32(a, _mm_set_epi32((int)k[3][i], (int)k[2][i],
						   (int)k[1][i], (int)k[0][i]));
		b = _mm_add_epi32(b, _mm_set_epi32((int)k[3][i + 1], (int)k[2][i + 1],
						   (int)k[1][i + 1], (int)k[0][i + 1]));
		c = _mm_add_epi32(c, _mm_set_epi32((int)k[3][i + 2], (int)k[2][i + 2],
						   (int)k[1][i + 2], (int)k[0][i + 2]));
		MIXV(a, b, c);
	}
	_mm_storeu_si128((__m128i *)A, a);
	_mm_storeu_si128((__m128i *)B, b);
	_mm_storeu_si128((__m128i *)C, c);
	for (int l = 0; l < LANES; l++) {
		A[l] += k[l][i];	/* one word left: jhash2's "case 1" */
		__jhash_final(A[l], B[l], C[l]);
		out[l] = C[l];
	}
}
#else
static void jhash2_page_x4(const uint32_t *const k[LANES], uint64_t out[LANES])
{
	for (int l = 0; l < LANES; l++)
		out[l] = uksm_jhash2(k[l], PG / 4, 17);
}
#endif

/* calc_checksum: the seed's jhash2(addr, PAGE_SIZE / 4, 17), or XXH3. */
uint64_t uksm_calc_checksum(const void *page, int algo)
{
	if (algo == UKSM_CSUM_XXHASH)
		return uksm_xxh3_64(page, PG);
	return uksm_jhash2(page, PG / 4, 17);
}

/*
 * The hardware prefetchers stop at a 4 KiB boundary, so each page hashed
 * would start from memory: the next page to be hashed is asked for while
 * this one is, and a page out of cache hashes at nearly the speed of one in
 * it.  A prefetch never faults, whatever became of the page.
 */
static inline void prefetch_page(const void *page)
{
	for (size_t off = 0; off < PG; off += 64)
		__builtin_prefetch((const char *)page + off);
}

/*
 * uksm_checksum_range - the scanner's batch step: for @npages virtual pages
 * from @vpn, first learn from pagemap which views the kernel has copied on
 * write (reconcile), then report each page's state and, for private pages
 * not marked in @skip (smart_scan; may be NULL), the checksum of its
 * contents.  A private page never written (not present in pagemap) is
 * reported UKSM_SCAN_UNTOUCHED and not read: it is the zero page already,
 * and costs nothing.  pool->lock is held for a chunk at a time: a private
 * page cannot be freed (unmapped) while it is read.
 */
int uksm_checksum_range(struct uksm_pool *pool, size_t vpn, size_t npages,
			int algo, const uint8_t *skip, uint64_t *sums,
			uint8_t *state)
{
	_Static_assert(PG / 4 == 3 * 341 + 1, "jhash2_page_x4 assumes 4 KiB pages");
	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	for (size_t i = 0; i < npages; i += CHUNK) {
		size_t end = i + CHUNK < npages ? i + CHUNK : npages;
		uint64_t *pm = pool->run.pm;
		const uint32_t *pages[CHUNK];
		size_t idx[CHUNK], nr = 0, g = 0;
		int err;

		uksm_lock(pool);
		err = uksm_pagemap_read((size_t)page_addr(pool, vpn + i), end - i, pm);
		if (err) {
			uksm_unlock(pool);
			return err;
		}
		uksm_reconcile_locked(pool, vpn + i, end - i, pm);
		uksm_frames_flush(pool);
		for (size_t j = i; j < end; j++) {
			struct uksm_pte *pte = &pool->ptes[vpn + j];

			state[j] = pte->state;
			sums[j] = 0;
			if (pte->state != UKSM_PTE_PRIVATE)
				continue;
			if (!pm_anon_present(pm[j - i])) {
				state[j] = UKSM_SCAN_UNTOUCHED;
				continue;
			}
			if (!(skip && skip[j]) && !(pte->flags & UKSM_PTE_PINNED)) {
				pages[nr] = (const uint32_t *)page_addr(pool, vpn + j);
				idx[nr++] = j;
			}
		}
		if (algo == UKSM_CSUM_JHASH2) {
			for (; g + LANES <= nr; g += LANES) {
				uint64_t out[LANES];

				for (size_t l = g + LANES; l < g + 2 * LANES && l < nr; l++)
					prefetch_page(pages[l]);
				jhash2_page_x4(&pages[g], out);
				for (int l = 0; l < LANES; l++)
					sums[idx[g + l]] = out[l];
			}
			for (; g < nr; g++)
				sums[idx[g]] = uksm_jhash2(pages[g], PG / 4, 17);
		} else {
			for (; g < nr; g++) {
				if (g + 1 < nr)
					prefetch_page(pages[g + 1]);
				sums[idx[g]] = uksm_xxh3_64(pages[g], PG);
			}
		}
		uksm_unlock(pool);
	}
	return 0;
}
