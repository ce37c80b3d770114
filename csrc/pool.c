// SPDX-License-Identifier: MIT
/*
 * pool.c - the backing store: the memfd and its direct map, the frame and
 * page tables, the frame and virtual-page allocators, buffers, and fork.
 */
#include "uksm_internal.h"

#include <fcntl.h>
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
/*
 * Serialises pool creation and destruction against fork: the fork hooks
 * hold it from prepare to parent/child, so no pool they locked can be
 * unmapped under them.  Never taken by the fault handler.
 */
static _Atomic int registry_lock;

/* The memfd grows by at least this much, so ftruncate is rare. */
#define GROW_FRAMES	4096

int uksm_bit_test(const uint64_t *map, size_t i)
{
	return (map[i >> 6] >> (i & 63)) & 1;
}

static void bit_set(uint64_t *map, size_t i)
{
	map[i >> 6] |= 1ULL << (i & 63);
}

static void bit_clear(uint64_t *map, size_t i)
{
	map[i >> 6] &= ~(1ULL << (i & 63));
}

/* First clear bit at or after @from, below @limit; @limit if none. */
size_t uksm_find_zero_bit(const uint64_t *map, size_t from, size_t limit)
{
	size_t i = from;

	while (i < limit) {
		uint64_t w = map[i >> 6] | ((1ULL << (i & 63)) - 1);

		if (w != ~0ULL) {
			i = (i & ~(size_t)63) + (size_t)__builtin_ctzll(~w);
			return i < limit ? i : limit;
		}
		i = (i & ~(size_t)63) + 64;
	}
	return limit;
}

int uksm_grow_file(struct uksm_pool *pool, size_t end)
{
	size_t want;

	if (end <= pool->file_frames)
		return 0;
	want = end + GROW_FRAMES;
	if (want > pool->frames_online)
		want = pool->frames_online;
	if (want < end)
		want = end;
	if (ftruncate(pool->fd, (off_t)(want * PG)))
		return -errno;
	pool->file_frames = want;
	pool->st.frames_file = want;
	return 0;
}

/*
 * uksm_frame_alloc_run - take up to @want free frames below @limit, as one
 * run starting at the lowest free pfn.  Returns how many were taken (0 when
 * none is free), *pfn_out the first.  The frames read as zeroes (every freed
 * frame was punched) and carry a fresh key.  Caller holds pool->lock and sets
 * the mapcounts.  Async-signal-safe: the fault handler uses it.
 */
size_t uksm_frame_alloc_run(struct uksm_pool *pool, size_t want, size_t limit,
			    size_t *pfn_out)
{
	size_t pfn, n;

	if (limit > pool->frames_online)
		limit = pool->frames_online;
	pfn = uksm_find_zero_bit(pool->frame_map, pool->frame_hint, limit);
	if (pfn >= limit)
		return 0;
	pool->frame_hint = pfn;
	n = uksm_frame_alloc_at(pool, pfn, want, limit);
	if (n) {
		*pfn_out = pfn;
		pool->frame_hint = pfn + n;
	}
	return n;
}

/*
 * uksm_frame_alloc_at - take up to @want free frames starting exactly at
 * @pfn (below @limit); 0 if @pfn itself is taken.  Caller holds pool->lock.
 */
size_t uksm_frame_alloc_at(struct uksm_pool *pool, size_t pfn, size_t want,
			   size_t limit)
{
	size_t n = 0;

	if (limit > pool->frames_online)
		limit = pool->frames_online;
	while (n < want && pfn + n < limit && !uksm_bit_test(pool->frame_map, pfn + n))
		n++;
	if (!n || uksm_grow_file(pool, pfn + n))
		return 0;
	for (size_t i = 0; i < n; i++) {
		struct uksm_frame *f = &pool->frames[pfn + i];

		bit_set(pool->frame_map, pfn + i);
		f->key = ++pool->next_key;
		f->flags = 0;
		f->mapcount = 0;
		f->group = 0;		/* the caller recharges it to its owner */
	}
	pool->group_frames[0] += n;
	pool->st.frames_used += n;
	return n;
}

