/* SPDX-License-Identifier: MIT */
/*
 * uksm_internal.h - the pool structure, pool->lock and the frame allocator,
 * shared by every file of the core.  Everything here may be called from
 * the SIGSEGV handler, so it must stay async-signal-safe: syscalls, atomics,
 * plain memory; no malloc, no stdio, no locks but pool->lock.
 */
#ifndef UKSM_INTERNAL_H
#define UKSM_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uksm.h"

#include <fcntl.h>
#include <sys/mman.h>

/*
 * Fault injection, for the tests: uksm_inject() arms an operation
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

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE	23
#endif

/* /proc/self/pagemap entry bits */
#define PM_PRESENT	(1ULL << 63)
#define PM_SWAP		(1ULL << 62)
#define PM_FILE		(1ULL << 61)	/* file page or shared anonymous */
#define PM_EXCLUSIVE	(1ULL << 56)	/* mapped exactly once */

/*
 * Has the kernel copied this view on write?  A view's page not yet
 * written is the file's page (bit 61) or not mapped in at all; once copied
 * it is anonymous (present or swapped, bit 61 clear), for good.
 */
static inline int pm_cowed(uint64_t e)
{
	return (e & (PM_PRESENT | PM_SWAP)) && !(e & PM_FILE);
}

/*
 * Is this private (anonymous) page's memory really there?  Present and not
 * a file page: an untouched page read maps the zero page, whose entry says
 * "file" when it is the huge zero page (uksm_pagemap_read clears the 4 KiB
 * one's present bit).  Either costs nothing.
 */
static inline int pm_anon_present(uint64_t e)
{
	return (e & (PM_PRESENT | PM_FILE)) == PM_PRESENT || (e & PM_SWAP);
}

/* Scratch for one run of uksm_merge_runs(); used only under pool->lock. */
struct uksm_run_ctx {
	int64_t target[UKSM_RUN_MAX];	/* frame each src maps, or a TARGET_* */
	uint8_t wp[UKSM_RUN_MAX];	/* src write-protected here */
	uint8_t anchor_wp[UKSM_RUN_MAX];	/* unstable anchor write-protected here */
	uint8_t ok[UKSM_RUN_MAX];	/* compared equal */
	uint64_t pm[UKSM_RUN_MAX];	/* pagemap entries */
};

struct uksm_pool {
	int fd;				/* the frame store: a memfd */
	int ro_fd;			/* the same, read-only: views map this */
	int cow_mode;			/* enum uksm_cow_mode */
	int heir;			/* a forked child's: store and swap are the parent's */
	char *va;			/* user virtual range, va_pages long */
	size_t va_pages;
	size_t capacity_pages;		/* pages of live buffers allowed */
	char *direct;			/* linear rw map of the whole memfd */
	size_t nr_frames;		/* frame table size */
	size_t frames_online;		/* frames below this may be used (shrink) */
	size_t file_frames;		/* current ftruncate()d size, in frames */

	struct uksm_frame *frames;	/* nr_frames entries */
	uint64_t *frame_map;		/* bit set = frame in use (or deferred) */
	size_t frame_hint;		/* no free frame below this pfn */

	struct uksm_pte *ptes;		/* va_pages entries */
	uint64_t *va_map;		/* bit set = vpn reserved by a buffer */
	size_t va_hint;

	uint32_t next_key;
	size_t punch_start;		/* run of freed frames not yet punched */
	size_t punch_len;
	size_t direct_lo, direct_hi;	/* frames touched through the direct map */
	_Atomic int lock;		/* 0 free, 1 held, 2 held with waiters */
	struct uksm_stats st;
	struct uksm_run_ctx run;
	/*
	 * VMA pressure: the scanner sets vma_estimate to /proc/self/maps'
	 * count whenever it recounts; the fault handler, which cannot count,
	 * adds what it may split.  Past vma_soft_limit, protection changes
	 * cover whole runs, which only ever remove VMAs.
	 */
	int64_t vma_estimate;
	int64_t vma_soft_limit;

