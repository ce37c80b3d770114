// SPDX-License-Identifier: MIT
/*
 * swap.c - a swap area of the pool's own: shared pages swappable (seed
 * patches 1, 2, 3, 6, 9).
 *
 * With max_resident set, the pool keeps at most that many frames in memory
 * and writes cold ones to a swap file of its own (unlinked, 0600), so a
 * program holds more than its memory budget on machines with no swap.
 *
 * Aging (page_referenced, patch 2).  There is no accessed bit in userspace:
 * the reclaim clock makes a page PROT_NONE as a reference hint
 * (UKSM_PTE_HINT) the first time round; a touch faults, and the handler
 * gives the page (and its hinted neighbours in an aligned 16-page cluster,
 * to keep VMAs and faults few) its protection back.  A page still hinted
 * when the hand comes round again was not referenced: a candidate.  A
 * shared frame is referenced if any of its mappers is: it is evicted only
 * when every mapper is still hinted.  Rik's two hands are the hand's two
 * visits; the distance between them is one revolution.
 *
 * Eviction (try_to_unmap_ksm, patch 2).  A batch of candidates is written
 * with pwritev to a run of consecutive slots (one syscall for the batch,
 * straight from the direct map), then every mapper becomes SWAPPED, its
 * pte holding the slot; the mappers are PROT_NONE already, so no syscall is
 * needed to unmap them.  A shared frame is written once, to one slot, for
 * all its mappers.  The frame is punched.  A write error (ENOSPC, EFBIG,
 * EIO) stops the batch before anything is unmapped: the pages stay
 * resident, the error is counted, nothing is lost.
 *
 * The swap map (swapfile.c's swap_map): a count per slot of the ptes still
 * swapped on it; the slot is freed when the last goes (swap-in, free).
 * Each slot also keeps the XXH3 of what was written: a slot that reads
 * back different is reported, never returned.
 *
 * Swap-in (the fault handler).  A touch of a SWAPPED page reads its slot
 * into a fresh frame (pread, async-signal-safe) and maps it.  Where the seed
 * copied per mapper (ksm_might_need_to_copy, "disappointingly primitive"),
 * uksm keeps a swap cache: a slot with other mappers still swapped on it
 * remembers the frame it was read into (keyhole-checked, as stable nodes
 * are) and holds a reference on it until its last swapped mapper is gone;
 * the next mappers map that same frame, read-only, as a KSM frame: sharing
 * survives swapping.  A write after that is an ordinary COW, which copies
 * even for a sole present mapper, leaving the cached frame to the others.
 *
 * mlock (patch 1): a LOCKED or PINNED mapper keeps its frame resident, so
 * a merged frame stays locked while any locker is left.  Groups (patch 6):
 * every frame is charged to a group (csrc/uksm_internal.h uksm_recharge),
 * the frame a COW break or a swap-in makes to the group of the page that
 * faulted; a group over its own limit has its own frames reclaimed.  No cap
 * on shared frames (patch 9): limits are on frames, not nodes.
 *
 * Reclaim runs under pool->lock, one batch per hold: from the API (an
 * allocation over budget, the background scanner) and, when frames run
 * past the budget by a whole batch, from the fault handler itself: pwritev,
 * pread, mprotect and punching are all async-signal-safe.
 */
#include "uksm_internal.h"

#include <string.h>
#include <sys/uio.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define HINT_CLUSTER	16
#define IOV_BATCH	256
#define EVICT_MAX	4096

static uint64_t mono_now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* A swap write failed moments ago: the fault handler does not retry yet. */
int uksm_swap_backing_off(struct uksm_pool *pool)
{
	return pool->swap_backoff_ns && mono_now_ns() < pool->swap_backoff_ns;
}

static int resident_state(uint8_t s)
{
	return s == UKSM_PTE_NORMAL || s == UKSM_PTE_KSM;
}

