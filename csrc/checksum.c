// SPDX-License-Identifier: MIT
/*
 * checksum.c - page checksums and compares, read through the direct map.
 *
 * The checksum only decides whether a page has been stable since the last
 * scan and where to look for its twins; every merge is confirmed by memcmp
 * under write-protect, so a collision can cost a compare, never data.
 */
#include "uksm_internal.h"

#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

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

uint64_t uksm_xxhash(const void *page)
{
	return XXH3_64bits(page, PG);
}

/* calc_checksum: the seed's jhash2(addr, PAGE_SIZE / 4, 17), or XXH3. */
uint64_t uksm_calc_checksum(const void *page, int algo)
{
	if (algo == UKSM_CSUM_XXHASH)
		return XXH3_64bits(page, PG);
	return uksm_jhash2(page, PG / 4, 17);
}

/*
 * uksm_checksum_range - the scanner's batch step: for @npages virtual pages
 * from @vpn, report each page's state and, for NORMAL pages not marked in
 * @skip (smart_scan; may be NULL), the checksum of its frame.  pool->lock
 * is held across the hash of a few pages at a time: long enough that a
 * frame cannot be freed under us (a read of a punched hole through the
 * direct map would allocate a page in the memfd again), short enough
 * that a faulting writer waits microseconds.
 */
int uksm_checksum_range(struct uksm_pool *pool, size_t vpn, size_t npages,
			int algo, const uint8_t *skip, uint64_t *sums,
			uint8_t *state)
{
	if (vpn + npages > pool->va_pages)
		return -EINVAL;
	for (size_t i = 0; i < npages; i++) {
		struct uksm_pte *pte = &pool->ptes[vpn + i];

		if ((i & 7) == 0)
			uksm_lock(pool);
		state[i] = pte->state;
		sums[i] = pte->state == UKSM_PTE_NORMAL && !(skip && skip[i]) ?
			  uksm_calc_checksum(frame_addr(pool, pte->pfn), algo) : 0;
		if ((i & 7) == 7 || i + 1 == npages)
			uksm_unlock(pool);
	}
	return 0;
}

/* Compare the frames behind two virtual pages (tests and tools). */
int uksm_memcmp_pages(struct uksm_pool *pool, size_t vpn_a, size_t vpn_b)
{
	struct uksm_pte a, b;
	int ret;

	if (vpn_a >= pool->va_pages || vpn_b >= pool->va_pages)
		return -EINVAL;
	uksm_lock(pool);
	a = pool->ptes[vpn_a];
	b = pool->ptes[vpn_b];
	if (a.state != UKSM_PTE_NORMAL && a.state != UKSM_PTE_KSM)
		ret = -EINVAL;
	else if (b.state != UKSM_PTE_NORMAL && b.state != UKSM_PTE_KSM)
		ret = -EINVAL;
	else
		ret = memcmp(frame_addr(pool, a.pfn), frame_addr(pool, b.pfn), PG) != 0;
	uksm_unlock(pool);
	return ret;
}