/* Punch the pending run of freed frames and only then mark them free. */
void uksm_frames_flush(struct uksm_pool *pool)
{
	size_t start = pool->punch_start, len = pool->punch_len;

	if (!len)
		return;
	/*
	 * Punching is what gives the memory back, and what makes the next
	 * owner of these frames read zeroes: a frame must never be reused
	 * before its hole is punched.  If the punch fails, the frames are
	 * zeroed by hand instead, so the guarantee holds anyway.
	 */
	if (uksm_fallocate(pool->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		      (off_t)(start * PG), (off_t)(len * PG)))
		memset(frame_addr(pool, start), 0, len * PG);
	for (size_t i = 0; i < len; i++)
		bit_clear(pool->frame_map, start + i);
	if (start < pool->frame_hint)
		pool->frame_hint = start;
	pool->punch_len = 0;
}

/*
 * uksm_frame_put - one mapping of @pfn is gone.  The last one frees the
 * frame: its key changes (so stable nodes see through the keyhole that it is
 * gone) and it joins the run to be punched by uksm_frames_flush(), which the
 * caller must call before dropping pool->lock.
 */
void uksm_frame_put(struct uksm_pool *pool, size_t pfn)
{
	struct uksm_frame *f = &pool->frames[pfn];

	if (--f->mapcount)
		return;
	if (f->flags & UKSM_FRAME_KSM)
		pool->st.ksm_frames--;
	f->flags = 0;
	f->key = ++pool->next_key;
	pool->group_frames[f->group]--;
	f->group = 0;
	pool->st.frames_used--;
	if (pool->punch_len && pool->punch_start + pool->punch_len == pfn) {
		pool->punch_len++;
		return;
	}
	uksm_frames_flush(pool);
	pool->punch_start = pfn;
	pool->punch_len = 1;
}

/* Map @n virtual pages from @vpn onto the frames from @pfn: one mmap call. */
int uksm_map_frames(struct uksm_pool *pool, size_t vpn, size_t n, size_t pfn,
		    int writable)
{
	void *p = uksm_mmap(page_addr(pool, vpn), n * PG,
		       PROT_READ | (writable ? PROT_WRITE : 0),
		       MAP_SHARED | MAP_FIXED, pool->fd, (off_t)(pfn * PG));

	if (p == MAP_FAILED)
		return -errno;
	for (size_t i = vpn; i < vpn + n; i++)	/* accessible: no longer a hint */
		pool->ptes[i].spare[0] &= ~UKSM_PTE_HINT;
	return 0;
}

static int map_none(struct uksm_pool *pool, size_t vpn, size_t n)
{
	/* anonymous PROT_NONE: a touch faults as NONE and chains (a crash) */
	void *p = uksm_mmap(page_addr(pool, vpn), n * PG, PROT_NONE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
		       -1, 0);

	return p == MAP_FAILED ? -errno : 0;
}

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
 * registration, so registering before other libraries (uksm/_core.py loads
 * us before numpy) makes ours run last: after, say, OpenBLAS has stopped its
 * worker threads, which might otherwise be waiting on our pool->lock in the
 * fault handler while its prepare handler waits for them.
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
 * uksm_pool_create - a pool of @capacity_frames frames for the API, plus
 * @reserve_frames only the COW fault may take, and @va_pages of virtual
 * space for buffers.  Reserving address space and table space costs nothing
 * until touched: all of it is MAP_NORESERVE anonymous memory.
 */
