// SPDX-License-Identifier: MIT
/*
 * swap.c - a swap area of the pool's own: shared pages swappable (seed
 * patches 1, 2, 3, 6, 9), with the kernel doing the swap-in.
 *
 * With max_resident set, the pool keeps what it holds in memory - private
 * pages present, frames in the store, and its swap file's pages in the
 * page cache - under that budget, and writes the rest to a swap file of its
 * own (unlinked, 0600), so a program holds more than its memory budget on
 * machines with no swap.
 *
 * A swapped page is a MAP_PRIVATE view of its slot, mapped from a
 * read-only descriptor.  That is the whole of swap-in: an access by the
 * program or by the kernel (read(2) from the page, np.save) reads the slot
 * back through the page cache, with the kernel's readahead over the
 * clustered slots around it; a write copies it, as for a KSM view, and
 * reconcile (merge.c) then finds the page private again.  Nothing faults
 * into our handler, and nothing can fail for want of a frame.
 *
 * Eviction (try_to_unmap_ksm, patch 2).  The reclaim clock walks the page
 * table from its hand and takes private pages that are present and KSM
 * frames none of whose mappers is locked.  A batch is write-protected (the
 * page lock: a write meanwhile waits in the handler and cannot be lost),
 * pagemap re-read (a view the kernel copied since is private, not the
 * frame's any more), written with pwritev to a run of consecutive slots
 * (one syscall for the batch, straight from the pages or the direct map),
 * and every page of it, every mapper of a shared frame, becomes a view of
 * its slot: one mmap per run of consecutive pages on consecutive slots.
 * The anonymous pages and the frames go back to the kernel with that.  A
 * shared frame is written once, to one slot, for all its mappers: sharing
 * survives swapping.  The write is O_DIRECT where the file system allows
 * it, from the page to the disk with no copy in the page cache; otherwise
 * writeback is started at once (sync_file_range) and the clean pages are
 * dropped from the page cache at the end of the pass (POSIX_FADV_DONTNEED):
 * that is when the memory really goes.  A write
 * error (ENOSPC, EFBIG, EIO) stops the batch before anything is remapped:
 * the pages stay resident, the error is counted, nothing is lost.
 *
 * Aging.  Userspace has no accessed bit; the hint faults of old (pages made
 * PROT_NONE to see if they are touched) made kernel I/O into them fail.
 * Here the page cache gives the second chance instead: a page evicted while
 * in use is read back by the kernel at page-cache speed and stays a view of
 * its slot, clean; the next pass drops the slots' cached pages that no view
 * maps before it evicts anything else.
 *
 * The swap map (swapfile.c's swap_map): a count per slot of the ptes still
 * viewing it; the slot is freed when the last goes (written, freed), and
 * its disk blocks are punched later, in runs (uksm_swap_trim).  A slot
 * freed while a forked child may still view it is deferred, like a frame.
 *
 * mlock (patch 1): a LOCKED page is never evicted, and a frame with a
 * LOCKED mapper stays resident.  Groups (patch 6): a buffer's pages are
 * charged to its group, a frame to the group of its first view; a group
 * over its own limit has its own pages evicted.  No cap on shared frames
 * (patch 9): limits are on pages, not nodes.
 */
#include "uksm_internal.h"

#include <string.h>
#include <sys/uio.h>
#include <time.h>

/* UIO_MAXIOV: one pwritev writes up to 4 MiB of a run */
#define IOV_BATCH	1024
#define EVICT_MAX	4096
/* swap_map value of a freed slot that a forked child may still view */
#define SWAP_MAP_DEFERRED	UINT16_MAX
/* the most views counted on one slot: max_page_sharing is below it */
#define SWAP_MAP_MAX		(UINT16_MAX - 1)

/* evict_mark, per frame: where a shared frame stands in the batch being evicted */
enum {
	EVICT_NONE,		/* not in this batch */
	EVICT_CANDIDATE,	/* being evicted, picked by one of its views */
	EVICT_KEEP,		/* stays: a mapper is locked, or could not be write-protected */
	EVICT_MOVED,		/* written to evict_slot_of[]: its mappers follow it */
};

static uint64_t mono_now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/*
 * The swap file again, write-only and O_DIRECT, for pageout: a slot is
 * written from the page itself to the disk, as the kernel's swap writes
 * from the page it unmaps.  Through the page cache, a batch would first be
 * copied there (twice the batch's memory until written back, in the very
 * pass that is to give memory back), dirtied, throttled as any writer's
 * dirty pages are, then written back and dropped.  Views still read the
 * slots through the page cache (swap_ro_fd), and a direct write
 * invalidates the cached pages of the slots it writes, which no view maps:
 * the slots were free.  -1 where the file system has no O_DIRECT (tmpfs
 * before Linux 6.6) or there is no /proc: buffered writes then.
 */
static int open_direct(int fd)
{
	char path[32] = "/proc/self/fd/", digits[12];
	size_t n = 0, len = strlen(path);

	/* no snprintf: uksm_swap_detach() runs on syscalls alone */
	if (fd < 0)
		return -1;
	do {
		digits[n++] = (char)('0' + fd % 10);
		fd /= 10;
	} while (fd);
	while (n)
		path[len++] = digits[--n];
	path[len] = '\0';
	return open(path, O_WRONLY | O_DIRECT | O_CLOEXEC);
}

