// SPDX-License-Identifier: MIT
/*
 * pool.c - the pool: its virtual range and page table, buffers, memory
 * figures, fork epochs and the heir's detach.  The pool owns the rest of
 * the core: it calls into frame.c (the frame store), swap.c (its swap
 * area), merge.c and migrate.c, and none of them calls back; the entry
 * points that need a store of the pool's own (merge, compact, reclaim)
 * pass through here so that an heir detaches before them.
 */
#include "uksm_internal.h"

#include <poll.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#endif

struct uksm_pool *_Atomic uksm_pools[UKSM_MAX_POOLS];
_Atomic uintptr_t uksm_pool_lo[UKSM_MAX_POOLS];
_Atomic uintptr_t uksm_pool_hi[UKSM_MAX_POOLS];
_Atomic size_t uksm_pools_high;
_Atomic uint32_t uksm_fork_gen;
_Atomic uint32_t uksm_oldest_epoch;
/* this process forked, or is a forked child: anonymous pages may be shared */
_Atomic int uksm_ever_forked;
/*
 * Serialises pool creation and destruction against fork, and guards the
 * epoch table: the fork hooks hold it from prepare to parent/child, so no
 * pool they locked can be unmapped under them.  Never taken by the fault
 * handler.
 */
static _Atomic int registry_lock;

static void uksm_atfork_prepare(void);
static void uksm_atfork_parent(void);
static void uksm_atfork_child(void);
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void register_atfork(void)
{
	pthread_atfork(uksm_atfork_prepare, uksm_atfork_parent, uksm_atfork_child);
}

/*
 * Register at load time.  Prepare handlers run in reverse order of
 * registration, so a library registered before us (OpenBLAS, when numpy
 * was imported first) runs its prepare after ours, while we hold every
 * pool->lock: if it then joins a worker thread that faulted on a pool page,
 * that worker must not wait for our lock - it does not, since
 * uksm_fork_frozen tells the handler that nothing is in transit.
 */
__attribute__((constructor)) static void uksm_init(void)
{
	pthread_once(&atfork_once, register_atfork);
}

static size_t bitmap_bytes(size_t bits)
{
	return ((bits + 63) / 64) * 8;
}


/*
 * uksm_pool_create - a pool whose buffers may span @capacity_pages, in a
 * virtual range of @va_pages (huge-page aligned), with a frame store of up
 * to @nr_frames.  Reserving address space and table space costs nothing
 * until touched: all of it is MAP_NORESERVE anonymous memory.
 */
