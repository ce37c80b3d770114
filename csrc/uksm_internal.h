/* SPDX-License-Identifier: MIT */
/*
 * uksm_internal.h - the pool structure, pool->lock and the frame allocator,
 * shared by pool.c, merge.c and fault.c.  Everything here may be called from
 * the SIGSEGV handler, so it must stay async-signal-safe: syscalls, atomics,
 * plain memory; no malloc, no stdio, no locks but pool->lock.
 */
#ifndef UKSM_INTERNAL_H
#define UKSM_INTERNAL_H

#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uksm.h"

#include <fcntl.h>
#include <sys/mman.h>

/*
 * Fault injection, for the tests (issue 6): uksm_inject() arms an operation
 * so that, after @skip more calls succeed, the next @fail calls fail with
 * @err (fail < 0: all of them).  Unarmed, the cost is one relaxed load per
 * call.  Every mapping change, protection change and block allocation the
 * core makes on pool memory goes through these wrappers; the handler's too,
 * so that the tests can make a COW break fail the way vm.max_map_count would.
 */
struct uksm_inject_op {
	_Atomic long skip;
	_Atomic long fail;
	_Atomic int err;
	_Atomic long hits;	/* failures injected so far */
};
extern struct uksm_inject_op uksm_injects[UKSM_OP_NR];

static inline int uksm_injected(int op)
{
	struct uksm_inject_op *in = &uksm_injects[op];
	long f = atomic_load_explicit(&in->fail, memory_order_relaxed);

	if (!f)
		return 0;
	if (atomic_fetch_sub(&in->skip, 1) > 0)
		return 0;
	atomic_store(&in->skip, 0);
	if (f > 0 && atomic_fetch_sub(&in->fail, 1) <= 0) {
		atomic_store(&in->fail, 0);
		return 0;
	}
	atomic_fetch_add(&in->hits, 1);
	errno = atomic_load(&in->err);
	return 1;
}

static inline void *uksm_mmap(void *addr, size_t len, int prot, int flags, int fd,
			      off_t off)
{
	return uksm_injected(UKSM_OP_MMAP) ? MAP_FAILED : mmap(addr, len, prot, flags, fd, off);
}

static inline int uksm_mprotect(void *addr, size_t len, int prot)
{
	return uksm_injected(UKSM_OP_MPROTECT) ? -1 : mprotect(addr, len, prot);
}

static inline int uksm_fallocate(int fd, int mode, off_t off, off_t len)
{
	return uksm_injected(UKSM_OP_FALLOCATE) ? -1 : fallocate(fd, mode, off, len);
}

#define PG		UKSM_PAGE_SIZE

/* struct uksm_pte.spare[0] */
#define UKSM_PTE_PINNED	0x1	/* pool.pin(): never migrated, never swapped */
#define UKSM_PTE_LOCKED	0x2	/* pool.lock(): never swapped (mlock) */
#define UKSM_PTE_HINT	0x4	/* PROT_NONE as a reference hint (aging) */
/* struct uksm_pte.spare[1]: the page's group (its buffer's) */

/* Scratch for one run of uksm_merge(); used only under pool->lock. */
struct uksm_run_ctx {
	int64_t target[UKSM_RUN_MAX];	/* frame each src would map, or -1 */
	uint8_t promoted[UKSM_RUN_MAX];	/* anchor upgraded in place here */
	uint8_t wp[UKSM_RUN_MAX];	/* src write-protected here */
};

struct uksm_pool {
	int fd;				/* the backing memfd */
	char *va;			/* user virtual range, va_pages long */
	size_t va_pages;
	char *direct;			/* linear rw map of the whole memfd */
	size_t nr_frames;		/* frame table size: capacity + reserve */
	size_t frames_online;		/* frames below this may be used (shrink) */
	size_t capacity_frames;		/* what uksm_alloc() may use */
	size_t file_frames;		/* current ftruncate()d size, in frames */

	struct uksm_frame *frames;	/* nr_frames entries */
	uint64_t *frame_map;		/* bit set = frame in use */
	size_t frame_hint;		/* no free frame below this pfn */

	struct uksm_pte *ptes;		/* va_pages entries */
	uint64_t *va_map;		/* bit set = vpn reserved by a buffer */
	size_t va_hint;