int uksm_swap_enable(struct uksm_pool *pool, int swap_fd, int dir_fd,
		     size_t max_resident_pages, size_t batch)
{
	size_t nv = pool->va_pages, nf = pool->nr_frames;
	int ro;
	char *p;

	if (pool->swap_fd >= 0 || swap_fd < 0 || !max_resident_pages)
		return -EINVAL;
	if (batch < 1)
		batch = 1;
	if (batch > EVICT_MAX)
		batch = EVICT_MAX;
	ro = uksm_reopen_ro(swap_fd);
	if (ro < 0)
		return -errno;
	/* nv and nf are bounded at pool creation; checked anyway, as in uksm_pool_create */
	{
		size_t vb, fb;

		if (__builtin_mul_overflow(nv, (size_t)(2 + 4 + 1), &vb) ||
		    __builtin_mul_overflow(nf, (size_t)(1 + 4), &fb) ||
		    __builtin_add_overflow(vb, fb, &pool->swap_meta_bytes) ||
		    __builtin_add_overflow(pool->swap_meta_bytes, (size_t)(2 * EVICT_MAX * 4),
					   &pool->swap_meta_bytes)) {
			close(ro);
			return -EOVERFLOW;
		}
	}
	pool->swap_meta = mmap(NULL, pool->swap_meta_bytes, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (pool->swap_meta == MAP_FAILED) {
		pool->swap_meta = NULL;
		close(ro);
		return -ENOMEM;
	}
	p = pool->swap_meta;
	pool->evict_vpn = (uint32_t *)p;	p += EVICT_MAX * 4;
	pool->evict_slot = (uint32_t *)p;	p += EVICT_MAX * 4;
	pool->slot_gen = (uint32_t *)p;		p += nv * 4;
	pool->evict_slot_of = (uint32_t *)p;	p += nf * 4;
	pool->swap_map = (uint16_t *)p;		p += nv * 2;
	pool->slot_stale = (uint8_t *)p;	p += nv;
	pool->evict_mark = (uint8_t *)p;
	uksm_lock(pool);
	pool->nr_slots = nv;
	pool->max_resident = max_resident_pages;
	pool->reclaim_batch = batch;
	pool->swap_dir_fd = dir_fd;
	pool->swap_dio_fd = open_direct(swap_fd);
	pool->swap_fd = swap_fd;
	pool->swap_ro_fd = ro;
	uksm_unlock(pool);
	return 0;
}

void uksm_swap_destroy(struct uksm_pool *pool)
{
	if (pool->swap_fd >= 0)
		close(pool->swap_fd);
	if (pool->swap_ro_fd >= 0)
		close(pool->swap_ro_fd);
	if (pool->swap_dir_fd >= 0)
		close(pool->swap_dir_fd);
	if (pool->swap_dio_fd >= 0)
		close(pool->swap_dio_fd);
	if (pool->swap_meta)
		munmap(pool->swap_meta, pool->swap_meta_bytes);
}

int uksm_set_max_resident(struct uksm_pool *pool, size_t pages)
{
	if (pool->swap_fd < 0 || !pages)
		return -EINVAL;
	uksm_lock(pool);
	pool->max_resident = pages;
	uksm_unlock(pool);
	return 0;
}

/* A run of up to @want free slots, lowest first.  Caller holds pool->lock. */
static size_t slot_alloc_run(struct uksm_pool *pool, size_t want, size_t *start)
{
	size_t s = pool->slot_hint, n = 0;

	while (s < pool->nr_slots && pool->swap_map[s])
		s++;
	if (s >= pool->nr_slots)
		return 0;
	pool->slot_hint = s;
	while (n < want && s + n < pool->nr_slots && !pool->swap_map[s + n])
		n++;
	*start = s;
	return n;
}

static void slot_free(struct uksm_pool *pool, size_t slot)
{
	pool->swap_map[slot] = 0;
	if (slot < pool->slot_hint)
		pool->slot_hint = slot;
	/*
	 * The disk space goes back later, in runs, from uksm_swap_trim(): a
	 * punch per slot costs ~100 us on ext4, too much for a hot path.
	 */
	pool->slot_stale[slot] = 1;
	pool->stale_slots++;
}

/* One view of @slot is gone (written to, or freed with its buffer). */
void uksm_slot_put(struct uksm_pool *pool, size_t slot, uint32_t group)
{
	pool->st.pages_swapped--;
	if (group < UKSM_MAX_GROUPS)
		pool->group_swapped[group]--;
	if (--pool->swap_map[slot])
		return;
	pool->st.slots_used--;
	if (uksm_must_defer(pool)) {
		pool->swap_map[slot] = SWAP_MAP_DEFERRED;
		pool->slot_gen[slot] = pool->heir ? UINT32_MAX : atomic_load(&uksm_fork_gen);
		pool->deferred_slots++;
		return;
	}
	slot_free(pool, slot);
}

/* Deferred slots whose children are all gone are free again. */
void uksm_swap_release_deferred(struct uksm_pool *pool)
{
	if (!pool->deferred_slots || pool->heir)
		return;
	for (size_t s = 0; s < pool->st.swap_file_slots && pool->deferred_slots; s++) {
		if (pool->swap_map[s] != SWAP_MAP_DEFERRED || !uksm_gen_released(pool->slot_gen[s]))
			continue;
		pool->deferred_slots--;
		slot_free(pool, s);
	}
}

/*
 * Punch the freed slots' disk blocks, in runs (the API and the scanner
 * thread call this).  Below @min stale slots it waits for more.  Returns
 * slots trimmed.
 */
int uksm_swap_trim(struct uksm_pool *pool, size_t min)
{
	size_t trimmed = 0;

	if (pool->swap_fd < 0)
		return 0;
	uksm_lock(pool);
	if (pool->heir || pool->stale_slots < (min ? min : 1)) {
		uksm_unlock(pool);
		return 0;
	}
	for (size_t s = 0; s < pool->st.swap_file_slots;) {
		size_t n = 0;

		while (s + n < pool->st.swap_file_slots && pool->slot_stale[s + n] &&
		       !pool->swap_map[s + n])
			n++;
		if (!n) {
			s++;
			continue;
		}
		(void)fallocate(pool->swap_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
				(off_t)(s * PG), (off_t)(n * PG));
		for (size_t i = s; i < s + n; i++)
			pool->slot_stale[i] = 0;
		trimmed += n;
		s += n;
	}
	pool->stale_slots = 0;
	uksm_unlock(pool);
	return (int)trimmed;
}

/*
 * Make every SWAPPED page of [vpn, vpn + n) private: one
 * MADV_POPULATE_WRITE per run, the kernel reading the slots in and copying
 * them.  Caller holds pool->lock.
 */
static int populate_swapped(struct uksm_pool *pool, size_t vpn, size_t n)
{
	for (size_t r = vpn; r < vpn + n;) {
		size_t e = r;

		while (e < vpn + n && pool->ptes[e].state == UKSM_PTE_SWAPPED)
			e++;
		if (e == r) {
			r++;
			continue;
		}
		if (pool->cow_mode == UKSM_COW_SIGNAL &&
		    uksm_mprotect(page_addr(pool, r), (e - r) * PG, PROT_READ | PROT_WRITE))
			return -errno;
		if (madvise(page_addr(pool, r), (e - r) * PG, MADV_POPULATE_WRITE)) {
			int err = -errno;

			if (!uksm_pagemap_read((size_t)page_addr(pool, r), e - r, pool->run.pm))
				uksm_reconcile_locked(pool, r, e - r, pool->run.pm);
			return err;
		}
		for (size_t i = r; i < e; i++)
			uksm_page_cowed(pool, i);
		r = e;
	}
	return 0;
}

/* Swap in every SWAPPED page of a range (pin, lock). */
int uksm_swap_in_range(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	int err = 0;

	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	if (pool->swap_fd < 0)
		return 0;
	for (size_t done = 0; done < npages && !err;) {
		size_t n = npages - done < UKSM_RUN_MAX ? npages - done : UKSM_RUN_MAX;

		uksm_lock(pool);
		err = populate_swapped(pool, vpn + done, n);
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		done += n;
	}
	return err;
}

/*
 * Drop the swap file's clean pages from the page cache.  A page that a
 * view maps (read back and not written) is kept by the kernel while mapped:
 * unmapping such a view (MADV_DONTNEED on a view the kernel has not copied
 * just re-exposes the same slot) lets it go, unless @keep_mapped.  Caller
 * holds pool->lock.
 */
static void drop_swap_cache(struct uksm_pool *pool, int keep_mapped)
{
	if (!pool->st.swap_file_slots)
		return;
	for (size_t v = 0; !keep_mapped && v < pool->va_pages; v += UKSM_RUN_MAX) {
		size_t n = pool->va_pages - v < UKSM_RUN_MAX ? pool->va_pages - v : UKSM_RUN_MAX;
		uint64_t *pm = pool->run.pm;
		int any = 0;

		for (size_t i = 0; i < n && !any; i++)
			any = pool->ptes[v + i].state == UKSM_PTE_SWAPPED;
		if (!any || uksm_pagemap_read((size_t)page_addr(pool, v), n, pm))
			continue;
		uksm_reconcile_locked(pool, v, n, pm);
		for (size_t i = 0; i < n;) {
			size_t e = i;

			while (e < n && pool->ptes[v + e].state == UKSM_PTE_SWAPPED &&
			       (pm[e] & PM_PRESENT) && (pm[e] & PM_FILE))
				e++;
			if (e > i) {
				uint64_t now[UKSM_RUN_MAX];
				char *a = page_addr(pool, v + i);

				/*
				 * The page lock first: a write between our pagemap
				 * read and MADV_DONTNEED would be a copy that the
				 * DONTNEED throws away.  Read-only, the kernel cannot
				 * copy; pagemap again, then drop what is still the
				 * slot's own page.
				 */
				if (!uksm_mprotect(a, (e - i) * PG, PROT_READ) &&
				    !uksm_pagemap_read((size_t)a, e - i, now)) {
					for (size_t k = 0; k < e - i;) {
						size_t m = k;

						while (m < e - i && !pm_cowed(now[m]))
							m++;
						if (m > k)
							(void)madvise(a + k * PG, (m - k) * PG,
								      MADV_DONTNEED);
						k = m + (m == k);
					}
					uksm_reconcile_locked(pool, v + i, e - i, now);
				}
				(void)uksm_mprotect(a, (e - i) * PG, view_prot(pool));
			}
			i = e + (e == i);
		}
		uksm_frames_flush(pool);
	}
	(void)posix_fadvise(pool->swap_fd, 0, (off_t)(pool->st.swap_file_slots * PG),
			    POSIX_FADV_DONTNEED);
}

/* Swap file pages in the page cache, by mincore over a mapping of it. */
size_t uksm_swap_cached_pages(struct uksm_pool *pool)
{
	size_t len = pool->st.swap_file_slots * PG, cached = 0;
	unsigned char vec[UKSM_RUN_MAX];
	char *m;

	if (pool->swap_fd < 0 || !len)
		return 0;
	m = mmap(NULL, len, PROT_READ, MAP_SHARED, pool->swap_fd, 0);
	if (m == MAP_FAILED)
		return 0;
	for (size_t s = 0; s < pool->st.swap_file_slots; s += UKSM_RUN_MAX) {
		size_t k = pool->st.swap_file_slots - s;

		if (k > UKSM_RUN_MAX)
			k = UKSM_RUN_MAX;
		if (mincore(m + s * PG, k * PG, vec))
			break;
		for (size_t i = 0; i < k; i++)
			cached += vec[i] & 1;
	}
	munmap(m, len);
	return cached;
}

/*
 * Count what the pool holds resident, per group too: private pages present
 * (pagemap; reconciling on the way), frames in use, and the swap file's
 * cached pages.  Takes pool->lock a chunk at a time.
 */
static size_t count_resident(struct uksm_pool *pool)
{
	uint64_t groups[UKSM_MAX_GROUPS] = { 0 };
	size_t total;

	for (size_t v = 0; v < pool->va_pages; v += UKSM_RUN_MAX) {
		size_t n = pool->va_pages - v < UKSM_RUN_MAX ? pool->va_pages - v : UKSM_RUN_MAX;
		uint64_t *pm = pool->run.pm;
		int any = 0;

		uksm_lock(pool);
		for (size_t i = 0; i < n && !any; i++)
			any = pool->ptes[v + i].state != UKSM_PTE_NONE;
		if (any && !uksm_pagemap_read((size_t)page_addr(pool, v), n, pm)) {
			uksm_reconcile_locked(pool, v, n, pm);
			uksm_frames_flush(pool);
			for (size_t i = 0; i < n; i++)
				if (pool->ptes[v + i].state == UKSM_PTE_PRIVATE &&
				    pm_anon_present(pm[i]))
					groups[pool->ptes[v + i].group]++;
		}
		uksm_unlock(pool);
	}
	uksm_lock(pool);
	for (size_t f = 0; f < pool->file_frames; f++)
		if (pool->frames[f].mapcount)
			groups[pool->frames[f].group]++;
	total = uksm_swap_cached_pages(pool);
	for (int g = 0; g < UKSM_MAX_GROUPS; g++) {
		pool->group_pages[g] = groups[g];
		total += groups[g];
	}
	uksm_unlock(pool);
	return total;
}

static int evictable(const struct uksm_pte *pte)
{
	return !(pte->flags & (UKSM_PTE_PINNED | UKSM_PTE_LOCKED));
}

/*
 * Pick a batch of up to @want candidates from the clock hand: private pages
 * present, and KSM frames (by one of their views: EVICT_CANDIDATE).  Caller
 * holds pool->lock.  Returns candidates in evict_vpn[].
 */
static size_t pick_batch(struct uksm_pool *pool, size_t want, int group, size_t *walked)
{
	size_t n = 0, limit = *walked + pool->va_pages;

	/* at most one trip round per batch: never the same page twice */
	while (n < want && *walked < limit) {
		size_t v = pool->clock_hand;
		size_t k = pool->va_pages - v < UKSM_RUN_MAX ? pool->va_pages - v : UKSM_RUN_MAX;
		uint64_t *pm = pool->run.pm;

		if (uksm_pagemap_read((size_t)page_addr(pool, v), k, pm))
			break;
		uksm_reconcile_locked(pool, v, k, pm);
		for (size_t i = 0; i < k && *walked < limit; i++) {
			const struct uksm_pte *pte = &pool->ptes[v + i];

			(*walked)++;
			pool->clock_hand = v + i + 1 < pool->va_pages ? v + i + 1 : 0;
			if (!evictable(pte) || (group >= 0 && pte->group != (uint32_t)group))
				continue;
			if (pte->state == UKSM_PTE_PRIVATE && pm_anon_present(pm[i])) {
				pool->evict_vpn[n++] = (uint32_t)(v + i);
			} else if (pte->state == UKSM_PTE_KSM && !pool->evict_mark[pte->pfn] &&
				   pool->frames[pte->pfn].mapcount <= SWAP_MAP_MAX) {
				pool->evict_mark[pte->pfn] = EVICT_CANDIDATE;
				pool->evict_vpn[n++] = (uint32_t)(v + i);
			}
			if (n == want)
				break;
		}
	}
	return n;
}

/* pwritev the batch to slots evict_slot[a..b): pages, or frames. */
static int write_slots(struct uksm_pool *pool, size_t a, size_t b)
{
	struct iovec iov[IOV_BATCH];

	while (a < b) {
		size_t n = 0, first = pool->evict_slot[a];
		ssize_t done = -1;

		while (a + n < b && n < IOV_BATCH && pool->evict_slot[a + n] == first + n) {
			const struct uksm_pte *pte = &pool->ptes[pool->evict_vpn[a + n]];

			iov[n].iov_base = pte->state == UKSM_PTE_KSM ?
					  frame_addr(pool, pte->pfn) :
					  page_addr(pool, pool->evict_vpn[a + n]);
			iov[n].iov_len = PG;
			n++;
		}
		if (uksm_injected(UKSM_OP_PWRITE))
			return -errno;
		if (pool->swap_dio_fd >= 0) {
			done = pwritev(pool->swap_dio_fd, iov, (int)n, (off_t)(first * PG));
			if (done < 0 && errno == EINVAL) {
				/* no direct I/O here after all (alignment): buffered from now on */
				close(pool->swap_dio_fd);
				pool->swap_dio_fd = -1;
			}
		}
		if (pool->swap_dio_fd < 0)
			done = pwritev(pool->swap_fd, iov, (int)n, (off_t)(first * PG));
		if (done < 0)
			return -errno;
		if ((size_t)done != n * PG)
			return -ENOSPC;	/* a short write: the disk is full */
		if (first + n > pool->st.swap_file_slots)
			pool->st.swap_file_slots = first + n;
		a += n;
	}
	return 0;
}

static void to_slot(struct uksm_pool *pool, size_t v, uint32_t slot)
{
	struct uksm_pte *pte = &pool->ptes[v];

	pte_clear(pool, pte);	/* a view's frame reference; a private page has none */
	pte->state = UKSM_PTE_SWAPPED;
	pte->pfn = slot;
	pool->swap_map[slot]++;
	pool->st.pages_swapped++;
	pool->group_swapped[pte->group]++;
}

/*
 * Eviction of one batch, try_to_unmap and pageout in steps (evict_batch).
 * The candidates are evict_vpn[0..n) from pick_batch(); each step narrows
 * them (a page dropped from the batch is UINT32_MAX, or left out of the
 * count), and the per-frame evict_mark says where a shared candidate
 * stands (the enum at the top).
 */

/*
 * Step 1: a frame with a locked (or pinned) mapper stays resident, as
 * try_to_unmap gives up on a VM_LOCKED vma: mark it, then keep only the
 * private candidates and the frames still being evicted.  Returns how
 * many candidates remain.
 */
static size_t evict_keep_locked(struct uksm_pool *pool, size_t n, int shared)
{
	size_t ok = 0;

	if (shared) {
		for (size_t v = 0; v < pool->va_pages; v++) {
			const struct uksm_pte *pte = &pool->ptes[v];

			if (pte->state == UKSM_PTE_KSM &&
			    pool->evict_mark[pte->pfn] == EVICT_CANDIDATE && !evictable(pte))
				pool->evict_mark[pte->pfn] = EVICT_KEEP;
		}
	}
	for (size_t i = 0; i < n; i++) {
		uint32_t v = pool->evict_vpn[i];
		const struct uksm_pte *pte = &pool->ptes[v];

		if (pte->state == UKSM_PTE_KSM && pool->evict_mark[pte->pfn] != EVICT_CANDIDATE) {
			pool->evict_mark[pte->pfn] = EVICT_NONE;
			continue;
		}
		pool->evict_vpn[ok++] = v;
	}
	return ok;
}

/*
 * Step 2: the page lock.  The candidates are write-protected, a run of
 * neighbours at a time: a write from now on waits in the handler until the
 * page is a view of its slot, so what we write is what the page holds.  A
 * run that cannot be protected (vm.max_map_count) is not evicted.
 */
static void evict_lock_pages(struct uksm_pool *pool, size_t ok)
{
	for (size_t i = 0; i < ok;) {
		size_t e = i + 1;

		while (e < ok && pool->evict_vpn[e] == pool->evict_vpn[e - 1] + 1)
			e++;
		if (uksm_mprotect(page_addr(pool, pool->evict_vpn[i]), (e - i) * PG, PROT_READ)) {
			for (size_t k = i; k < e; k++) {
				const struct uksm_pte *pte = &pool->ptes[pool->evict_vpn[k]];

				if (pte->state == UKSM_PTE_KSM)
					pool->evict_mark[pte->pfn] = EVICT_NONE;
				pool->evict_vpn[k] = UINT32_MAX;
			}
		}
		i = e;
	}
}

/*
 * Step 3: the other views of a shared candidate are locked as well, by
 * runs of such views (one mprotect and one pagemap read each).  pagemap
 * then tells which of them the kernel copied on write before the lock: those
 * are private pages now, no longer the frame's, and get their write access
 * back.  A run that cannot be locked keeps its frames resident.
 */
static void evict_lock_sharers(struct uksm_pool *pool)
{
	for (size_t v = 0; v < pool->va_pages;) {
		uint64_t *pm = pool->run.pm;
		size_t e = v;

		while (e < pool->va_pages && e - v < UKSM_RUN_MAX &&
		       pool->ptes[e].state == UKSM_PTE_KSM &&
		       pool->evict_mark[pool->ptes[e].pfn] == EVICT_CANDIDATE)
			e++;
		if (e == v) {
			v++;
			continue;
		}
		if (uksm_mprotect(page_addr(pool, v), (e - v) * PG, PROT_READ) ||
		    uksm_pagemap_read((size_t)page_addr(pool, v), e - v, pm)) {
			for (size_t k = v; k < e; k++)
				pool->evict_mark[pool->ptes[k].pfn] = EVICT_KEEP;
			v = e;
			continue;
		}
		for (size_t k = v; k < e; k++) {
			if (!pm_cowed(pm[k - v]))
				continue;
			uksm_page_cowed(pool, k);
			(void)uksm_mprotect(page_addr(pool, k), PG, PROT_READ | PROT_WRITE);
		}
		v = e;
	}
}

/*
 * Step 4: under the lock, what is still to be evicted: private pages, and
 * frames none of whose mappers stopped it.  A candidate copied on write
 * since pick_batch() stays (it is a private page with new contents, which
 * the next pass may take).  Returns the pages to write, compacted to the
 * front of evict_vpn[].
 */
static size_t evict_recheck(struct uksm_pool *pool, size_t ok)
{
	size_t got = 0;

	for (size_t i = 0; i < ok; i++) {
		uint32_t v = pool->evict_vpn[i];
		const struct uksm_pte *pte;

		if (v == UINT32_MAX)
			continue;
		pte = &pool->ptes[v];
		if (pte->state != UKSM_PTE_PRIVATE &&
		    !(pte->state == UKSM_PTE_KSM &&
		      pool->evict_mark[pte->pfn] == EVICT_CANDIDATE))
			continue;
		pool->evict_vpn[got++] = v;
	}
	return got;
}

/*
 * Step 5: clustered slots (scan_swap_map_slots' cluster): the batch, in
 * address order, goes to runs of consecutive free slots, lowest first.  A
 * run of neighbouring pages on a run of neighbouring slots is then one view,
 * one vma, and the kernel's readahead and fault-around at swap-in read it as
 * the file it is.  Slots are taken (SWAP_MAP_DEFERRED) until written.
 * Returns the pages that got a slot: with the swap file full, fewer.
 */
static size_t evict_alloc_slots(struct uksm_pool *pool, size_t got)
{
	size_t s = 0;

	for (size_t i = 0; i < got;) {
		size_t k = slot_alloc_run(pool, got - i, &s);

		if (!k)
			return i;
		for (size_t j = 0; j < k; j++) {
			pool->evict_slot[i + j] = (uint32_t)(s + j);
			pool->swap_map[s + j] = SWAP_MAP_DEFERRED;
		}
		pool->slot_hint = s + k;
		i += k;
	}
	return got;
}

/*
 * Step 6: pageout.  One pwritev per run of slots, from the pages (or the
 * direct map, for a frame).  A failed write (ENOSPC, EFBIG, EIO) gives the
 * slots back before anything was remapped: every page is still what it
 * was, resident; the error is counted and eviction backs off for a while,
 * as the kernel does with a swap device that fails.  Returns 0 or -errno.
 */
static int evict_write(struct uksm_pool *pool, size_t got)
{
	int err = write_slots(pool, 0, got);

	if (!err)
		return 0;
	for (size_t i = 0; i < got; i++) {
		pool->swap_map[pool->evict_slot[i]] = 0;
		if (pool->evict_slot[i] < pool->slot_hint)
			pool->slot_hint = pool->evict_slot[i];
	}
	pool->st.swap_errors++;
	pool->st.last_swap_errno = (uint64_t)-err;
	pool->swap_backoff_ns = mono_now_ns() + 200000000ull;
	return err;
}

/*
 * Step 7: set_pte to the swap entry.  The slots hold the pages now: each
 * run of neighbouring pages on neighbouring slots becomes one private view
 * of the run (one mmap, replacing the anonymous pages or the frame views
 * under it; the kernel frees them).  A shared frame's slot is noted for its
 * other mappers (step 8).  A view that cannot be mapped (vm.max_map_count)
 * leaves its pages as they were and frees their slots.  Returns pages of
 * memory given back: a private page, or a frame's last mapper.
 */
static long evict_map_views(struct uksm_pool *pool, size_t got)
{
	uint32_t *vp = pool->evict_vpn, *sl = pool->evict_slot;
	long freed = 0;

	for (size_t i = 0; i < got; i++) {
		const struct uksm_pte *pte = &pool->ptes[vp[i]];

		pool->swap_map[sl[i]] = 0;	/* to_slot() counts its views */
		pool->st.slots_used++;
		pool->st.swap_outs++;
		if (pte->state == UKSM_PTE_KSM) {
			pool->evict_slot_of[pte->pfn] = sl[i];
			pool->evict_mark[pte->pfn] = EVICT_MOVED;
		}
	}
	for (size_t i = 0; i < got;) {
		size_t e = i + 1;

		while (e < got && vp[e] == vp[e - 1] + 1 && sl[e] == sl[e - 1] + 1)
			e++;
		if (uksm_map_view(pool, vp[i], e - i, pool->swap_ro_fd, sl[i], view_prot(pool))) {
			for (size_t k = i; k < e; k++) {
				const struct uksm_pte *pte = &pool->ptes[vp[k]];

				if (pte->state == UKSM_PTE_KSM)
					pool->evict_mark[pte->pfn] = EVICT_CANDIDATE;
				pool->st.slots_used--;
				pool->st.swap_outs--;
				slot_free(pool, sl[k]);
			}
			i = e;
			continue;
		}
		for (size_t k = i; k < e; k++) {
			freed += pool->ptes[vp[k]].state == UKSM_PTE_PRIVATE ||
				 pool->frames[pool->ptes[vp[k]].pfn].mapcount == 1;
			to_slot(pool, vp[k], sl[k]);
		}
		i = e;
	}
	return freed;
}

/*
 * Step 8: try_to_unmap for the rest of the rmap: the other mappers of an
 * evicted frame follow it to its slot, one view each, and the frame goes
 * with its last mapper; those of a frame that stays get their protection
 * back.  The marks are cleared for the next batch.  Returns frames freed.
 */
static long evict_follow_frames(struct uksm_pool *pool)
{
	long freed = 0;

	for (size_t v = 0; v < pool->va_pages; v++) {
		const struct uksm_pte *pte = &pool->ptes[v];
		uint8_t mark;

		if (pte->state != UKSM_PTE_KSM)
			continue;
		mark = pool->evict_mark[pte->pfn];
		if (mark == EVICT_MOVED) {
			uint32_t slot = pool->evict_slot_of[pte->pfn];

			if (!uksm_map_view(pool, v, 1, pool->swap_ro_fd, slot, view_prot(pool))) {
				freed += pool->frames[pte->pfn].mapcount == 1;
				to_slot(pool, v, slot);
				continue;
			}
		}
		if (mark != EVICT_NONE)
			(void)uksm_mprotect(page_addr(pool, v), PG, view_prot(pool));
	}
	for (size_t f = 0; f < pool->file_frames; f++)
		pool->evict_mark[f] = EVICT_NONE;
	return freed;
}

/*
 * Step 9: unlock_page.  The candidates that stayed private (copied on write
 * before the lock, no slot left, a view not mapped) get their write access
 * back; those now views have theirs from the mmap.
 */
static void evict_unlock_pages(struct uksm_pool *pool, size_t ok)
{
	for (size_t i = 0; i < ok; i++) {
		uint32_t v = pool->evict_vpn[i];

		if (v != UINT32_MAX && v < pool->va_pages &&
		    pool->ptes[v].state == UKSM_PTE_PRIVATE)
			(void)uksm_mprotect(page_addr(pool, v), PG, PROT_READ | PROT_WRITE);
	}
}

/*
 * Evict candidates evict_vpn[0..n), steps 1 to 9.  Caller holds
 * pool->lock.  Returns pages of memory given back, or -errno if the write
 * failed (then nothing changed but the error count).
 */
static long evict_batch(struct uksm_pool *pool, size_t n)
{
	size_t ok, got;
	long freed = 0;
	int shared = 0, err;

	for (size_t i = 0; i < n; i++)
		shared |= pool->ptes[pool->evict_vpn[i]].state == UKSM_PTE_KSM;
	ok = evict_keep_locked(pool, n, shared);
	evict_lock_pages(pool, ok);
	if (shared)
		evict_lock_sharers(pool);
	got = evict_recheck(pool, ok);
	got = evict_alloc_slots(pool, got);
	err = evict_write(pool, got);
	if (err)
		got = 0;
	freed += evict_map_views(pool, got);
	if (shared)
		freed += evict_follow_frames(pool);
	evict_unlock_pages(pool, ok);
	uksm_frames_flush(pool);
	if (got) {
		/*
		 * Writeback starts now, while the next batch is picked: the
		 * pass's final wait then finds most of it done.
		 */
		(void)sync_file_range(pool->swap_fd, (off_t)(pool->evict_slot[0] * (size_t)PG),
				      (off_t)(got * PG), SYNC_FILE_RANGE_WRITE);
		pool->st.reclaim_runs++;
	}
	return err ? err : freed;
}

/*
 * uksm_swap_reclaim - evict until @nr_pages more are given back, or, with
 * @nr_pages 0, until the pool (and @group, if >= 0, under its own limit)
 * is back under budget.  One batch per hold of pool->lock.  Returns pages
 * given back, or -errno of a failed swap write.  The swap file written is
 * the pool's own: pool.c's uksm_reclaim() detached an heir, whose file is
 * its parent's; one still an heir is left alone (-EBUSY).
 */
int uksm_swap_reclaim(struct uksm_pool *pool, size_t nr_pages, int group)
{
	size_t freed = 0, walked = 0, resident, limit, want;

	if (pool->swap_fd < 0)
		return -EINVAL;
	if (group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	if (pool->swap_backoff_ns && mono_now_ns() < pool->swap_backoff_ns)
		return 0;
	uksm_lock(pool);
	if (pool->heir) {
		uksm_unlock(pool);
		return -EBUSY;
	}
	drop_swap_cache(pool, 0);
	uksm_unlock(pool);
	resident = count_resident(pool);
	if (nr_pages) {
		want = nr_pages;
	} else if (group >= 0 && pool->group_max[group]) {
		want = pool->group_pages[group] > pool->group_max[group] ?
		       pool->group_pages[group] - pool->group_max[group] : 0;
	} else {
		limit = pool->max_resident;
		want = resident > limit ? resident - limit : 0;
	}
	while (freed < want && walked < 2 * pool->va_pages) {
		size_t n;
		long r;

		uksm_lock(pool);
		n = pick_batch(pool, want - freed < pool->reclaim_batch ?
				     want - freed : pool->reclaim_batch, group, &walked);
		r = n ? evict_batch(pool, n) : 0;
		uksm_unlock(pool);
		if (r < 0)
			return (int)r;
		if (!n)
			break;
		freed += (size_t)r;
	}
	if (freed) {
		/*
		 * The evicted pages sit dirty in the page cache until written
		 * back: only then does the memory go.  Write back and drop them
		 * now, without pool->lock (readers of the views need none).
		 */
		(void)sync_file_range(pool->swap_fd, 0, 0, SYNC_FILE_RANGE_WAIT_BEFORE |
				      SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
		(void)posix_fadvise(pool->swap_fd, 0, 0, POSIX_FADV_DONTNEED);
	}
	return (int)freed;
}

/* pool.lock()/unlock(): LOCKED pages are swapped in and never evicted. */
int uksm_set_locked(struct uksm_pool *pool, size_t vpn, size_t npages, int on)
{
	int err = 0;

	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	if (on) {
		/* in first, then locked: a lock that fails leaves nothing locked */
		err = uksm_swap_in_range(pool, vpn, npages);
		if (err)
			return err;
	}
	uksm_lock(pool);
	for (size_t i = vpn; i < vpn + npages; i++) {
		if (on)
			pool->ptes[i].flags |= UKSM_PTE_LOCKED;
		else
			pool->ptes[i].flags &= ~UKSM_PTE_LOCKED;
	}
	uksm_unlock(pool);
	return err;
}

/* Put a buffer's pages in @group; their private pages are charged there. */
int uksm_set_group(struct uksm_pool *pool, size_t vpn, size_t npages, int group)
{
	if (!uksm_range_ok(pool, vpn, npages) || group < 0 ||
	    group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = vpn; i < vpn + npages; i++) {
		struct uksm_pte *pte = &pool->ptes[i];

		if (pte->state == UKSM_PTE_SWAPPED) {
			pool->group_swapped[pte->group]--;
			pool->group_swapped[group]++;
		}
		pte->group = (uint8_t)group;
	}
	uksm_unlock(pool);
	return 0;
}

int uksm_group_limit(struct uksm_pool *pool, int group, size_t max_pages)
{
	if (group < 0 || group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	uksm_lock(pool);
	pool->group_max[group] = max_pages;
	uksm_unlock(pool);
	return 0;
}

/* resident pages charged (at the last count), pages swapped, swap-ins, limit */
int uksm_group_stats(struct uksm_pool *pool, int group, uint64_t *out4)
{
	if (group < 0 || group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	if (pool->swap_fd >= 0)
		count_resident(pool);
	uksm_lock(pool);
	out4[0] = pool->group_pages[group];
	out4[1] = pool->group_swapped[group];
	out4[2] = pool->group_swap_ins[group];
	out4[3] = pool->group_max[group];
	uksm_unlock(pool);
	return 0;
}

/*
 * An heir's swap file is its parent's, which it must never write: at its
 * detach it takes a copy of its own, in the same directory, unlinked, and
 * moves its swap views there.  Caller holds pool->lock; syscalls only.
 */
int uksm_swap_detach(struct uksm_pool *pool)
{
	loff_t in = 0, out = 0;
	size_t left;
	int fd, ro;

	if (pool->swap_fd < 0)
		return 0;
	fd = openat(pool->swap_dir_fd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	if (fd < 0) {
		/* no O_TMPFILE here: a named file, unlinked at once */
		char name[] = ".uksm-swap-child-XXXXXXXXXX";
		pid_t pid = (pid_t)syscall(SYS_getpid);

		for (int i = 0; i < 10; i++) {
			name[sizeof(name) - 2 - i] = (char)('0' + pid % 10);
			pid /= 10;
		}
		fd = openat(pool->swap_dir_fd, name, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
		if (fd >= 0)
			unlinkat(pool->swap_dir_fd, name, 0);
	}
	if (fd < 0)
		return -errno;
	left = pool->st.swap_file_slots * PG;
	while (left) {
		ssize_t n = copy_file_range(pool->swap_fd, &in, fd, &out, left, 0);

		if (n <= 0)
			break;
		left -= (size_t)n;
	}
	ro = left ? -1 : uksm_reopen_ro(fd);
	if (ro < 0) {
		close(fd);
		return -EIO;
	}
	for (size_t v = 0; v < pool->va_pages; v++) {
		uint64_t e;

		if (pool->ptes[v].state != UKSM_PTE_SWAPPED)
			continue;
		/* read-only first: no copy can happen between pagemap and mmap;
		 * failing that, the page stays on the parent's slot (kept for us) */
		if (uksm_mprotect(page_addr(pool, v), PG, PROT_READ))
			continue;
		if (uksm_pagemap_read((size_t)page_addr(pool, v), 1, &e) || pm_cowed(e)) {
			/* the child's own copy: reconcile finds it */
			(void)uksm_mprotect(page_addr(pool, v), PG, view_prot(pool));
			continue;
		}
		(void)uksm_map_view(pool, v, 1, ro, pool->ptes[v].pfn, view_prot(pool));
	}
	for (size_t s = 0; s < pool->st.swap_file_slots; s++) {
		if (pool->swap_map[s] == SWAP_MAP_DEFERRED) {
			pool->deferred_slots--;
			slot_free(pool, s);
		}
	}
	dup3(fd, pool->swap_fd, O_CLOEXEC);
	dup3(ro, pool->swap_ro_fd, O_CLOEXEC);
	close(fd);
	close(ro);
	/* the parent's file must never be written: direct writes go to the copy */
	if (pool->swap_dio_fd >= 0)
		close(pool->swap_dio_fd);
	pool->swap_dio_fd = open_direct(pool->swap_fd);
	return 0;
}