int uksm_pool_create(size_t capacity_pages, size_t nr_frames, size_t va_pages,
		     int cow_mode, struct uksm_pool **out)
{
	struct uksm_pool *pool;
	size_t off, slot, align = UKSM_HPAGE_PAGES * PG;
	size_t frame_bytes, pte_bytes, meta_bytes, va_bytes, direct_bytes, seen_bytes;
	char *meta, *va;
	int err;

	if (!capacity_pages || !va_pages || !nr_frames || nr_frames >= UINT32_MAX ||
	    va_pages >= UINT32_MAX || capacity_pages > va_pages ||
	    (cow_mode != UKSM_COW_KERNEL && cow_mode != UKSM_COW_SIGNAL))
		return -EINVAL;
	/*
	 * The 32-bit bounds above keep these in range on 64-bit, but say so
	 * where the sizes are made, not in a proof elsewhere: a size that
	 * wrapped would reserve a small range and index a large one.
	 */
	if (__builtin_mul_overflow(nr_frames, sizeof(struct uksm_frame), &frame_bytes) ||
	    __builtin_mul_overflow(va_pages, sizeof(struct uksm_pte), &pte_bytes) ||
	    __builtin_add_overflow(frame_bytes, pte_bytes, &meta_bytes) ||
	    __builtin_add_overflow(meta_bytes, bitmap_bytes(nr_frames), &meta_bytes) ||
	    __builtin_add_overflow(meta_bytes, bitmap_bytes(va_pages), &meta_bytes) ||
	    __builtin_add_overflow(nr_frames, va_pages, &seen_bytes) ||
	    __builtin_mul_overflow(seen_bytes, sizeof(uint16_t), &seen_bytes) ||
	    __builtin_add_overflow(meta_bytes, seen_bytes, &meta_bytes) ||
	    __builtin_mul_overflow(nr_frames, PG, &direct_bytes) ||
	    __builtin_mul_overflow(va_pages, PG, &va_bytes) ||
	    __builtin_add_overflow(va_bytes, align, &off))
		return -EOVERFLOW;
	pthread_once(&atfork_once, register_atfork);

	pool = mmap(NULL, sizeof(*pool), PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (pool == MAP_FAILED)
		return -ENOMEM;
	memset(pool, 0, sizeof(*pool));
	pool->nr_frames = nr_frames;
	pool->frames_online = nr_frames;
	pool->capacity_pages = capacity_pages;
	pool->va_pages = va_pages;
	pool->cow_mode = cow_mode;
	pool->fd = pool->ro_fd = -1;
	pool->swap_fd = pool->swap_ro_fd = pool->swap_dir_fd = pool->swap_dio_fd = -1;
	pool->vma_soft_limit = INT64_MAX;
	pool->va = MAP_FAILED;
	pool->direct = MAP_FAILED;
	pool->meta = MAP_FAILED;

	pool->meta_bytes = meta_bytes;
	meta = mmap(NULL, pool->meta_bytes, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (meta == MAP_FAILED)
		goto out_errno;
	pool->meta = meta;
	off = 0;
	pool->frames = (struct uksm_frame *)(meta + off);
	off += frame_bytes;
	pool->ptes = (struct uksm_pte *)(meta + off);
	off += pte_bytes;
	pool->frame_map = (uint64_t *)(meta + off);
	off += bitmap_bytes(nr_frames);
	pool->va_map = (uint64_t *)(meta + off);
	off += bitmap_bytes(va_pages);
	pool->seen = (uint16_t *)(meta + off);

	pool->fd = memfd_create("uksm", MFD_CLOEXEC);
	if (pool->fd < 0)
		goto out_errno;
	pool->ro_fd = uksm_reopen_ro(pool->fd);
	if (pool->ro_fd < 0)
		goto out_errno;
	pool->direct = mmap(NULL, direct_bytes, PROT_READ | PROT_WRITE,
			    MAP_SHARED | MAP_NORESERVE, pool->fd, 0);
	if (pool->direct == MAP_FAILED)
		goto out_errno;
	/* huge-page aligned, so that big private buffers get THP */
	va = mmap(NULL, va_bytes + align, PROT_NONE,
		  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (va == MAP_FAILED)
		goto out_errno;
	pool->va = (char *)(((uintptr_t)va + align - 1) & ~(uintptr_t)(align - 1));
	if (pool->va > va)
		munmap(va, (size_t)(pool->va - va));
	munmap(pool->va + va_pages * PG, (size_t)(va + align - pool->va));

	uksm_futex_lock(&registry_lock);
	for (slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		struct uksm_pool *expected = NULL;

		if (atomic_compare_exchange_strong(&uksm_pools[slot], &expected, pool)) {
			if (slot + 1 > atomic_load(&uksm_pools_high))
				atomic_store(&uksm_pools_high, slot + 1);
			/* lo first, hi last: a slot counts only once hi is set */
			atomic_store(&uksm_pool_lo[slot], (uintptr_t)pool->va);
			atomic_store(&uksm_pool_hi[slot], (uintptr_t)(pool->va + va_pages * PG));
			break;
		}
	}
	uksm_futex_unlock(&registry_lock);
	if (slot == UKSM_MAX_POOLS) {
		err = -EMFILE;
		goto out;
	}
	*out = pool;
	return 0;

out_errno:
	err = -errno;
out:
	uksm_pool_destroy(pool);
	return err;
}

/* Caller guarantees no buffer of the pool is still in use. */
void uksm_pool_destroy(struct uksm_pool *pool)
{
	uksm_futex_lock(&registry_lock);
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		if (atomic_load(&uksm_pools[slot]) != pool)
			continue;
		atomic_store(&uksm_pool_hi[slot], 0);	/* hi first: the slot is off */
		atomic_store(&uksm_pool_lo[slot], 0);
		atomic_store(&uksm_pools[slot], NULL);
	}
	uksm_futex_unlock(&registry_lock);
	/*
	 * A forked child may still map our frames and slots through its own
	 * views: they stay valid after we close and unmap ours, since the
	 * child's mappings hold the files.  Nothing to defer here.
	 */
	if (pool->va != MAP_FAILED)
		munmap(pool->va, pool->va_pages * PG);
	if (pool->direct != MAP_FAILED)
		munmap(pool->direct, pool->nr_frames * PG);
	if (pool->fd >= 0)
		close(pool->fd);
	if (pool->ro_fd >= 0)
		close(pool->ro_fd);
	uksm_swap_destroy(pool);
	uksm_events_destroy(pool);
	if (pool->meta != MAP_FAILED)
		munmap(pool->meta, pool->meta_bytes);
	munmap(pool, sizeof(*pool));
}

char *uksm_pool_va(struct uksm_pool *pool)
{
	return pool->va;
}

int uksm_pool_fd(struct uksm_pool *pool)
{
	return pool->fd;
}

/* The scanner's latest count of the process's VMAs, and where protection
 * changes should start covering whole runs. */
void uksm_set_vma_state(struct uksm_pool *pool, int64_t maps, int64_t soft_limit)
{
	uksm_lock(pool);
	pool->vma_estimate = maps;
	pool->vma_soft_limit = soft_limit;
	uksm_unlock(pool);
}

int64_t uksm_vma_estimate(struct uksm_pool *pool)
{
	return pool->vma_estimate;
}

void uksm_pool_stats(struct uksm_pool *pool, struct uksm_stats *st)
{
	uksm_lock(pool);
	*st = pool->st;
	uksm_unlock(pool);
}

/*
 * First-fit run of @n free virtual pages; caller holds pool->lock.  Runs
 * of a huge page or more start on a huge-page boundary, so that the kernel
 * can back them with THP.
 */
static int va_alloc(struct uksm_pool *pool, size_t n, size_t *vpn_out)
{
	size_t align = n >= UKSM_HPAGE_PAGES ? UKSM_HPAGE_PAGES : 1;
	size_t start = uksm_find_zero_bit(pool->va_map, pool->va_hint, pool->va_pages);
	size_t first = start;

	for (;;) {
		size_t len = 0;

		start = (start + align - 1) & ~(align - 1);
		if (!uksm_range_ok(pool, start, n))
			return -ENOSPC;
		while (len < n && !uksm_bit_test(pool->va_map, start + len))
			len++;
		if (len == n) {
			for (size_t i = 0; i < n; i++)
				uksm_bit_set(pool->va_map, start + i);
			if (start == first)
				pool->va_hint = start + n;
			*vpn_out = start;
			return 0;
		}
		start = uksm_find_zero_bit(pool->va_map, start + len, pool->va_pages);
	}
}

/*
 * Give back the pages of the pte table that now describe free address
 * space only (every pte in them NONE, which reads back as the zero page
 * does): the table costs what the buffers in use cost, not what a pool
 * that churned through its whole range once touched.  A page shared with
 * the neighbouring tables, or with a pte still in use, stays.  Caller
 * holds pool->lock.
 */
static void ptes_trim(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	const size_t sz = sizeof(struct uksm_pte);
	const uintptr_t base = (uintptr_t)pool->ptes, end = base + pool->va_pages * sz;
	uintptr_t p = (base + vpn * sz) & ~(uintptr_t)(PG - 1);
	uintptr_t hi = (base + (vpn + npages) * sz + PG - 1) & ~(uintptr_t)(PG - 1);
	uintptr_t run = 0;

	for (; p <= hi; p += PG) {
		int free = p < hi && p >= base && p + PG <= end;

		for (size_t i = (p - base) / sz; free && i < (p + PG - base) / sz; i++)
			free = !uksm_bit_test(pool->va_map, i);
		if (free && !run)
			run = p;
		if (!free && run) {
			(void)madvise((void *)run, p - run, MADV_DONTNEED);
			run = 0;
		}
	}
}

int uksm_va_free(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = 0; i < npages; i++)
		uksm_bit_clear(pool->va_map, vpn + i);
	if (vpn < pool->va_hint)
		pool->va_hint = vpn;
	ptes_trim(pool, vpn, npages);
	uksm_unlock(pool);
	return 0;
}

/*
 * uksm_alloc - a new buffer of @npages: private anonymous memory over a run
 * of virtual pages, mapped read-write in one call and nothing touched: it
 * is committed page by page as it is written, like numpy's own arrays, and
 * the kernel's overcommit policy answers for it at once (ENOMEM here, not
 * the OOM killer later).  On failure nothing is left allocated and *stage
 * says which step failed (enum uksm_alloc_stage).
 */
int uksm_alloc(struct uksm_pool *pool, size_t npages, size_t *vpn_out, int *stage)
{
	size_t vpn;
	int err;

	*stage = UKSM_ALLOC_CAPACITY;
	if (!npages || npages > pool->capacity_pages)
		return -ENOMEM;
	uksm_lock(pool);
	if (pool->st.pages_mapped + npages > pool->capacity_pages) {
		uksm_unlock(pool);
		return -ENOMEM;
	}
	err = va_alloc(pool, npages, &vpn);
	if (err) {
		uksm_unlock(pool);
		*stage = UKSM_ALLOC_VA;
		return err;
	}
	err = uksm_map_anon(pool, vpn, npages, PROT_READ | PROT_WRITE);
	if (err) {
		for (size_t i = 0; i < npages; i++)
			uksm_bit_clear(pool->va_map, vpn + i);
		if (vpn < pool->va_hint)
			pool->va_hint = vpn;
		uksm_unlock(pool);
		*stage = UKSM_ALLOC_COMMIT;
		return err;
	}
	if (npages >= UKSM_HPAGE_PAGES)
		(void)madvise(page_addr(pool, vpn), npages * PG, MADV_HUGEPAGE);
	for (size_t i = vpn; i < vpn + npages; i++) {
		pool->ptes[i].state = UKSM_PTE_PRIVATE;
		pool->ptes[i].pfn = 0;
		pool->ptes[i].flags = 0;
		pool->ptes[i].group = 0;
	}
	pool->st.pages_mapped += npages;
	uksm_unlock(pool);
	*vpn_out = vpn;
	*stage = UKSM_ALLOC_OK;
	return 0;
}

/*
 * uksm_release - a buffer is gone: cut its pages off first (PROT_NONE
 * anonymous memory over them gives the private pages back to the kernel
 * and unmaps every view), then drop the frame and slot references.  The
 * virtual range stays reserved until uksm_va_free(): the scanner must
 * forget the pages before the range can belong to another buffer.
 */
int uksm_release(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	int err = 0;

	/* checked before anything is mapped: MAP_FIXED would take any address */
	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	for (size_t done = 0; done < npages;) {
		size_t n = npages - done;

		if (n > 8 * UKSM_RUN_MAX)
			n = 8 * UKSM_RUN_MAX;
		uksm_lock(pool);
		/*
		 * The frames may go back only once nothing can reach them: if
		 * neither remapping nor mprotect can cut the pages off (ENOMEM
		 * at vm.max_map_count), keep this chunk as it is and report it.
		 */
		if (uksm_map_anon(pool, vpn + done, n, PROT_NONE) &&
		    uksm_mprotect(page_addr(pool, vpn + done), n * PG, PROT_NONE)) {
			err = -errno;
			uksm_unlock(pool);
			done += n;
			continue;
		}
		for (size_t i = vpn + done; i < vpn + done + n; i++) {
			struct uksm_pte *pte = &pool->ptes[i];

			if (pte->state == UKSM_PTE_NONE)
				continue;
			pte_clear(pool, pte);
			pool->st.pages_mapped--;
			pte->flags = 0;
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		done += n;
	}
	return err;
}

/* pool.pin(): pages that must not be merged, moved or swapped while pinned */
int uksm_set_pinned(struct uksm_pool *pool, size_t vpn, size_t npages, int on)
{
	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = vpn; i < vpn + npages; i++) {
		if (on)
			pool->ptes[i].flags |= UKSM_PTE_PINNED;
		else
			pool->ptes[i].flags &= ~UKSM_PTE_PINNED;
	}
	uksm_unlock(pool);
	return 0;
}

int uksm_pages_info(struct uksm_pool *pool, size_t vpn, size_t npages,
		    uint8_t *state, uint32_t *pfn, uint32_t *mapcount)
{
	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = 0; i < npages; i++) {
		struct uksm_pte *pte = &pool->ptes[vpn + i];

		state[i] = pte->state;
		pfn[i] = pte->pfn;
		mapcount[i] = pte->state == UKSM_PTE_KSM ? pool->frames[pte->pfn].mapcount :
			      pte->state == UKSM_PTE_SWAPPED ? pool->swap_map[pte->pfn] : 0;
	}
	uksm_unlock(pool);
	return 0;
}