int uksm_pool_create(size_t capacity_frames, size_t reserve_frames,
		     size_t va_pages, struct uksm_pool **out)
{
	struct uksm_pool *pool;
	size_t nr_frames = capacity_frames + reserve_frames;
	size_t off, slot;
	char *meta;
	int err;

	if (!capacity_frames || !va_pages || nr_frames >= UINT32_MAX ||
	    va_pages >= UINT32_MAX)
		return -EINVAL;
	pthread_once(&atfork_once, register_atfork);

	pool = mmap(NULL, sizeof(*pool), PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (pool == MAP_FAILED)
		return -ENOMEM;
	memset(pool, 0, sizeof(*pool));
	pool->nr_frames = nr_frames;
	pool->frames_online = nr_frames;
	pool->capacity_frames = capacity_frames;
	pool->va_pages = va_pages;
	pool->fd = -1;
	pool->swap_fd = -1;
	pool->swap_dir_fd = -1;
	pool->vma_soft_limit = INT64_MAX;
	pool->va = MAP_FAILED;
	pool->direct = MAP_FAILED;
	pool->meta = MAP_FAILED;

	pool->meta_bytes = nr_frames * sizeof(struct uksm_frame) +
			   va_pages * sizeof(struct uksm_pte) +
			   bitmap_bytes(nr_frames) + bitmap_bytes(va_pages);
	meta = mmap(NULL, pool->meta_bytes, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (meta == MAP_FAILED)
		goto out_errno;
	pool->meta = meta;
	off = 0;
	pool->frames = (struct uksm_frame *)(meta + off);
	off += nr_frames * sizeof(struct uksm_frame);
	pool->ptes = (struct uksm_pte *)(meta + off);
	off += va_pages * sizeof(struct uksm_pte);
	pool->frame_map = (uint64_t *)(meta + off);
	off += bitmap_bytes(nr_frames);
	pool->va_map = (uint64_t *)(meta + off);

	pool->fd = memfd_create("uksm", MFD_CLOEXEC);
	if (pool->fd < 0)
		goto out_errno;
	pool->direct = mmap(NULL, nr_frames * PG, PROT_READ | PROT_WRITE,
			    MAP_SHARED | MAP_NORESERVE, pool->fd, 0);
	if (pool->direct == MAP_FAILED)
		goto out_errno;
	pool->va = mmap(NULL, va_pages * PG, PROT_NONE,
			MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (pool->va == MAP_FAILED)
		goto out_errno;

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
	if (pool->va != MAP_FAILED)
		munmap(pool->va, pool->va_pages * PG);
	if (pool->direct != MAP_FAILED)
		munmap(pool->direct, pool->nr_frames * PG);
	if (pool->fd >= 0)
		close(pool->fd);
	uksm_swap_destroy(pool);
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

size_t uksm_pool_va_pages(struct uksm_pool *pool)
{
	return pool->va_pages;
}

/* The scanner's latest count of the process's VMAs, and where COW should
 * start breaking whole runs rather than single pages. */
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

/* First-fit run of @n free virtual pages; caller holds pool->lock. */
static int va_alloc(struct uksm_pool *pool, size_t n, size_t *vpn_out)
{
	size_t start = uksm_find_zero_bit(pool->va_map, pool->va_hint, pool->va_pages);
	size_t first = start;

	while (start + n <= pool->va_pages) {
		size_t len = 0;

		while (len < n && !uksm_bit_test(pool->va_map, start + len))
			len++;
		if (len == n) {
			for (size_t i = 0; i < n; i++)
				bit_set(pool->va_map, start + i);
			if (start == first)
				pool->va_hint = start + n;
			*vpn_out = start;
			return 0;
		}
		start = uksm_find_zero_bit(pool->va_map, start + len, pool->va_pages);
	}
	return -ENOSPC;
}

void uksm_va_free(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	uksm_lock(pool);
	for (size_t i = 0; i < npages; i++)
		bit_clear(pool->va_map, vpn + i);
	if (vpn < pool->va_hint)
		pool->va_hint = vpn;
	uksm_unlock(pool);
}

/*
 * uksm_alloc - a new buffer of @npages: virtual pages and fresh frames, in
 * as few runs as the free frames allow, mapped read-write.  The frames are
 * allocated in the memfd at once with fallocate, so that the kernel's
 * accounting (st_blocks) equals frames_used, and so that a full tmpfs
 * fails here, cleanly, rather than with SIGBUS on a later touch.
 * On failure nothing is left allocated and *vpn_out says which step failed
 * (UKSM_ALLOC_*): capacity (-ENOMEM), the virtual range (-ENOSPC), or the
 * kernel: fallocate (a full tmpfs: -ENOSPC) or mmap (-ENOMEM at
 * vm.max_map_count).
 */
int uksm_alloc(struct uksm_pool *pool, size_t npages, size_t *vpn_out)
{
	size_t vpn, done = 0, stage = UKSM_ALLOC_CAPACITY;
	int err = 0;

	*vpn_out = UKSM_ALLOC_CAPACITY;
	/* over the resident budget: make room first (direct reclaim) */
	if (pool->swap_fd >= 0 && pool->st.frames_used + npages > pool->max_resident)
		uksm_reclaim(pool, pool->st.frames_used + npages - pool->max_resident, -1);
	uksm_lock(pool);
	if (pool->st.frames_used + npages > pool->capacity_frames) {
		uksm_unlock(pool);
		return -ENOMEM;
	}
	err = va_alloc(pool, npages, &vpn);
	if (err) {
		uksm_unlock(pool);
		*vpn_out = UKSM_ALLOC_VA;
		return err;
	}
	/*
	 * Populate in chunks, dropping pool->lock between them: fallocate of
	 * a large buffer takes a while, and faulting writers wait on the lock.
	 * Nobody else looks at these pages yet (the scanner learns of the
	 * buffer only when we return); a competing allocation that takes the
	 * last frames meanwhile just makes this one fail cleanly.
	 */
	while (done < npages) {
		size_t pfn, n, want = npages - done;

		if (want > 8 * UKSM_RUN_MAX)
			want = 8 * UKSM_RUN_MAX;
		if (done)
			uksm_lock(pool);
		n = uksm_frame_alloc_run(pool, want, pool->capacity_frames, &pfn);
		if (!n) {
			err = -ENOMEM;
			stage = UKSM_ALLOC_CAPACITY;
		} else if (uksm_fallocate(pool->fd, 0, (off_t)(pfn * PG), (off_t)(n * PG))) {
			err = -errno;
			stage = UKSM_ALLOC_FALLOCATE;
		} else {
			err = uksm_map_frames(pool, vpn + done, n, pfn, 1);
			stage = UKSM_ALLOC_MMAP;
		}
		for (size_t i = 0; i < n; i++) {
			pool->frames[pfn + i].mapcount = 1;
			if (err) {	/* give this run back */
				uksm_frame_put(pool, pfn + i);
				continue;
			}
			pool->ptes[vpn + done + i].pfn = (uint32_t)(pfn + i);
			pool->ptes[vpn + done + i].state = UKSM_PTE_NORMAL;
		}
		if (!err) {
			pool->st.pages_mapped += n;
			done += n;
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		if (err)
			break;
	}
	if (err) {
		/* unwind the runs mapped so far; nothing else changed */
		uksm_release(pool, vpn, done);
		uksm_lock(pool);
		map_none(pool, vpn, npages);
		uksm_unlock(pool);
		uksm_va_free(pool, vpn, npages);
		*vpn_out = stage;
		return err;
	}
	*vpn_out = vpn;
	return 0;
}

/*
 * uksm_release - a buffer is gone: make its virtual pages PROT_NONE first,
 * so nothing can reach its frames any more, then drop its frame mappings.
 * The virtual range stays reserved until uksm_va_free(): the scanner must
 * forget the pages before the range can belong to another buffer.
 */
int uksm_release(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	int err = 0;

	for (size_t done = 0; done < npages;) {
		size_t n = npages - done;

		if (n > 8 * UKSM_RUN_MAX)
			n = 8 * UKSM_RUN_MAX;
		uksm_lock(pool);
		/*
		 * The frames may go back only once nothing can reach them: if
		 * neither remapping nor mprotect can cut the pages off (ENOMEM at
		 * vm.max_map_count), keep this chunk as it is and report it.
		 */
		if (map_none(pool, vpn + done, n) &&
		    uksm_mprotect(page_addr(pool, vpn + done), n * PG, PROT_NONE)) {
			err = -errno;
			uksm_unlock(pool);
			done += n;
			continue;
		}
		for (size_t i = vpn + done; i < vpn + done + n; i++) {
			struct uksm_pte *pte = &pool->ptes[i];

			switch (pte->state) {
			case UKSM_PTE_KSM:
				pool->st.ksm_mappings--;
				/* fall through */
			case UKSM_PTE_NORMAL:
				uksm_frame_put(pool, pte->pfn);
				break;
			case UKSM_PTE_ZERO:
				pool->st.zero_pages--;
				break;
			case UKSM_PTE_SWAPPED:
				uksm_slot_put(pool, pte->pfn, uksm_pte_group(pte));
				break;
			default:
				continue;
			}
			pool->st.pages_mapped--;
			pte->state = UKSM_PTE_NONE;
			pte->pfn = 0;
			pte->spare[0] = 0;
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		done += n;
	}
	return err;
}

/* pool.pin(): mark pages that must not be migrated while pinned */
int uksm_set_pinned(struct uksm_pool *pool, size_t vpn, size_t npages, int on)
{
	if (vpn + npages > pool->va_pages)
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = vpn; i < vpn + npages; i++) {
		if (on)
			pool->ptes[i].spare[0] |= UKSM_PTE_PINNED;
		else
			pool->ptes[i].spare[0] &= ~UKSM_PTE_PINNED;
	}
	uksm_unlock(pool);
	return 0;
}

int uksm_pages_info(struct uksm_pool *pool, size_t vpn, size_t npages,
		    uint8_t *state, uint32_t *pfn, uint32_t *mapcount)
{
	if (vpn + npages > pool->va_pages)
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = 0; i < npages; i++) {
		struct uksm_pte *pte = &pool->ptes[vpn + i];

		state[i] = pte->state;
		pfn[i] = pte->pfn;
		mapcount[i] = (pte->state == UKSM_PTE_NORMAL ||
			       pte->state == UKSM_PTE_KSM) ?
			      pool->frames[pte->pfn].mapcount : 0;
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
 * Fork.  The child cannot keep sharing the memfd with its parent (the
 * MAP_SHARED trap: each would see the other's writes), so it copies every
 * frame in use into a memfd of its own and remaps its pages there.  That
 * copy must be a snapshot of the moment of fork, as a real fork's is:
 *
 *   prepare  takes every pool->lock (no merge, COW, free or punch can run)
 *	      and write-protects every NORMAL page, so that no thread of the
 *	      parent can change a frame while the child copies it: a writer
 *	      faults and waits on pool->lock in the handler;
 *   child    copies, remaps, closes its end of a pipe;
 *   parent   waits for that EOF (the child copied, or died trying), gives
 *	      the NORMAL pages their write access back, drops the locks, and
 *	      the waiting writers retry, as Mesh does it.
 *
 * A syscall writing into a NORMAL page during those milliseconds gets
 * EFAULT, as with any write-protected page.  Only syscalls and memcpy in
 * the child: a forked child of a threaded process may do nothing else.
 */
static int fork_pipe[2] = { -1, -1 };
static struct uksm_pool *fork_locked[UKSM_MAX_POOLS];

/*
 * Pinned pages are left writable: pin() promises that, and a device or
 * O_DIRECT transfer writing into them would not be stopped by mprotect
 * anyway.  Their snapshot in the child is only as good as such I/O allows.
 */
static int snapshot_protects(const struct uksm_pte *pte)
{
	/* hinted pages are PROT_NONE already: leave them so */
	return pte->state == UKSM_PTE_NORMAL &&
	       !(pte->spare[0] & (UKSM_PTE_PINNED | UKSM_PTE_HINT));
}

/* mprotect every run of NORMAL pages; the runs are whole VMAs already */
static void protect_normal(struct uksm_pool *pool, int prot)
{
	size_t vpn = 0;

	while (vpn < pool->va_pages) {
		size_t n = 0;

		if (!snapshot_protects(&pool->ptes[vpn])) {
			vpn++;
			continue;
		}
		while (vpn + n < pool->va_pages && snapshot_protects(&pool->ptes[vpn + n]))
			n++;
		/* failing to restore leaves a NORMAL page read-only, which the
		 * fault handler mends on the first write */
		mprotect(page_addr(pool, vpn), n * PG, prot);
		vpn += n;
	}
}

static void uksm_atfork_prepare(void)
{
	int any = 0;

	uksm_futex_lock(&registry_lock);
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		struct uksm_pool *pool = slot < uksm_pools_high ? uksm_pools[slot] : NULL;

		fork_locked[slot] = pool;
		if (pool) {
			uksm_lock(pool);
			protect_normal(pool, PROT_READ);
			any = 1;
		}
	}
	if (!any || pipe2(fork_pipe, O_CLOEXEC))
		fork_pipe[0] = fork_pipe[1] = -1;
}

static void uksm_atfork_parent(void)
{
	if (fork_pipe[0] >= 0) {
		char c;

		close(fork_pipe[1]);
		while (read(fork_pipe[0], &c, 1) < 0 && errno == EINTR)
			;
		close(fork_pipe[0]);
		fork_pipe[0] = fork_pipe[1] = -1;
	}
	/*
	 * Without a pipe (pipe2 failed: no file descriptors left) we cannot
	 * know when the child is done; the parent goes on at once and the
	 * child's copy is only as good as a copy racing the parent can be.
	 */
	for (size_t slot = UKSM_MAX_POOLS; slot-- > 0;) {
		struct uksm_pool *pool = fork_locked[slot];

		if (!pool)
			continue;
		protect_normal(pool, PROT_READ | PROT_WRITE);
		uksm_unlock(pool);
		fork_locked[slot] = NULL;
	}
	uksm_futex_unlock(&registry_lock);
}

static void fork_die(const char *why)
{
	static const char msg[] = "uksm: forked child cannot copy its pool: ";

	(void)!write(2, msg, sizeof(msg) - 1);
	(void)!write(2, why, strlen(why));
	(void)!write(2, "\n", 1);
	_exit(70);
}

static void remap_child(struct uksm_pool *pool)
{
	size_t vpn = 0;

	while (vpn < pool->va_pages) {
		struct uksm_pte *pte = &pool->ptes[vpn];
		size_t n = 1;

		if (pte->state != UKSM_PTE_NORMAL && pte->state != UKSM_PTE_KSM) {
			vpn++;
			continue;
		}
		while (vpn + n < pool->va_pages &&
		       pool->ptes[vpn + n].state == pte->state &&
		       pool->ptes[vpn + n].pfn == pte->pfn + n)
			n++;
		if (uksm_map_frames(pool, vpn, n, pte->pfn,
				    pte->state == UKSM_PTE_NORMAL))
			fork_die("mmap failed");
		for (size_t i = vpn; i < vpn + n; i++)
			pool->ptes[i].spare[0] &= ~UKSM_PTE_HINT;	/* accessible again */
		vpn += n;
	}
}

static void uksm_atfork_child(void)
{
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		struct uksm_pool *pool = uksm_pools[slot];
		size_t bytes, pfn;
		char *copy;
		int fd;

		if (!pool)
			continue;
		bytes = pool->file_frames * PG;
		fd = memfd_create("uksm", MFD_CLOEXEC);
		if (fd < 0 || ftruncate(fd, (off_t)bytes))
			fork_die("memfd_create/ftruncate failed");
		/*
		 * Allocate the used runs in bulk first (holes stay holes): a
		 * shmem allocation fault per copied page costs more than the copy.
		 */
		for (pfn = 0; pfn < pool->file_frames;) {
			size_t n = 0;

			while (pfn + n < pool->file_frames && pool->frames[pfn + n].mapcount)
				n++;
			if (n && fallocate(fd, 0, (off_t)(pfn * PG), (off_t)(n * PG)))
				fork_die("fallocate failed (out of memory for the copy?)");
			pfn += n + !n;
		}
		copy = mmap(NULL, bytes ? bytes : PG, PROT_READ | PROT_WRITE,
			    MAP_SHARED, fd, 0);
		if (copy == MAP_FAILED)
			fork_die("mmap failed");
		for (pfn = 0; pfn < pool->file_frames; pfn++)
			if (pool->frames[pfn].mapcount)
				memcpy(copy + pfn * PG, frame_addr(pool, pfn), PG);
		munmap(copy, bytes ? bytes : PG);
		if (dup3(fd, pool->fd, O_CLOEXEC) < 0)
			fork_die("dup3 failed");
		close(fd);
		if (mmap(pool->direct, pool->nr_frames * PG, PROT_READ | PROT_WRITE,
			 MAP_SHARED | MAP_FIXED | MAP_NORESERVE, pool->fd, 0) == MAP_FAILED)
			fork_die("mmap of the direct map failed");
		remap_child(pool);
		uksm_swap_fork_child(pool);
		atomic_store(&pool->lock, 0);
	}
	if (fork_pipe[1] >= 0) {
		close(fork_pipe[0]);
		close(fork_pipe[1]);	/* the parent may go on */
		fork_pipe[0] = fork_pipe[1] = -1;
	}
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++)
		fork_locked[slot] = NULL;
	atomic_store(&registry_lock, 0);	/* the child's own, now */
}