	uint32_t next_key;
	size_t punch_start;		/* run of freed frames not yet punched */
	size_t punch_len;
	_Atomic int lock;		/* 0 free, 1 held, 2 held with waiters */
	struct uksm_stats st;
	struct uksm_run_ctx run;
	/*
	 * VMA pressure, for the fault handler, which cannot count maps: the
	 * scanner sets vma_estimate to /proc/self/maps' count whenever it
	 * recounts; each single-page COW adds the two VMAs it may cost.  Past
	 * vma_soft_limit, COW breaks whole runs, which only ever removes VMAs.
	 */
	int64_t vma_estimate;
	int64_t vma_soft_limit;

	/* swap (swap.c): all NULL / -1 until uksm_swap_enable() */
	int swap_fd;			/* the swap file: unlinked, 0600 */
	int swap_dir_fd;		/* its directory, for a forked child's copy */
	size_t max_resident;		/* frames: reclaim keeps frames_used below */
	size_t reclaim_batch;		/* frames freed per eviction batch */
	size_t nr_slots;		/* slot table size (= va_pages) */
	size_t slot_hint;		/* no free slot below this */
	size_t clock_hand;		/* the reclaim clock, a vpn */
	uint16_t *swap_map;		/* per slot: swapped mappers (0 = free) */
	uint64_t *slot_sum;		/* per slot: XXH3 of the page written */
	uint32_t *slot_cache;		/* per slot: swap cache frame, or UINT32_MAX */
	uint32_t *slot_cache_key;	/* its key then (keyhole again) */
	uint8_t *evict_mark;		/* per frame: reclaim scratch */
	uint32_t *evict_frames;		/* reclaim scratch: candidates */
	uint32_t *evict_slot_of;	/* per frame: its slot, while evicting */
	uint32_t *evict_vpn;		/* per frame: the page that nominated it */
	uint32_t *cache_slot_of;	/* per frame: slot + 1 it caches, or 0 */
	uint8_t *slot_stale;		/* per slot: freed, disk blocks not punched */
	size_t stale_slots;
	uint64_t swap_backoff_ns;	/* no direct reclaim before (a write failed) */
	uint32_t *evict_slots;		/* and their slots */
	size_t swap_meta_bytes;
	void *swap_meta;
	uint64_t group_frames[UKSM_MAX_GROUPS];
	uint64_t group_max[UKSM_MAX_GROUPS];	/* frames; 0: no limit */
	uint64_t group_swapped[UKSM_MAX_GROUPS];
	uint64_t group_swap_ins[UKSM_MAX_GROUPS];
	size_t meta_bytes;		/* size of the tables mapping below */
	void *meta;			/* one mapping holds all the tables */
};

/*
 * pool->lock: Drepper's three-state futex mutex.  Taking it is a few atomics
 * and, under contention, the futex syscall: both fine in a signal handler.
 */
static inline void uksm_futex_lock(_Atomic int *lock)
{
	int c = 0;
	int i;

	if (atomic_compare_exchange_strong(lock, &c, 1))
		return;
	for (i = 0; i < 200; i++) {
		c = 0;
		if (atomic_compare_exchange_weak(lock, &c, 1))
			return;
		__builtin_ia32_pause();
	}
	if (c != 2)
		c = atomic_exchange(lock, 2);
	while (c != 0) {
		syscall(SYS_futex, lock, FUTEX_WAIT_PRIVATE, 2, NULL, NULL, 0);
		c = atomic_exchange(lock, 2);
	}
}