int uksm_frames_info(struct uksm_pool *pool, const uint32_t *pfns, size_t n,
		     uint32_t *mapcount, uint32_t *key, uint32_t *flags)
{
	uksm_lock(pool);
	for (size_t i = 0; i < n; i++) {
		if (pfns[i] >= pool->nr_frames) {
			mapcount[i] = key[i] = flags[i] = 0;
			continue;
		}
		mapcount[i] = pool->frames[pfns[i]].mapcount;
		key[i] = pool->frames[pfns[i]].key;
		flags[i] = pool->frames[pfns[i]].flags;
	}
	uksm_unlock(pool);
	return 0;
}

/*
 * uksm_memory - what the kernel holds for pages [vpn, vpn + npages) of the
 * pool, from its own accounting: pagemap for the pages (present, anonymous
 * or a view), st_blocks for the frame store, mincore for the swap file's
 * page cache.  The figures RSS, USS and PSS are made of; the caller adds
 * them up (uksm/pool.py).  Reconciles on the way, so that the counters
 * read next know every copy the kernel made.  Not for the handler: it
 * reads a lot.
 */
int uksm_memory(struct uksm_pool *pool, size_t vpn, size_t npages,
		struct uksm_memory *out)
{
	const uint64_t range[2] = { vpn, npages };