int uksm_swap_enable(struct uksm_pool *pool, int swap_fd, int dir_fd,
		     size_t max_resident_frames, size_t batch)
{
	size_t nv = pool->va_pages, nf = pool->nr_frames;
	char *p;

	if (pool->swap_fd >= 0 || swap_fd < 0 || !max_resident_frames)
		return -EINVAL;
	if (batch < 1)
		batch = 1;
	if (batch > EVICT_MAX)
		batch = EVICT_MAX;
	pool->swap_meta_bytes = nv * (2 + 8 + 4 + 4 + 1) + nf * (1 + 4 + 4 + 4) +
				2 * EVICT_MAX * 4;
	pool->swap_meta = mmap(NULL, pool->swap_meta_bytes, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (pool->swap_meta == MAP_FAILED) {
		pool->swap_meta = NULL;
		return -ENOMEM;
	}
	p = pool->swap_meta;
	pool->slot_sum = (uint64_t *)p;		p += nv * 8;
	pool->slot_cache = (uint32_t *)p;	p += nv * 4;
	pool->slot_cache_key = (uint32_t *)p;	p += nv * 4;
	pool->evict_frames = (uint32_t *)p;	p += EVICT_MAX * 4;
	pool->evict_slots = (uint32_t *)p;	p += EVICT_MAX * 4;
	pool->evict_slot_of = (uint32_t *)p;	p += nf * 4;
	pool->evict_vpn = (uint32_t *)p;	p += nf * 4;
	pool->cache_slot_of = (uint32_t *)p;	p += nf * 4;
	pool->swap_map = (uint16_t *)p;		p += nv * 2;
	pool->slot_stale = (uint8_t *)p;	p += nv;
	pool->evict_mark = (uint8_t *)p;
	uksm_lock(pool);
	pool->nr_slots = nv;
	pool->max_resident = max_resident_frames;
	pool->reclaim_batch = batch;
	pool->swap_dir_fd = dir_fd;
	pool->swap_fd = swap_fd;
	uksm_unlock(pool);
	return 0;
}

void uksm_swap_destroy(struct uksm_pool *pool)
{
	if (pool->swap_fd >= 0)
		close(pool->swap_fd);
	if (pool->swap_dir_fd >= 0)
		close(pool->swap_dir_fd);
	if (pool->swap_meta)
		munmap(pool->swap_meta, pool->swap_meta_bytes);
}

int uksm_set_max_resident(struct uksm_pool *pool, size_t frames)
{
	if (pool->swap_fd < 0 || !frames)
		return -EINVAL;
	uksm_lock(pool);
	pool->max_resident = frames;
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

/* One pte swapped on @slot is gone (swapped in, or freed with its buffer). */
void uksm_slot_put(struct uksm_pool *pool, size_t slot, uint32_t group)
{
	pool->st.pages_swapped--;
	if (group < UKSM_MAX_GROUPS)
		pool->group_swapped[group]--;
	if (--pool->swap_map[slot])
		return;
	pool->st.slots_used--;
	if (pool->slot_cache[slot]) {
		/* the last user is gone: the swap cache lets go of its frame */
		size_t f = pool->slot_cache[slot] - 1;

		if (pool->frames[f].key == pool->slot_cache_key[slot] &&
		    pool->cache_slot_of[f] == slot + 1 && pool->frames[f].mapcount) {
			pool->cache_slot_of[f] = 0;
			uksm_frame_put(pool, f);
		}
	}
	pool->slot_cache[slot] = 0;
	if (slot < pool->slot_hint)
		pool->slot_hint = slot;
	/*
	 * The disk space goes back later, in runs, from uksm_swap_trim(): a
	 * punch of a slot already written back costs ~100 us on ext4, too much
	 * for the fault handler that swaps a page in.
	 */
	pool->slot_stale[slot] = 1;
	pool->stale_slots++;
}

/*
 * Punch the freed slots' disk blocks, in runs (the API and the scanner
 * thread call this; never the fault handler).  Below @min stale slots it
 * waits for more.  Returns slots trimmed.
 */
int uksm_swap_trim(struct uksm_pool *pool, size_t min)
{
	size_t trimmed = 0;

	if (pool->swap_fd < 0)
		return 0;
	uksm_lock(pool);
	if (pool->stale_slots < (min ? min : 1)) {
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
 * A hinted page was touched: it is referenced.  Give it, and the hinted
 * pages of the same state around it in its aligned cluster, their
 * protection back with one mprotect.  Near vm.max_map_count (or if that
 * mprotect fails) give the whole hinted run back instead: its ends are
 * mapping boundaries already, so that needs no split and only removes
 * VMAs.  Caller holds pool->lock.
 */
int uksm_hint_restore(struct uksm_pool *pool, size_t vpn)
{
	uint8_t state = pool->ptes[vpn].state;
	int prot = PROT_READ | (state == UKSM_PTE_NORMAL ? PROT_WRITE : 0);
	size_t lo = vpn & ~(size_t)(HINT_CLUSTER - 1), hi = lo + HINT_CLUSTER;
	size_t a = vpn, b = vpn + 1;

	if (hi > pool->va_pages)
		hi = pool->va_pages;
	if (pool->vma_estimate + 2 <= pool->vma_soft_limit) {
		while (a > lo && pool->ptes[a - 1].state == state &&
		       (pool->ptes[a - 1].spare[0] & UKSM_PTE_HINT))
			a--;
		while (b < hi && pool->ptes[b].state == state &&
		       (pool->ptes[b].spare[0] & UKSM_PTE_HINT))
			b++;
		if (!uksm_mprotect(page_addr(pool, a), (b - a) * PG, prot)) {
			pool->vma_estimate += 2;
			goto done;
		}
	}
	a = vpn;
	b = vpn + 1;
	while (a > 0 && pool->ptes[a - 1].state == state &&
	       (pool->ptes[a - 1].spare[0] & UKSM_PTE_HINT))
		a--;
	while (b < pool->va_pages && pool->ptes[b].state == state &&
	       (pool->ptes[b].spare[0] & UKSM_PTE_HINT))
		b++;
	if (uksm_mprotect(page_addr(pool, a), (b - a) * PG, prot))
		return -errno;
done:
	for (size_t i = a; i < b; i++)
		pool->ptes[i].spare[0] &= ~UKSM_PTE_HINT;
	pool->st.hint_faults++;
	return 0;
}

/*
 * Make a run of resident pages PROT_NONE reference hints.  Not near the
 * map limit: hints cost VMAs, and the touches that end them more.
 */
static void hint_run(struct uksm_pool *pool, size_t vpn, size_t n)
{
	if (!n || pool->vma_estimate + 2 > pool->vma_soft_limit ||
	    uksm_mprotect(page_addr(pool, vpn), n * PG, PROT_NONE))
		return;		/* no hint, no eviction: nothing lost */
	pool->vma_estimate += 2;
	for (size_t i = vpn; i < vpn + n; i++)
		pool->ptes[i].spare[0] |= UKSM_PTE_HINT;
}

static int evictable(const struct uksm_pte *pte)
{
	return resident_state(pte->state) &&
	       !(pte->spare[0] & (UKSM_PTE_PINNED | UKSM_PTE_LOCKED));
}

/* swap_map counts mappers in 16 bits */
#define SWAP_MAP_MAX	(UINT16_MAX - 1)

/* pwritev a batch: frames evict_frames[a..b) to slots evict_slots[a..b). */
static int write_slots(struct uksm_pool *pool, size_t a, size_t b)
{
	struct iovec iov[IOV_BATCH];

	while (a < b) {
		size_t n = 0, first = pool->evict_slots[a];
		ssize_t done;
		size_t want;

		while (a + n < b && n < IOV_BATCH &&
		       pool->evict_slots[a + n] == first + n) {
			iov[n].iov_base = frame_addr(pool, pool->evict_frames[a + n]);
			iov[n].iov_len = PG;
			n++;
		}
		want = n * PG;
		if (uksm_injected(UKSM_OP_PWRITE))
			return -errno;
		done = pwritev(pool->swap_fd, iov, (int)n, (off_t)(first * PG));
		if (done < 0)
			return -errno;
		if ((size_t)done != want)
			return -ENOSPC;	/* a short write: the disk is full */
		if (first + n > pool->st.swap_file_slots)
			pool->st.swap_file_slots = first + n;
		a += n;
	}
	return 0;
}

/* The pte at @v maps a frame just written to its slot: it is swapped now. */
static void unmap_to_slot(struct uksm_pool *pool, size_t v)
{
	struct uksm_pte *pte = &pool->ptes[v];
	uint32_t s = pool->evict_slot_of[pte->pfn];

	if (pte->state == UKSM_PTE_KSM)
		pool->st.ksm_mappings--;
	pte->state = UKSM_PTE_SWAPPED;
	pte->pfn = s;
	pool->swap_map[s]++;
	pool->st.pages_swapped++;
	pool->group_swapped[uksm_pte_group(pte)]++;
}

/*
 * Evict candidates evict_frames[0..n) (evict_mark set).  Caller holds
 * pool->lock.  Returns frames freed, or -errno if the write failed (then
 * nothing changed but the error count).
 */
static long evict_batch(struct uksm_pool *pool, size_t n)
{
	size_t ok = 0;
	int shared = 0, err;

	for (size_t i = 0; i < n; i++)
		shared |= pool->frames[pool->evict_frames[i]].mapcount > 1;
	if (shared) {
		/* every mapper of a shared candidate must still be hinted */
		for (size_t v = 0; v < pool->va_pages; v++) {
			const struct uksm_pte *pte = &pool->ptes[v];

			if (resident_state(pte->state) && pool->evict_mark[pte->pfn] == 1 &&
			    (!(pte->spare[0] & UKSM_PTE_HINT) || !evictable(pte)))
				pool->evict_mark[pte->pfn] = 2;
		}
	}
	for (size_t i = 0; i < n; i++) {
		uint32_t f = pool->evict_frames[i];

		if (pool->evict_mark[f] == 1)
			pool->evict_frames[ok++] = f;
		else
			pool->evict_mark[f] = 0;
	}
	/* clustered slots: consecutive frames of the batch, consecutive slots */
	for (size_t i = 0; i < ok;) {
		size_t s, got = slot_alloc_run(pool, ok - i, &s);

		if (!got) {
			/* no slot left: evict what has one, forget the rest */
			for (size_t j = i; j < ok; j++)
				pool->evict_mark[pool->evict_frames[j]] = 0;
			ok = i;
			break;
		}
		for (size_t k = 0; k < got; k++) {
			pool->evict_slots[i + k] = (uint32_t)(s + k);
			pool->swap_map[s + k] = UINT16_MAX;	/* taken, for now */
		}
		pool->slot_hint = s + got;
		i += got;
	}
	err = write_slots(pool, 0, ok);
	if (err) {
		for (size_t i = 0; i < ok; i++) {
			pool->swap_map[pool->evict_slots[i]] = 0;
			if (pool->evict_slots[i] < pool->slot_hint)
				pool->slot_hint = pool->evict_slots[i];
		}
		for (size_t i = 0; i < n; i++)
			pool->evict_mark[pool->evict_frames[i]] = 0;
		for (size_t i = 0; i < ok; i++)
			pool->evict_mark[pool->evict_frames[i]] = 0;
		pool->st.swap_errors++;
		pool->st.last_swap_errno = (uint64_t)-err;
		pool->swap_backoff_ns = mono_now_ns() + 200000000ull;
		return err;
	}
	for (size_t i = 0; i < ok; i++) {
		uint32_t f = pool->evict_frames[i], s = pool->evict_slots[i];

		pool->slot_sum[s] = XXH3_64bits(frame_addr(pool, f), PG);
		pool->swap_map[s] = 0;
		pool->evict_slot_of[f] = s;
		pool->evict_mark[f] = 3;	/* written: unmap its mappers below */
		pool->st.slots_used++;
		pool->st.swap_outs++;
	}
	/* try_to_unmap: every mapper of a written frame now refers to its slot */
	if (shared) {
		for (size_t v = 0; v < pool->va_pages; v++)
			if (resident_state(pool->ptes[v].state) &&
			    pool->evict_mark[pool->ptes[v].pfn] == 3)
				unmap_to_slot(pool, v);
	} else {
		for (size_t i = 0; i < ok; i++)		/* the one mapper is known */
			unmap_to_slot(pool, pool->evict_vpn[pool->evict_frames[i]]);
	}
	for (size_t i = 0; i < ok; i++) {
		uint32_t f = pool->evict_frames[i];

		pool->evict_mark[f] = 0;
		pool->cache_slot_of[f] = 0;	/* its slot's cache is stale now */
		pool->frames[f].mapcount = 1;
		uksm_frame_put(pool, f);	/* frees, new key (stale nodes), punch */
	}
	uksm_frames_flush(pool);
	pool->st.reclaim_runs++;
	return (long)ok;
}

/*
 * The clock: walk from the hand, hinting resident pages not hinted yet and
 * taking those still hinted as candidates, until @nr frames are freed or
 * @revolutions pass (the fault handler does one: a page it hints now must
 * have a revolution's time to be touched before it can go).  @group >= 0: only that group's frames.  Caller
 * holds pool->lock.
 */
void uksm_reclaim_locked(struct uksm_pool *pool, size_t nr, int group, int revolutions)
{
	size_t freed = 0, walked = 0, limit = (size_t)revolutions * pool->va_pages;

	if (pool->swap_fd < 0)
		return;
	while (freed < nr && walked < limit) {
		size_t n = 0, want = nr - freed, run = 0, run_start = 0;
		long r;

		if (want > pool->reclaim_batch)
			want = pool->reclaim_batch;
		while (n < want && walked < limit) {
			size_t v = pool->clock_hand;
			struct uksm_pte *pte = &pool->ptes[v];

			pool->clock_hand = v + 1 < pool->va_pages ? v + 1 : 0;
			walked++;
			if (!evictable(pte) ||
			    (group >= 0 && pool->frames[pte->pfn].group != (uint32_t)group)) {
				hint_run(pool, run_start, run);
				run = 0;
				continue;
			}
			if (!(pte->spare[0] & UKSM_PTE_HINT)) {
				/* second chance: hint it, take it next time round */
				if (run && (v != run_start + run ||
					    pool->ptes[run_start].state != pte->state)) {
					hint_run(pool, run_start, run);
					run = 0;
				}
				if (!run)
					run_start = v;
				run++;
				if (v + 1 == pool->va_pages) {
					hint_run(pool, run_start, run);
					run = 0;
				}
				continue;
			}
			hint_run(pool, run_start, run);
			run = 0;
			if (pool->evict_mark[pte->pfn] ||
			    pool->frames[pte->pfn].mapcount >= SWAP_MAP_MAX)
				continue;
			pool->evict_mark[pte->pfn] = 1;
			pool->evict_vpn[pte->pfn] = (uint32_t)v;
			pool->evict_frames[n++] = pte->pfn;
		}
		hint_run(pool, run_start, run);
		if (!n)
			continue;
		r = evict_batch(pool, n);
		if (r < 0)
			return;		/* the write failed: stop evicting */
		freed += (size_t)r;
	}
}

/*
 * uksm_reclaim - evict until @nr more frames are free, or, with @nr 0,
 * until frames_used is back under max_resident (and @group, if >= 0, under
 * its own limit).  One batch per hold of pool->lock.  Returns frames freed,
 * or -errno of a failed swap write.
 */
int uksm_reclaim(struct uksm_pool *pool, size_t nr, int group)
{
	size_t freed = 0;

	if (pool->swap_fd < 0)
		return -EINVAL;
	for (;;) {
		size_t want, before;
		uint64_t errors;

		uksm_lock(pool);
		if (nr)
			want = nr > freed ? nr - freed : 0;
		else if (group >= 0 && group < UKSM_MAX_GROUPS && pool->group_max[group])
			want = pool->group_frames[group] > pool->group_max[group] ?
			       pool->group_frames[group] - pool->group_max[group] : 0;
		else
			want = pool->st.frames_used > pool->max_resident ?
			       pool->st.frames_used - pool->max_resident : 0;
		if (!want) {
			uksm_unlock(pool);
			return (int)freed;
		}
		if (want > pool->reclaim_batch)
			want = pool->reclaim_batch;
		before = pool->st.frames_used;
		errors = pool->st.swap_errors;
		uksm_reclaim_locked(pool, want, group, 2);
		freed += before > pool->st.frames_used ? before - pool->st.frames_used : 0;
		if (pool->st.swap_errors != errors) {
			int e = (int)pool->st.last_swap_errno;

			uksm_unlock(pool);
			return -e;
		}
		if (before <= pool->st.frames_used) {	/* nothing evictable left */
			uksm_unlock(pool);
			return (int)freed;
		}
		uksm_unlock(pool);
	}
}

/*
 * Swap in the page at @vpn (SWAPPED), into a frame below @limit (the API's
 * capacity, or the whole table with the COW reserve for the fault handler),
 * evicting others first if none is free.  Caller holds pool->lock.  Returns 0,
 * -ENOMEM (no frame), -EIO (read failed), -EBADMSG (the slot fails its
 * checksum), -errno of mmap.  Async-signal-safe.
 */
int uksm_swap_in_locked(struct uksm_pool *pool, size_t vpn, size_t limit)
{
	struct uksm_pte *pte = &pool->ptes[vpn];
	uint32_t s = pte->pfn, g = uksm_pte_group(pte), cached = pool->slot_cache[s];
	size_t f;
	int err, shared;

	if (cached && pool->frames[cached - 1].key == pool->slot_cache_key[s] &&
	    pool->frames[cached - 1].mapcount &&
	    (pool->frames[cached - 1].flags & UKSM_FRAME_KSM)) {
		/* the swap cache: map the frame another mapper read it into */
		f = cached - 1;
		err = uksm_map_frames(pool, vpn, 1, f, 0);
		if (err)
			return err;
		pool->frames[f].mapcount++;
		pool->st.ksm_mappings++;
		pool->st.swap_cache_hits++;
		pte->state = UKSM_PTE_KSM;
		pte->pfn = (uint32_t)f;
		uksm_slot_put(pool, s, g);
		return 0;
	}
	if (!uksm_frame_alloc_run(pool, 1, limit, &f)) {
		/* make room: evict cold pages (not this one: it is swapped) */
		uksm_reclaim_locked(pool, pool->reclaim_batch, -1, 2);
		if (!uksm_frame_alloc_run(pool, 1, limit, &f))
			return -ENOMEM;
	}
	pool->frames[f].mapcount = 1;
	if (pread(pool->swap_fd, frame_addr(pool, f), PG, (off_t)((size_t)s * PG)) != (ssize_t)PG) {
		uksm_frame_put(pool, f);
		return -EIO;
	}
	if (XXH3_64bits(frame_addr(pool, f), PG) != pool->slot_sum[s]) {
		uksm_frame_put(pool, f);
		return -EBADMSG;
	}
	shared = pool->swap_map[s] > 1;
	err = uksm_map_frames(pool, vpn, 1, f, !shared);
	if (err) {
		uksm_frame_put(pool, f);
		return err;
	}
	uksm_recharge(pool, f, g);
	if (g < UKSM_MAX_GROUPS)
		pool->group_swap_ins[g]++;
	pool->st.swap_ins++;
	if (shared) {
		/* others are still swapped on this slot: share, via the cache */
		pool->frames[f].flags |= UKSM_FRAME_KSM;
		pool->frames[f].key = ++pool->next_key;
		pool->st.ksm_frames++;
		pool->st.ksm_mappings++;
		pool->slot_cache[s] = (uint32_t)f + 1;
		pool->slot_cache_key[s] = pool->frames[f].key;
		pool->cache_slot_of[f] = s + 1;
		/* the cache's own reference: the frame outlives a COW by its
		 * one present mapper, for the mappers still swapped out */
		pool->frames[f].mapcount++;
		pte->state = UKSM_PTE_KSM;
	} else {
		pte->state = UKSM_PTE_NORMAL;
	}
	pte->pfn = (uint32_t)f;
	uksm_slot_put(pool, s, g);
	return 0;
}

/* Swap in every SWAPPED page of a range (pin, lock, unmerge). */
int uksm_swap_in_range(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	int err = 0;

	if (vpn + npages > pool->va_pages)
		return -EINVAL;
	for (size_t done = 0; done < npages && !err;) {
		size_t n = npages - done < UKSM_RUN_MAX ? npages - done : UKSM_RUN_MAX;

		uksm_lock(pool);
		for (size_t i = vpn + done; i < vpn + done + n && !err; i++) {
			if (pool->ptes[i].state == UKSM_PTE_SWAPPED)
				err = uksm_swap_in_locked(pool, i, pool->capacity_frames);
			else if (resident_state(pool->ptes[i].state) &&
				 (pool->ptes[i].spare[0] & UKSM_PTE_HINT))
				err = uksm_hint_restore(pool, i);
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		done += n;
	}
	return err;
}

/* pool.lock()/unlock(): LOCKED pages are swapped in and never evicted. */
int uksm_set_locked(struct uksm_pool *pool, size_t vpn, size_t npages, int on)
{
	int err = 0;

	if (vpn + npages > pool->va_pages)
		return -EINVAL;
	if (on && pool->swap_fd >= 0) {
		/* in first, then locked: a lock that fails leaves nothing locked */
		err = uksm_swap_in_range(pool, vpn, npages);
		if (err)
			return err;
	}
	uksm_lock(pool);
	for (size_t i = vpn; i < vpn + npages; i++) {
		if (on)
			pool->ptes[i].spare[0] |= UKSM_PTE_LOCKED;
		else
			pool->ptes[i].spare[0] &= ~UKSM_PTE_LOCKED;
	}
	uksm_unlock(pool);
	return err;
}

/* Put a buffer's pages in @group; their private frames follow. */
int uksm_set_group(struct uksm_pool *pool, size_t vpn, size_t npages, int group)
{
	if (vpn + npages > pool->va_pages || group < 0 || group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	uksm_lock(pool);
	for (size_t i = vpn; i < vpn + npages; i++) {
		struct uksm_pte *pte = &pool->ptes[i];

		if (pte->state == UKSM_PTE_SWAPPED) {
			pool->group_swapped[uksm_pte_group(pte)]--;
			pool->group_swapped[group]++;
		}
		pte->spare[1] = (uint8_t)group;
		if (pte->state == UKSM_PTE_NORMAL)
			uksm_recharge(pool, pte->pfn, (uint32_t)group);
	}
	uksm_unlock(pool);
	return 0;
}

int uksm_group_limit(struct uksm_pool *pool, int group, size_t max_frames)
{
	if (group < 0 || group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	uksm_lock(pool);
	pool->group_max[group] = max_frames;
	uksm_unlock(pool);
	return 0;
}

/* frames charged, pages swapped, swap-ins, limit */
int uksm_group_stats(struct uksm_pool *pool, int group, uint64_t *out4)
{
	if (group < 0 || group >= UKSM_MAX_GROUPS)
		return -EINVAL;
	uksm_lock(pool);
	out4[0] = pool->group_frames[group];
	out4[1] = pool->group_swapped[group];
	out4[2] = pool->group_swap_ins[group];
	out4[3] = pool->group_max[group];
	uksm_unlock(pool);
	return 0;
}

/*
 * Fork: the child must not share its parent's swap file either (the parent
 * frees and reuses slots).  It copies the file into one of its own, in the
 * same directory, unlinked.  Syscalls only.
 */
static void uksm_swap_fork_die(const char *why)
{
	static const char msg[] = "uksm: forked child: ";

	(void)!write(2, msg, sizeof(msg) - 1);
	(void)!write(2, why, strlen(why));
	(void)!write(2, "\n", 1);
	_exit(70);
}

void uksm_swap_fork_child(struct uksm_pool *pool)
{
	loff_t in = 0, out = 0;
	size_t left;
	int fd;

	if (pool->swap_fd < 0)
		return;
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
		uksm_swap_fork_die("cannot create the child's own swap file");
	left = pool->st.swap_file_slots * PG;
	while (left) {
		ssize_t n = copy_file_range(pool->swap_fd, &in, fd, &out, left, 0);

		if (n <= 0)
			break;
		left -= (size_t)n;
	}
	if (!left && dup3(fd, pool->swap_fd, O_CLOEXEC) >= 0) {
		close(fd);
		return;
	}
	/* sharing the parent's slots would end in checksum failures: stop */
	uksm_swap_fork_die("cannot copy the swap file into the child's own");
}