static inline void uksm_futex_unlock(_Atomic int *lock)
{
	if (atomic_exchange(lock, 0) == 2)
		syscall(SYS_futex, lock, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static inline void uksm_lock(struct uksm_pool *pool)
{
	uksm_futex_lock(&pool->lock);
}

static inline int uksm_trylock(struct uksm_pool *pool)
{
	int c = 0;

	return atomic_compare_exchange_strong(&pool->lock, &c, 1);
}

static inline void uksm_unlock(struct uksm_pool *pool)
{
	uksm_futex_unlock(&pool->lock);
}

static inline char *frame_addr(struct uksm_pool *pool, size_t pfn)
{
	return pool->direct + (pfn << UKSM_PAGE_SHIFT);
}

static inline char *page_addr(struct uksm_pool *pool, size_t vpn)
{
	return pool->va + (vpn << UKSM_PAGE_SHIFT);
}

/*
 * Would pages @a and @a + 1 sit in one VMA now?  Same kind of mapping, same
 * protection, consecutive frames: the kernel keeps such neighbours merged.
 * Caller holds pool->lock.
 */
static inline int uksm_same_vma(struct uksm_pool *pool, size_t a)
{
	const struct uksm_pte *x = &pool->ptes[a], *y = &pool->ptes[a + 1];

	if (x->state != y->state)
		return 0;
	if (x->state == UKSM_PTE_ZERO)
		return 1;
	return (x->state == UKSM_PTE_NORMAL || x->state == UKSM_PTE_KSM) &&
	       y->pfn == x->pfn + 1;
}

/*
 * The registry the signal handler and the fork hooks walk: each slot's pool
 * and, for the handler, the virtual range its buffers live in (0, 0 when
 * free; the range is cleared before the pool is, and set after).
 */
extern struct uksm_pool *_Atomic uksm_pools[UKSM_MAX_POOLS];
extern _Atomic uintptr_t uksm_pool_lo[UKSM_MAX_POOLS];
extern _Atomic uintptr_t uksm_pool_hi[UKSM_MAX_POOLS];
/* slots at or above this were never used: walks stop here */
extern _Atomic size_t uksm_pools_high;

/* Charge frame @f to group @g (moving it from the group it was in). */
static inline void uksm_recharge(struct uksm_pool *pool, size_t f, uint32_t g)
{
	struct uksm_frame *fr = &pool->frames[f];

	if (g >= UKSM_MAX_GROUPS)
		g = 0;
	pool->group_frames[fr->group]--;
	pool->group_frames[g]++;
	fr->group = g;
}

/*
 * Is frame @f the swap cache of a slot that still has mappers swapped on
 * it?  Then it must not be taken over by its one present mapper on a write
 * (that would make the others read the slot again): COW copies instead.
 */
static inline int uksm_swap_cached(struct uksm_pool *pool, size_t f)
{
	uint32_t s1;

	if (!pool->cache_slot_of)
		return 0;
	s1 = pool->cache_slot_of[f];
	return s1 && pool->slot_cache[s1 - 1] == f + 1 && pool->swap_map[s1 - 1] &&
	       pool->slot_cache_key[s1 - 1] == pool->frames[f].key;
}

static inline uint32_t uksm_pte_group(const struct uksm_pte *pte)
{
	return pte->spare[1];
}

/* pool.c: frame allocator; caller holds pool->lock */
int uksm_grow_file(struct uksm_pool *pool, size_t end);
/* swap.c; caller holds pool->lock */
void uksm_slot_put(struct uksm_pool *pool, size_t slot, uint32_t group);
int uksm_swap_in_locked(struct uksm_pool *pool, size_t vpn, size_t limit);
int uksm_hint_restore(struct uksm_pool *pool, size_t vpn);
void uksm_reclaim_locked(struct uksm_pool *pool, size_t nr, int group, int revolutions);
void uksm_swap_fork_child(struct uksm_pool *pool);
int uksm_swap_backing_off(struct uksm_pool *pool);
void uksm_swap_destroy(struct uksm_pool *pool);
int uksm_bit_test(const uint64_t *map, size_t i);
size_t uksm_find_zero_bit(const uint64_t *map, size_t from, size_t limit);
size_t uksm_frame_alloc_run(struct uksm_pool *pool, size_t want, size_t limit,
			    size_t *pfn_out);
size_t uksm_frame_alloc_at(struct uksm_pool *pool, size_t pfn, size_t want,
			   size_t limit);
void uksm_frame_put(struct uksm_pool *pool, size_t pfn);
void uksm_frames_flush(struct uksm_pool *pool);
/* merge.c; caller holds pool->lock */
int uksm_break_cow(struct uksm_pool *pool, size_t vpn, size_t n, size_t limit,
		   int whole);
int uksm_map_frames(struct uksm_pool *pool, size_t vpn, size_t n, size_t pfn,
		    int writable);

#endif /* UKSM_INTERNAL_H */