	return uksm_memory_ranges(pool, range, 1, out);
}

/*
 * uksm_memory_ranges - uksm_memory() over @nranges ranges (vpn, npages
 * pairs in @ranges): the pool's live buffers, as the caller knows them.
 * The cost follows the pages in use, not the address space reserved: a
 * walk of a terabyte pool's whole range would read gigabytes of empty page
 * table (and fault in the page tables of the zero page to do it) to find a
 * few buffers.
 */
int uksm_memory_ranges(struct uksm_pool *pool, const uint64_t *ranges,
		       size_t nranges, struct uksm_memory *out)
{
	uint64_t pm[UKSM_RUN_MAX];
	struct stat stbuf;
	uint16_t *seen = NULL, *seen_slot;
	size_t nframes = pool->file_frames, seen_bytes = 0;
	size_t nslots = pool->swap_fd >= 0 ? pool->st.swap_file_slots : 0;
	int err = 0;

	int own = 0;

	memset(out, 0, sizeof(*out));
	for (size_t r = 0; r < nranges; r++)
		if (!uksm_range_ok(pool, ranges[2 * r], ranges[2 * r + 1]))
			return -EINVAL;
	/*
	 * views present per frame, to tell frames mapped once from shared
	 * ones: in the pool's own table unless another caller has it, so that
	 * a process out of mappings can still read its figures
	 */
	if (nframes + nslots) {
		seen_bytes = (nframes + nslots) * sizeof(*seen);
		if (nframes + nslots <= pool->nr_frames + pool->va_pages &&
		    !atomic_exchange(&pool->seen_busy, 1)) {
			seen = pool->seen;
			memset(seen, 0, seen_bytes);
		} else {
			own = 1;
			seen = mmap(NULL, seen_bytes, PROT_READ | PROT_WRITE,
				    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (seen == MAP_FAILED)
				return -ENOMEM;
		}
	}
	seen_slot = seen ? seen + nframes : NULL;
	for (size_t r = 0; r < nranges && !err; r++) {
		const size_t vpn = ranges[2 * r], npages = ranges[2 * r + 1];

		for (size_t done = 0; done < npages && !err;) {
			size_t n = npages - done < UKSM_RUN_MAX ? npages - done : UKSM_RUN_MAX;

			int any = 0;

			uksm_lock(pool);
			for (size_t i = 0; i < n && !any; i++)
				any = pool->ptes[vpn + done + i].state != UKSM_PTE_NONE;
			err = any ? uksm_pagemap_read((size_t)page_addr(pool, vpn + done), n, pm) : 0;
			if (any && !err) {
				/* the counters read after this must know the kernel's copies */
				uksm_reconcile_locked(pool, vpn + done, n, pm);
				uksm_frames_flush(pool);
			}
			for (size_t i = 0; i < n && any && !err; i++) {
				const struct uksm_pte *pte = &pool->ptes[vpn + done + i];
				uint64_t e = pm[i];

				if (!(e & PM_PRESENT))
					continue;
				if (!(e & PM_FILE) || pte->state == UKSM_PTE_PRIVATE ||
				    pte->state == UKSM_PTE_ZERO) {
					/* anonymous: ours alone, or shared with a relative */
					if (pm_anon_present(e)) {
						out->private_present++;
						out->private_shared += !(e & PM_EXCLUSIVE);
					}
				} else if (pte->state == UKSM_PTE_KSM) {
					out->views_present++;
					if (seen && pte->pfn < nframes && seen[pte->pfn] < UINT16_MAX)
						seen[pte->pfn]++;
				} else if (pte->state == UKSM_PTE_SWAPPED) {
					out->swap_views_present++;
					if (seen_slot && pte->pfn < nslots && seen_slot[pte->pfn] < UINT16_MAX)
						seen_slot[pte->pfn]++;
				}
			}
			uksm_unlock(pool);
			done += n;
		}
	}
	for (size_t f = 0; seen && f < nframes; f++) {
		out->frames_single += seen[f] == 1;
		out->frames_present += seen[f] > 0;
	}
	for (size_t sl = 0; seen_slot && sl < nslots; sl++) {
		out->slots_single += seen_slot[sl] == 1;
		out->slots_present += seen_slot[sl] > 0;
	}
	if (seen && own) {
		munmap(seen, seen_bytes);
	} else if (seen) {
		/* give the pages back; the table stays reserved */
		uintptr_t lo = ((uintptr_t)seen + PG - 1) & ~(uintptr_t)(PG - 1);
		uintptr_t hi = ((uintptr_t)seen + seen_bytes) & ~(uintptr_t)(PG - 1);

		if (hi > lo)
			(void)madvise((void *)lo, hi - lo, MADV_DONTNEED);
		atomic_store(&pool->seen_busy, 0);
	}
	if (!fstat(pool->fd, &stbuf))
		out->frames_blocks = (uint64_t)stbuf.st_blocks * 512 / PG;
	out->swap_cached = uksm_swap_cached_pages(pool);
	return err;
}

/*
 * Fork epochs.  Each fork that finds a pool opens one: a one-page memfd
 * that the forking process maps MAP_SHARED and writable just before the
 * fork and unmaps just after, so that only the child (and whatever it
 * forks in turn) keeps a writable shared mapping of it.  While one exists,
 * F_SEAL_WRITE cannot be added (EBUSY); when the child and every
 * descendant that inherited the mapping have exited or exec'd, the seal
 * goes on, and the frames and slots freed meanwhile may go back.  A
 * mapping, not a descriptor: a child that closes every descriptor it
 * inherited (daemons, closerange before exec) is still followed.
 */
#define MAX_EPOCHS	4096
static struct {
	int fd;
	uint32_t gen;
} epochs[MAX_EPOCHS];
static size_t nr_epochs;
static int fork_epoch_fd = -1;
static void *fork_epoch_map = MAP_FAILED;
static struct uksm_pool *fork_locked[UKSM_MAX_POOLS];
/* a fork whose epoch could not be made: from then on nothing is released */
_Atomic int uksm_fork_untracked;
/* prepare holds every pool->lock: no page is in transit (fault.c) */
_Atomic int uksm_fork_frozen;
/* handlers mending a page without the lock while frozen (fault.c) */
_Atomic int uksm_fork_menders;

static void update_oldest(void)
{
	uint32_t oldest = 0;

	for (size_t i = 0; i < nr_epochs; i++)
		if (!oldest || epochs[i].gen < oldest)
			oldest = epochs[i].gen;
	atomic_store(&uksm_oldest_epoch, oldest);
}

/*
 * uksm_fork_poll - close the epochs whose children are gone and give back
 * what they held.  From the API and the scanner thread, never the handler.
 * Returns the epochs still open.
 */
int uksm_fork_poll(void)
{
	size_t kept = 0;
	int closed = 0;

	uksm_futex_lock(&registry_lock);
	for (size_t i = 0; i < nr_epochs; i++) {
		if (fcntl(epochs[i].fd, F_ADD_SEALS, F_SEAL_WRITE) == 0) {
			close(epochs[i].fd);
			closed = 1;
			continue;
		}
		epochs[kept++] = epochs[i];
	}
	nr_epochs = kept;
	update_oldest();
	if (closed || !nr_epochs) {
		size_t high = atomic_load(&uksm_pools_high);

		for (size_t slot = 0; slot < high; slot++) {
			struct uksm_pool *pool = atomic_load(&uksm_pools[slot]);

			if (!pool || (!pool->st.frames_deferred && !pool->deferred_slots))
				continue;
			uksm_lock(pool);
			uksm_frames_release_deferred(pool);
			uksm_swap_release_deferred(pool);
			uksm_unlock(pool);
		}
	}
	uksm_futex_unlock(&registry_lock);
	return (int)kept;
}

/* The epoch a fork opens: the memfd and its writable shared page; -errno. */
static int epoch_open(void)
{
	int fd = memfd_create("uksm-epoch", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	int err;

	if (fd < 0)
		return -errno;
	if (ftruncate(fd, PG) == 0) {
		fork_epoch_map = mmap(NULL, PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (fork_epoch_map != MAP_FAILED) {
			fork_epoch_fd = fd;
			return 0;
		}
	}
	err = -errno;
	close(fd);
	return err;
}

/*
 * prepare: take the registry and every pool->lock, so that no page is in
 * transit (write-protected mid-merge) when the address space is copied,
 * and open the epoch.  O(pools): the kernel copies the mappings.
 */
static void uksm_atfork_prepare(void)
{
	int any = 0;

	uksm_futex_lock(&registry_lock);
	atomic_store(&uksm_ever_forked, 1);
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		struct uksm_pool *pool = slot < uksm_pools_high ? uksm_pools[slot] : NULL;

		fork_locked[slot] = pool;
		if (pool) {
			uksm_lock(pool);
			uksm_frames_flush(pool);	/* the child must not inherit a pending punch */
			any = 1;
		}
	}
	atomic_store(&uksm_fork_frozen, any);
	if (!any)
		return;
	/* a generation of its own, whether or not it can be followed */
	atomic_fetch_add(&uksm_fork_gen, 1);
	/*
	 * No epoch (no descriptors left, no memory, or MAX_EPOCHS live
	 * children): this child cannot be followed, so from now on every free
	 * is deferred for good.  Memory is kept, never reused under a child.
	 */
	if (nr_epochs >= MAX_EPOCHS || epoch_open())
		atomic_store(&uksm_fork_untracked, 1);
}

static void uksm_atfork_parent(void)
{
	if (fork_epoch_fd >= 0) {
		munmap(fork_epoch_map, PG);	/* only the child's mapping is left */
		fork_epoch_map = MAP_FAILED;
		epochs[nr_epochs].fd = fork_epoch_fd;
		epochs[nr_epochs].gen = atomic_load(&uksm_fork_gen);
		nr_epochs++;
		fork_epoch_fd = -1;
	}
	update_oldest();
	atomic_store(&uksm_fork_frozen, 0);
	while (atomic_load(&uksm_fork_menders))
		__builtin_ia32_pause();
	for (size_t slot = UKSM_MAX_POOLS; slot-- > 0;) {
		struct uksm_pool *pool = fork_locked[slot];

		if (!pool)
			continue;
		uksm_futex_unlock(&pool->lock);
		fork_locked[slot] = NULL;
	}
	uksm_futex_unlock(&registry_lock);
}

/*
 * child: keep the epoch's mapping for life (it is what tells our parent we
 * live); the parent's epochs are not ours; our pools are heirs until they
 * need a store of their own.  Syscalls and plain stores only: a forked
 * child of a threaded process may do no more.
 */
static void uksm_atfork_child(void)
{
	uksm_pagemap_forget();
	if (fork_epoch_fd >= 0)
		close(fork_epoch_fd);	/* the mapping stays */
	fork_epoch_fd = -1;
	fork_epoch_map = MAP_FAILED;
	for (size_t i = 0; i < nr_epochs; i++)
		close(epochs[i].fd);
	nr_epochs = 0;
	atomic_store(&uksm_fork_untracked, 0);
	atomic_store(&uksm_oldest_epoch, 0);
	atomic_store(&uksm_fork_frozen, 0);
	atomic_store(&uksm_fork_menders, 0);	/* only this thread lives on */
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		struct uksm_pool *pool = fork_locked[slot];

		fork_locked[slot] = NULL;
		if (!pool)
			continue;
		pool->heir = 1;
		pool->punch_len = 0;	/* flushed in prepare: nothing pending */
		atomic_store(&pool->lock, 0);
	}
	atomic_store(&registry_lock, 0);	/* the child's own, now */
}

/*
 * uksm_detach - an heir takes a frame store of its own: a new memfd with a
 * copy of every frame its views map (and of its swap file), its views
 * remapped there, one mmap per run.  Frames it freed as an heir were never
 * punched (the parent's): here they are simply not copied.  Caller holds
 * pool->lock.  On failure nothing changed: the pool stays an heir and the
 * operation that needed a store fails.
 */
static int uksm_detach(struct uksm_pool *pool)
{
	int fd, ro, err;
	char *copy;
	size_t bytes = pool->file_frames * PG;

	fd = memfd_create("uksm", MFD_CLOEXEC);
	if (fd < 0)
		return -errno;
	ro = uksm_reopen_ro(fd);
	if (ro < 0 || ftruncate(fd, (off_t)bytes)) {
		err = -errno;
		goto fail;
	}
	for (size_t pfn = 0; pfn < pool->file_frames;) {
		size_t n = 0;

		while (pfn + n < pool->file_frames && pool->frames[pfn + n].mapcount)
			n++;
		if (n && fallocate(fd, 0, (off_t)(pfn * PG), (off_t)(n * PG))) {
			err = -errno;
			goto fail;
		}
		pfn += n + !n;
	}
	copy = mmap(NULL, bytes ? bytes : PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (copy == MAP_FAILED) {
		err = -errno;
		goto fail;
	}
	for (size_t pfn = 0; pfn < pool->file_frames; pfn++)
		if (pool->frames[pfn].mapcount)
			memcpy(copy + pfn * PG, pool->direct + pfn * PG, PG);
	munmap(copy, bytes ? bytes : PG);
	madvise(pool->direct, bytes, MADV_DONTNEED);
	err = uksm_swap_detach(pool);
	if (err)
		goto fail;
	/* from here on nothing can fail that leaves a view on the old store */
	if (mmap(pool->direct, pool->nr_frames * PG, PROT_READ | PROT_WRITE,
		 MAP_SHARED | MAP_FIXED | MAP_NORESERVE, fd, 0) == MAP_FAILED) {
		err = -errno;
		goto fail;
	}
	for (size_t vpn = 0; vpn < pool->va_pages;) {
		struct uksm_pte *pte = &pool->ptes[vpn];
		size_t n = 1;

		if (pte->state != UKSM_PTE_KSM) {
			vpn++;
			continue;
		}
		while (vpn + n < pool->va_pages && n < UKSM_RUN_MAX &&
		       pool->ptes[vpn + n].state == UKSM_PTE_KSM &&
		       pool->ptes[vpn + n].pfn == pte->pfn + n)
			n++;
		/*
		 * A view the kernel already copied holds the child's own
		 * write: keep it, let the next reconcile find it.  pagemap per
		 * run tells which.
		 */
		{
			uint64_t pm[UKSM_RUN_MAX];
			int have;

			/*
			 * Read-only first: no copy can happen between pagemap and
			 * mmap.  If either fails, the run stays a view of the
			 * parent's store: same bytes, and the parent keeps them
			 * while we live.
			 */
			if (uksm_mprotect(page_addr(pool, vpn), n * PG, PROT_READ)) {
				vpn += n;
				continue;
			}
			have = !uksm_pagemap_read((size_t)page_addr(pool, vpn), n, pm);
			if (!have) {
				(void)uksm_mprotect(page_addr(pool, vpn), n * PG, view_prot(pool));
				vpn += n;
				continue;
			}
			for (size_t i = 0; i < n;) {
				size_t e = i;

				while (e < n && !(have && pm_cowed(pm[e])))
					e++;
				if (e > i)
					(void)uksm_map_view(pool, vpn + i, e - i, ro,
							    pte->pfn + i, view_prot(pool));
				if (e < n)
					(void)uksm_mprotect(page_addr(pool, vpn + e), PG,
							    view_prot(pool));
				i = e + (e < n);
			}
		}
		vpn += n;
	}
	for (size_t pfn = 0; pfn < pool->file_frames; pfn++) {
		struct uksm_frame *f = &pool->frames[pfn];

		if (f->flags & UKSM_FRAME_DEFERRED) {
			f->flags = 0;
			pool->st.frames_deferred--;
			pool->st.frames_used--;
			uksm_bit_clear(pool->frame_map, pfn);
			if (pfn < pool->frame_hint)
				pool->frame_hint = pfn;
		}
	}
	dup3(fd, pool->fd, O_CLOEXEC);
	dup3(ro, pool->ro_fd, O_CLOEXEC);
	close(fd);
	close(ro);
	pool->heir = 0;
	pool->st.detaches++;
	return 0;
fail:
	if (ro >= 0)
		close(ro);
	close(fd);
	return err;
}

/*
 * A forked child's first merge, compaction or reclaim takes a frame store
 * and a swap file of its own (uksm_detach): its parent's are never written.
 * The entry points below do it here, the top of the core: merge.c,
 * migrate.c and swap.c leave a pool still an heir alone.  Merge and reclaim
 * ask first (-EBUSY), so that a call they refuse, or a reclaim sitting out
 * a failed swap write's backoff, costs the heir no copy of the store.
 */
static int pool_own_store(struct uksm_pool *pool)
{
	int err = 0;

	uksm_lock(pool);
	if (pool->heir)
		err = uksm_detach(pool);
	uksm_unlock(pool);
	return err;
}

/*
 * The heir detaches once uksm_merge_runs() has taken the call (a bad one
 * is refused first, and costs no copy of the store) and found it an heir.
 * A failed detach leaves every entry BUSY: the next scan tries again.
 */
int uksm_merge(struct uksm_pool *pool, size_t n, const int64_t *src_vpn,
	       const int64_t *dst_vpn, const uint32_t *dst_pfn,
	       const uint32_t *dst_key, uint32_t max_sharing,
	       int64_t *vma_budget, uint32_t *out_pfn, uint32_t *out_key,
	       uint8_t *result)
{
	int ret = uksm_merge_runs(pool, n, src_vpn, dst_vpn, dst_pfn, dst_key, max_sharing,
				  vma_budget, out_pfn, out_key, result);

	if (ret != -EBUSY)
		return ret;
	if (pool_own_store(pool))
		return 0;	/* all BUSY */
	ret = uksm_merge_runs(pool, n, src_vpn, dst_vpn, dst_pfn, dst_key, max_sharing,
			      vma_budget, out_pfn, out_key, result);
	return ret == -EBUSY ? 0 : ret;
}

int uksm_compact(struct uksm_pool *pool, uint64_t shrink_frames,
		 uint32_t *log_from, uint32_t *log_to, size_t log_cap,
		 size_t *log_n, struct uksm_compact_stats *out)
{
	int err = pool_own_store(pool);

	if (err) {
		memset(out, 0, sizeof(*out));
		*log_n = 0;
		out->file_frames_before = out->file_frames_after = pool->file_frames;
		return err;
	}
	return uksm_compact_frames(pool, shrink_frames, log_from, log_to, log_cap, log_n, out);
}

/*
 * Reclaim detaches only when it is about to write: uksm_swap_reclaim()
 * first refuses a bad call and sits out a swap write's backoff, as it did
 * before it learnt to leave an heir alone (-EBUSY), and only then does the
 * heir pay for a store of its own.  heir is read unlocked: only this
 * process's detach clears it, and pool_own_store() looks again under
 * pool->lock.
 */
int uksm_reclaim(struct uksm_pool *pool, size_t nr_pages, int group)
{
	int ret = uksm_swap_reclaim(pool, nr_pages, group);

	if (ret == -EBUSY && __atomic_load_n(&pool->heir, __ATOMIC_RELAXED)) {
		int err = pool_own_store(pool);

		if (err)
			return err;
		ret = uksm_swap_reclaim(pool, nr_pages, group);
	}
	return ret;
}