	/* swap (swap.c): all NULL / -1 until uksm_swap_enable() */
	int swap_fd;			/* the swap file: unlinked, 0600 */
	int swap_ro_fd;			/* the same, read-only: swap views map this */
	int swap_dir_fd;		/* its directory, for a detaching child's copy */
	size_t max_resident;		/* pages: reclaim keeps resident below */
	size_t reclaim_batch;		/* pages evicted per batch */
	size_t nr_slots;		/* slot table size (= va_pages) */
	size_t slot_hint;		/* no free slot below this */
	size_t clock_hand;		/* the reclaim clock, a vpn */
	uint16_t *swap_map;		/* per slot: swapped mappers (0 = free) */
	uint32_t *slot_gen;		/* per slot: fork generation of a deferred free */
	uint8_t *slot_stale;		/* per slot: freed, disk blocks not punched */
	size_t stale_slots;
	size_t deferred_slots;
	uint64_t swap_backoff_ns;	/* no eviction before (a write failed) */
	uint32_t *evict_vpn;		/* reclaim scratch: candidate pages */
	uint32_t *evict_slot;		/* and their slots */
	uint8_t *evict_mark;		/* per frame: reclaim scratch */
	uint32_t *evict_slot_of;	/* per frame: its slot, while evicting */
	size_t swap_meta_bytes;
	void *swap_meta;
	int swap_dio_fd;		/* the same, O_DIRECT for slot writes; -1: buffered */
	uint64_t group_pages[UKSM_MAX_GROUPS];	/* resident pages charged, at last count */
	uint64_t group_max[UKSM_MAX_GROUPS];	/* pages; 0: no limit */
	uint64_t group_swapped[UKSM_MAX_GROUPS];
	uint64_t group_swap_ins[UKSM_MAX_GROUPS];
	size_t meta_bytes;		/* size of the tables mapping below */
	void *meta;			/* one mapping holds all the tables */
	/*
	 * uksm_memory()'s count of present views per frame and per slot,
	 * reserved with the tables so that stats() need no new mapping: a
	 * process at vm.max_map_count still learns what it holds.
	 */
	uint16_t *seen;			/* nr_frames + va_pages entries */
	_Atomic int seen_busy;
	struct uksm_events *events;	/* handler.c: the NEP 49 handler's queue */
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

/* frame.c: zap the direct map's entries for the frames touched */
void uksm_direct_zap(struct uksm_pool *pool);

/* Drop pool->lock; the direct map's page table entries go first. */
static inline void uksm_unlock(struct uksm_pool *pool)
{
	if (pool->direct_hi)
		uksm_direct_zap(pool);
	uksm_futex_unlock(&pool->lock);
}

/*
 * The direct map address of frame @pfn.  Everything that touches a frame
 * through it records the range, so that uksm_unlock() can zap those page
 * table entries: a frame must count once per view in RSS, not once more.
 */
static inline char *frames_addr(struct uksm_pool *pool, size_t pfn, size_t n)
{
	if (!pool->direct_hi) {
		pool->direct_lo = pfn;
		pool->direct_hi = pfn + n;
	} else {
		if (pfn < pool->direct_lo)
			pool->direct_lo = pfn;
		if (pfn + n > pool->direct_hi)
			pool->direct_hi = pfn + n;
	}
	return pool->direct + (pfn << UKSM_PAGE_SHIFT);
}

static inline char *frame_addr(struct uksm_pool *pool, size_t pfn)
{
	return frames_addr(pool, pfn, 1);
}

static inline char *page_addr(struct uksm_pool *pool, size_t vpn)
{
	return pool->va + (vpn << UKSM_PAGE_SHIFT);
}

/*
 * [@vpn, @vpn + @npages) lies inside the pool's virtual range.  Both come
 * from the caller, so the sum is checked before it is compared: a wrapped
 * end would pass for a small one and let a table index or a MAP_FIXED land
 * far outside the pool.
 */
static inline int uksm_range_ok(const struct uksm_pool *pool, size_t vpn, size_t npages)
{
	size_t end;

	return !__builtin_add_overflow(vpn, npages, &end) && end <= pool->va_pages;
}

/* Protection of a view (KSM, SWAPPED) or of a ZERO page in this pool. */
static inline int view_prot(const struct uksm_pool *pool)
{
	return pool->cow_mode == UKSM_COW_KERNEL ? PROT_READ | PROT_WRITE : PROT_READ;
}

/*
 * Would pages @a and @a + 1 sit in one VMA now?  Same kind of mapping,
 * consecutive offsets: the kernel keeps such neighbours merged.  PRIVATE
 * pages whose VMA is a view that the kernel copied are not told apart
 * from anonymous ones: the scanner's recount corrects the estimate.
 * Caller holds pool->lock.
 */
static inline int uksm_same_vma(struct uksm_pool *pool, size_t a)
{
	const struct uksm_pte *x = &pool->ptes[a], *y = &pool->ptes[a + 1];
	int ax = x->state == UKSM_PTE_PRIVATE || x->state == UKSM_PTE_ZERO;
	int ay = y->state == UKSM_PTE_PRIVATE || y->state == UKSM_PTE_ZERO;

	if (ax || ay)
		return ax && ay && (pool->cow_mode == UKSM_COW_KERNEL || x->state == y->state);
	return x->state == y->state && x->state != UKSM_PTE_NONE && y->pfn == x->pfn + 1;
}

/* VMAs that changing pages [vpn, vpn + n) alone can add: one per cut end. */
static inline int64_t uksm_split_cost(struct uksm_pool *pool, size_t vpn, size_t n)
{
	return (vpn > 0 && uksm_same_vma(pool, vpn - 1)) +
	       (vpn + n < pool->va_pages && uksm_same_vma(pool, vpn + n - 1));
}

/*
 * Boundaries between VMAs among the page pairs (a, a + 1), a in [@lo, @hi),
 * as uksm_same_vma() sees them.  Counted over the same window before and
 * after a change, the difference is the mappings that change added (or,
 * negative, joined): what the process keeps, unlike the transient cuts of
 * a write-protect.  Caller holds pool->lock.
 */
static inline int64_t uksm_vma_boundaries(struct uksm_pool *pool, size_t lo, size_t hi)
{
	int64_t n = 0;

	if (hi > pool->va_pages - 1)
		hi = pool->va_pages - 1;
	for (size_t a = lo; a < hi; a++)
		n += !uksm_same_vma(pool, a);
	return n;
}

/*
 * The pair window [*lo, *hi) that changing pages [@first, @last] can touch,
 * and the same for a second range (@first2 > @last2: none), as one window
 * when they overlap, or two.  Returns the boundaries in them.
 */
static inline int64_t uksm_vma_window(struct uksm_pool *pool, size_t first, size_t last,
				      size_t first2, size_t last2)
{
	size_t lo = first ? first - 1 : 0, hi = last + 1;
	size_t lo2, hi2;

	if (first2 > last2)
		return uksm_vma_boundaries(pool, lo, hi);
	lo2 = first2 ? first2 - 1 : 0;
	hi2 = last2 + 1;
	if (lo2 <= hi && lo <= hi2)
		return uksm_vma_boundaries(pool, lo < lo2 ? lo : lo2, hi > hi2 ? hi : hi2);
	return uksm_vma_boundaries(pool, lo, hi) + uksm_vma_boundaries(pool, lo2, hi2);
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

/*
 * Fork epochs (pool.c): the newest fork generation, and the oldest one a
 * live child may still hold (0: no child at all).  A frame or slot freed
 * while uksm_oldest_epoch is set waits, tagged with uksm_fork_gen.  Only
 * pool.c's fork hooks write them; frame.c and swap.c read them when they
 * free, without calling up.
 */
extern _Atomic uint32_t uksm_fork_gen;
extern _Atomic uint32_t uksm_oldest_epoch;
extern _Atomic int uksm_fork_frozen;
extern _Atomic int uksm_fork_menders;
/* a fork whose epoch could not be made: from then on nothing is released */
extern _Atomic int uksm_fork_untracked;
/* this process forked, or is a forked child: anonymous pages may be shared */
extern _Atomic int uksm_ever_forked;

static inline int uksm_untracked(void)
{
	return atomic_load(&uksm_fork_untracked);
}

static inline int uksm_must_defer(struct uksm_pool *pool)
{
	return pool->heir || atomic_load(&uksm_oldest_epoch) != 0 || uksm_untracked();
}

/* May a thing freed in generation @gen go back now? */
static inline int uksm_gen_released(uint32_t gen)
{
	uint32_t oldest = atomic_load(&uksm_oldest_epoch);

	return gen != UINT32_MAX && !uksm_untracked() && (!oldest || oldest > gen);
}

/*
 * The core's files, bottom up.  Each calls only files listed before it
 * (tests/test_layout.py checks that the calls between them form no cycle):
 *
 *   frame.c < swap.c < merge.c < migrate.c < pool.c
 *
 * checksum.c and fault.c sit beside merge.c and use what is below it; the
 * NEP 49 handler (handler.c) and the Python glue (pyglue.c) use pool.c's
 * public API from above.  Caller holds pool->lock unless a function says
 * otherwise.
 */

/* frame.c - the frame store and its views: any file of the core may call */
int uksm_pagemap_read(size_t va, size_t n, uint64_t *out);
void uksm_pagemap_forget(void);		/* pool.c's fork hook, in the child */
int uksm_bit_test(const uint64_t *map, size_t i);
void uksm_bit_set(uint64_t *map, size_t i);
void uksm_bit_clear(uint64_t *map, size_t i);
size_t uksm_find_zero_bit(const uint64_t *map, size_t from, size_t limit);
size_t uksm_frame_alloc_run(struct uksm_pool *pool, size_t want, size_t limit,
			    size_t *pfn_out, const void *fill);
size_t uksm_frame_alloc_at(struct uksm_pool *pool, size_t pfn, size_t want,
			   size_t limit, const void *fill);
void uksm_frame_put(struct uksm_pool *pool, size_t pfn);
void uksm_frames_flush(struct uksm_pool *pool);
void uksm_frames_release_deferred(struct uksm_pool *pool);
int uksm_map_view(struct uksm_pool *pool, size_t vpn, size_t n, int fd,
		  size_t off, int prot);
int uksm_map_anon(struct uksm_pool *pool, size_t vpn, size_t n, int prot);
int uksm_reopen_ro(int fd);		/* no lock: a descriptor */

/* swap.c - the swap area's slots: pool.c, and any file that clears a pte */
void uksm_slot_put(struct uksm_pool *pool, size_t slot, uint32_t group);
/* swap.c - the swap area's life: pool.c only */
void uksm_swap_release_deferred(struct uksm_pool *pool);
int uksm_swap_detach(struct uksm_pool *pool);
void uksm_swap_destroy(struct uksm_pool *pool);
size_t uksm_swap_cached_pages(struct uksm_pool *pool);
int uksm_swap_reclaim(struct uksm_pool *pool, size_t nr_pages, int group);	/* no lock */

/* merge.c - pool.c only: its uksm_merge() detaches an heir found here (-EBUSY) */
int uksm_merge_runs(struct uksm_pool *pool, size_t n, const int64_t *src_vpn,
		    const int64_t *dst_vpn, const uint32_t *dst_pfn,
		    const uint32_t *dst_key, uint32_t max_sharing,
		    int64_t *vma_budget, uint32_t *out_pfn, uint32_t *out_key,
		    uint8_t *result);

/* migrate.c - pool.c only: its uksm_compact() detaches an heir, then calls */
int uksm_compact_frames(struct uksm_pool *pool, uint64_t shrink_frames,
			uint32_t *log_from, uint32_t *log_to, size_t log_cap,
			size_t *log_n, struct uksm_compact_stats *out);

/* handler.c - pool.c's uksm_pool_destroy(): the NEP 49 event queue goes */
void uksm_events_destroy(struct uksm_pool *pool);

/*
 * A page's way into and out of KSM, in one place, as in mm/ksm.c's
 * replace_page() and the kernel's zap_pte_range(): the pte and the
 * counters that follow it change together, so that no path can leave a
 * frame's mapcount, a slot's swap_map or the stats telling another story
 * than the ptes.
 *
 * pte_set_ksm - the pte at @pte is now a view of frame @pfn, mapped.  The
 * reference the view holds on the frame (its mapcount) is the caller's,
 * taken before the mmap: merge takes it when the page compares equal, so
 * that max_sharing holds within a run, and gives it back with
 * uksm_frame_put() if the mmap fails.
 */
static inline void pte_set_ksm(struct uksm_pool *pool, struct uksm_pte *pte, size_t pfn)
{
	pte->state = UKSM_PTE_KSM;
	pte->pfn = (uint32_t)pfn;
	pool->st.ksm_mappings++;
}

/*
 * pte_clear - the page at @pte no longer maps anything of ours: a view
 * gives its frame reference back (the frame itself goes with the last
 * one), a swapped page its slot, a zero page its count; the pte is NONE
 * until the caller says what the page is now.  The mapping itself was cut
 * off (remapped, or found copied by the kernel) before: a frame or slot
 * must not go back while a page can still reach it.
 */
static inline void pte_clear(struct uksm_pool *pool, struct uksm_pte *pte)
{
	switch (pte->state) {
	case UKSM_PTE_KSM:
		pool->st.ksm_mappings--;
		uksm_frame_put(pool, pte->pfn);
		break;
	case UKSM_PTE_SWAPPED:
		uksm_slot_put(pool, pte->pfn, pte->group);
		break;
	case UKSM_PTE_ZERO:
		pool->st.zero_pages--;
		break;
	default:
		break;
	}
	pte->state = UKSM_PTE_NONE;
	pte->pfn = 0;
}

/*
 * The kernel copied the view at @vpn on write (or our handler made it do
 * so): the page is private again and holds no reference any more.
 */
static inline void uksm_page_cowed(struct uksm_pool *pool, size_t vpn)
{
	struct uksm_pte *pte = &pool->ptes[vpn];

	switch (pte->state) {
	case UKSM_PTE_KSM:
		pool->st.cow_breaks++;
		break;
	case UKSM_PTE_SWAPPED:
		pool->st.swap_ins++;
		if (pte->group < UKSM_MAX_GROUPS)
			pool->group_swap_ins[pte->group]++;
		break;
	case UKSM_PTE_ZERO:
		pool->st.zero_cow++;
		break;
	default:
		return;
	}
	pte_clear(pool, pte);
	pte->state = UKSM_PTE_PRIVATE;
}

/*
 * uksm_reconcile_locked - learn of the copies the kernel made, from
 * pagemap entries @pm of pages [vpn, vpn + n).  A view copied on write is
 * anonymous now (pm_cowed); a ZERO page written is present and exclusive.
 * Caller read @pm under pool->lock, and flushes.  Returns pages found
 * copied.  Here, not in merge.c, because reclaim (swap.c) and every
 * reader of pagemap need it, and merge.c itself sits above swap.c.
 */
static inline int uksm_reconcile_locked(struct uksm_pool *pool, size_t vpn, size_t n,
					const uint64_t *pm)
{
	int found = 0;

	for (size_t i = 0; i < n; i++) {
		const struct uksm_pte *pte = &pool->ptes[vpn + i];
		int cowed;

		if (pte->state == UKSM_PTE_KSM || pte->state == UKSM_PTE_SWAPPED)
			cowed = pm_cowed(pm[i]);
		else if (pte->state == UKSM_PTE_ZERO)
			cowed = ((pm[i] & PM_PRESENT) && (pm[i] & PM_EXCLUSIVE)) ||
				(pm[i] & PM_SWAP);
		else
			continue;
		if (cowed) {
			uksm_page_cowed(pool, vpn + i);
			found++;
		}
	}
	return found;
}

#endif /* UKSM_INTERNAL_H */
