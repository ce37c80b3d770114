// SPDX-License-Identifier: MIT
/*
 * merge.c - write_protect_page, try_to_merge_one_page, replace_page and
 * break_ksm, by runs; and the lazy side of copy-on-write: reconcile.
 *
 * The scanner hands over a batch of merge decisions; this file carries them
 * out under pool->lock and re-checks everything the scanner believed, since
 * the user may have written, freed or COWed any of those pages since it
 * looked: the keyhole of a stable node, the page states, and the page
 * contents themselves, compared again after write-protecting.
 *
 * A merge is four steps, each one syscall per run of pages:
 *
 *   write_protect	mprotect the sources (and the unstable-tree pages they
 *			match) read-only: from here no write can slip in
 *			between the compare and the remap and be lost;
 *   compare		memcmp under protection, against the stable frame
 *			through the direct map, or the tree page itself;
 *   install		a tree page matched for the first time is copied into
 *			a fresh frame and becomes that frame's first view; then
 *			the sources are mapped as views of their frames, one
 *			mmap per run of consecutive frames (the anonymous pages
 *			they replace go back to the kernel with that mmap);
 *   release		what was protected and not merged gets its write
 *			access back.
 */
#include "uksm_internal.h"

#include <string.h>
#include <sys/mman.h>

enum {
	TARGET_NONE = -1,	/* not merging (result says why) */
	TARGET_ANCHOR = -2,	/* an unstable-tree page: a frame is made for it */
};

/*
 * Take @cost VMAs from the caller's budget; refuse when it is spent.  Each
 * step of a run charges the most it can cut (a write-protect in the middle
 * of a mapping: two), so that the budget covers the run at its peak, when
 * its pages are protected and not yet remapped.
 */
static int vma_charge(int64_t *budget, int64_t cost)
{
	if (*budget < cost)
		return 0;
	*budget -= cost;
	return 1;
}

/*
 * A run is done: give back what its steps charged beyond what it left
 * behind.  Most of a write-protect's cuts heal when the pages are remapped
 * or released, and a view next to a view of the frame before it joins that
 * mapping: the net change, counted over the run's window before and after,
 * is what the process keeps.  It may be negative (views joined), and then
 * the budget grows.  The fault handler's estimate follows it too.
 */
static void vma_settle(struct uksm_pool *pool, int64_t *budget, int64_t at_start,
		       int64_t before, int64_t after)
{
	int64_t kept = after - before;

	if (at_start - kept > *budget)
		*budget = at_start - kept;
	pool->vma_estimate += kept;
}

static int protect(struct uksm_pool *pool, size_t vpn, size_t n, int prot)
{
	return uksm_mprotect(page_addr(pool, vpn), n * PG, prot) ? -errno : 0;
}

static int mergeable(const struct uksm_pte *pte)
{
	return pte->state == UKSM_PTE_PRIVATE && !(pte->flags & UKSM_PTE_PINNED);
}

/* uksm_reconcile - uksm_reconcile_locked() over a range, reading pagemap itself. */
int uksm_reconcile(struct uksm_pool *pool, size_t vpn, size_t npages)
{
	int found = 0;

	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	for (size_t done = 0; done < npages;) {
		size_t n = npages - done < UKSM_RUN_MAX ? npages - done : UKSM_RUN_MAX;
		int err;

		uksm_lock(pool);
		err = uksm_pagemap_read((size_t)page_addr(pool, vpn + done), n, pool->run.pm);
		if (!err)
			found += uksm_reconcile_locked(pool, vpn + done, n, pool->run.pm);
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		if (err)
			return err;
		done += n;
	}
	return found;
}

/*
 * uksm_unmerge - MADV_UNMERGEABLE for @npages from @vpn: every KSM, ZERO or
 * SWAPPED page becomes private, one MADV_POPULATE_WRITE per run (the kernel
 * breaks COW for the whole run in one call; read-only views in signal mode
 * are made writable first).  *unmerged counts the pages that became
 * private.  -ENOMEM if the kernel ran out of memory part way: the pages
 * done stay done, the rest stay as they were, nothing is lost.
 */
int uksm_unmerge(struct uksm_pool *pool, size_t vpn, size_t npages,
		 size_t *unmerged)
{
	int err = 0;

	*unmerged = 0;
	if (!uksm_range_ok(pool, vpn, npages))
		return -EINVAL;
	for (size_t done = 0; done < npages && !err;) {
		size_t n = npages - done < UKSM_RUN_MAX ? npages - done : UKSM_RUN_MAX;

		uksm_lock(pool);
		for (size_t r = vpn + done; r < vpn + done + n && !err;) {
			size_t e = r;

			while (e < vpn + done + n && pool->ptes[e].state != UKSM_PTE_PRIVATE &&
			       pool->ptes[e].state != UKSM_PTE_NONE)
				e++;
			if (e == r) {
				r++;
				continue;
			}
			if (pool->cow_mode == UKSM_COW_SIGNAL &&
			    protect(pool, r, e - r, PROT_READ | PROT_WRITE)) {
				err = -errno;
				break;
			}
			if (madvise(page_addr(pool, r), (e - r) * PG, MADV_POPULATE_WRITE)) {
				/* some of the run may be done: pagemap tells which */
				err = -errno;
				if (!uksm_pagemap_read((size_t)page_addr(pool, r), e - r, pool->run.pm))
					*unmerged += (size_t)uksm_reconcile_locked(pool, r, e - r,
										   pool->run.pm);
				break;
			}
			for (size_t i = r; i < e; i++)
				uksm_page_cowed(pool, i);
			*unmerged += e - r;
			r = e;
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		done += n;
	}
	return err;
}

/* Step 1: resolve each entry's target; check keyholes and page states. */
static void merge_resolve(struct uksm_pool *pool, size_t i, size_t len,
			  const int64_t *src_vpn, const int64_t *dst_vpn,
			  const uint32_t *dst_pfn, const uint32_t *dst_key,
			  uint8_t *result)
{
	struct uksm_run_ctx *c = &pool->run;
	size_t lo = (size_t)src_vpn[i], hi = (size_t)src_vpn[i + len - 1];

	for (size_t r = 0; r < len; r++) {
		size_t k = i + r;
		const struct uksm_pte *src = &pool->ptes[src_vpn[k]];

		c->target[r] = TARGET_NONE;
		c->wp[r] = c->anchor_wp[r] = c->ok[r] = 0;
		if (!mergeable(src))
			continue;		/* BUSY */
		if (dst_vpn[k] < 0) {
			const struct uksm_frame *f;

			if (dst_pfn[k] >= pool->nr_frames) {
				result[k] = UKSM_MERGE_STALE;
				continue;
			}
			f = &pool->frames[dst_pfn[k]];
			if (!(f->flags & UKSM_FRAME_KSM) || f->key != dst_key[k] ||
			    !f->mapcount) {
				result[k] = UKSM_MERGE_STALE;
				continue;
			}
			c->target[r] = dst_pfn[k];
		} else {
			const struct uksm_pte *anchor = &pool->ptes[dst_vpn[k]];

			if (dst_vpn[k] == src_vpn[k])
				continue;
			if (anchor->state == UKSM_PTE_KSM)
				c->target[r] = anchor->pfn;
			else if (mergeable(anchor))
				c->target[r] = TARGET_ANCHOR;
		}
	}
	/*
	 * A tree page that is itself a source of this run, merging elsewhere,
	 * cannot also be copied into a frame of its own: try it next time.
	 */
	for (size_t r = 0; r < len; r++) {
		size_t a;

		if (c->target[r] != TARGET_ANCHOR)
			continue;
		a = (size_t)dst_vpn[i + r];
		if (a >= lo && a <= hi && c->target[a - lo] != TARGET_NONE)
			c->target[r] = TARGET_NONE;
	}
}

/* Step 2: write-protect runs of sources, and runs of their tree pages. */
static void merge_write_protect(struct uksm_pool *pool, size_t i, size_t len,
				const int64_t *src_vpn, const int64_t *dst_vpn,
				int64_t *vma_budget, uint8_t *result)
{
	struct uksm_run_ctx *c = &pool->run;

	for (size_t r = 0; r < len;) {
		size_t e = r + 1;

		if (c->target[r] == TARGET_NONE) {
			r++;
			continue;
		}
		while (e < len && c->target[e] != TARGET_NONE)
			e++;
		if (!vma_charge(vma_budget, uksm_split_cost(pool, src_vpn[i + r], e - r)) ||
		    protect(pool, src_vpn[i + r], e - r, PROT_READ)) {
			for (; r < e; r++) {
				c->target[r] = TARGET_NONE;
				result[i + r] = UKSM_MERGE_NOVMA;
			}
			continue;
		}
		for (; r < e; r++)
			c->wp[r] = 1;
	}
	for (size_t r = 0; r < len;) {
		size_t e = r + 1, span;

		if (c->target[r] != TARGET_ANCHOR) {
			r++;
			continue;
		}
		while (e < len && c->target[e] == TARGET_ANCHOR &&
		       (uint64_t)(dst_vpn[i + e] - dst_vpn[i + e - 1]) <= 1)
			e++;
		span = (size_t)(dst_vpn[i + e - 1] - dst_vpn[i + r]) + 1;
		if (!vma_charge(vma_budget, uksm_split_cost(pool, dst_vpn[i + r], span)) ||
		    protect(pool, dst_vpn[i + r], span, PROT_READ)) {
			for (; r < e; r++) {
				c->target[r] = TARGET_NONE;
				result[i + r] = UKSM_MERGE_NOVMA;
			}
			continue;
		}
		for (; r < e; r++)
			c->anchor_wp[r] = 1;
	}
}

/* Step 3: compare under protection; take a sharing slot on stable frames. */
static void merge_compare(struct uksm_pool *pool, size_t i, size_t len,
			  const int64_t *src_vpn, const int64_t *dst_vpn,
			  uint32_t max_sharing, uint8_t *result)
{
	struct uksm_run_ctx *c = &pool->run;

	for (size_t r = 0; r < len; r++) {
		const char *src = page_addr(pool, src_vpn[i + r]);

		if (c->target[r] == TARGET_NONE)
			continue;
		if (c->target[r] == TARGET_ANCHOR) {
			c->ok[r] = !memcmp(src, page_addr(pool, dst_vpn[i + r]), PG);
		} else {
			struct uksm_frame *kf = &pool->frames[c->target[r]];

			if (kf->mapcount >= max_sharing) {
				result[i + r] = UKSM_MERGE_FULL;
				c->target[r] = TARGET_NONE;
				continue;
			}
			c->ok[r] = !memcmp(src, frame_addr(pool, c->target[r]), PG);
			if (c->ok[r])
				kf->mapcount++;	/* taken now: max_sharing holds within the run */
		}
		if (!c->ok[r]) {
			result[i + r] = UKSM_MERGE_DIFFER;
			if (c->target[r] != TARGET_ANCHOR)
				c->target[r] = TARGET_NONE;
		}
	}
}

/*
 * Step 4a: each tree page that a source matched gets a frame: copied in
 * once, mapped as the frame's first view.  Consecutive tree pages get
 * consecutive frames where free ones allow, one mmap for the run.  The
 * entries then target that frame like a stable node's.
 */
static void merge_install_anchors(struct uksm_pool *pool, size_t i, size_t len,
				  const int64_t *dst_vpn, uint8_t *result)
{
	struct uksm_run_ctx *c = &pool->run;
	int prot = view_prot(pool);

	for (size_t r = 0; r < len;) {
		size_t e = r + 1, span, got, pfn, a0;
		int err;

		if (c->target[r] != TARGET_ANCHOR || !c->ok[r]) {
			r++;
			continue;
		}
		if (pool->ptes[dst_vpn[i + r]].state == UKSM_PTE_KSM) {
			/* its tree page got a frame in an earlier run */
			c->target[r] = pool->ptes[dst_vpn[i + r]].pfn;
			c->anchor_wp[r] = 0;
			pool->frames[c->target[r]].mapcount++;
			r++;
			continue;
		}
		/* a run of distinct, consecutive tree pages, each matched */
		while (e < len && c->target[e] == TARGET_ANCHOR && c->ok[e] &&
		       (uint64_t)(dst_vpn[i + e] - dst_vpn[i + e - 1]) <= 1)
			e++;
		a0 = (size_t)dst_vpn[i + r];
		span = (size_t)dst_vpn[i + e - 1] - a0 + 1;
		/* the tree pages are write-protected: their bytes are final */
		got = uksm_frame_alloc_run(pool, span, pool->nr_frames, &pfn, page_addr(pool, a0));
		if (!got) {
			for (; r < e; r++) {
				c->target[r] = TARGET_NONE;
				result[i + r] = UKSM_MERGE_NOFRAME;
			}
			continue;
		}
		err = uksm_map_view(pool, a0, got, pool->ro_fd, pfn, prot);
		for (size_t k = 0; k < got; k++) {
			struct uksm_pte *anchor = &pool->ptes[a0 + k];
			struct uksm_frame *f = &pool->frames[pfn + k];

			f->mapcount = 1;
			if (err) {
				uksm_frame_put(pool, pfn + k);
				continue;
			}
			f->flags = UKSM_FRAME_KSM;
			f->group = anchor->group;
			pte_set_ksm(pool, anchor, pfn + k);
			pool->st.ksm_frames++;
		}
		pool->st.merge_runs += !err;
		/* the entries whose tree page got a frame now target it */
		for (; r < e && (size_t)dst_vpn[i + r] < a0 + got; r++) {
			if (err) {
				c->target[r] = TARGET_NONE;
				result[i + r] = UKSM_MERGE_NOVMA;
				continue;
			}
			c->target[r] = (int64_t)(pfn + ((size_t)dst_vpn[i + r] - a0));
			c->anchor_wp[r] = 0;	/* a view now, with its own protection */
			pool->frames[c->target[r]].mapcount++;	/* the source's */
		}
	}
	/* tree pages protected and left private: write access back */
	for (size_t r = 0; r < len; r++) {
		if (!c->anchor_wp[r])
			continue;
		if (pool->ptes[dst_vpn[i + r]].state == UKSM_PTE_PRIVATE)
			(void)protect(pool, dst_vpn[i + r], 1, PROT_READ | PROT_WRITE);
		c->anchor_wp[r] = 0;
		if (c->target[r] == TARGET_ANCHOR)
			c->target[r] = TARGET_NONE;
	}
}

/* Step 4b: replace_page: map runs of sources onto runs of frames. */
static void merge_install_sources(struct uksm_pool *pool, size_t i, size_t len,
				  const int64_t *src_vpn, int64_t *vma_budget,
				  uint32_t *out_pfn, uint32_t *out_key, uint8_t *result)
{
	struct uksm_run_ctx *c = &pool->run;
	int prot = view_prot(pool);

	for (size_t r = 0; r < len;) {
		size_t e = r + 1;
		int64_t cost;
		int err;

		if (c->target[r] < 0 || !c->ok[r]) {
			r++;
			continue;
		}
		while (e < len && c->target[e] >= 0 && c->ok[e] &&
		       c->target[e] == c->target[e - 1] + 1 &&
		       src_vpn[i + e] == src_vpn[i + e - 1] + 1)
			e++;
		/* cuts the protected piece where a neighbour stays protected */
		cost = (r > 0 && c->wp[r - 1] && src_vpn[i + r - 1] + 1 == src_vpn[i + r]) +
		       (e < len && c->wp[e] && src_vpn[i + e - 1] + 1 == src_vpn[i + e]);
		err = vma_charge(vma_budget, cost) ?
		      uksm_map_view(pool, src_vpn[i + r], e - r, pool->ro_fd,
				    (size_t)c->target[r], prot) : -ENOMEM;
		for (; r < e; r++) {
			size_t k = i + r;
			struct uksm_pte *src = &pool->ptes[src_vpn[k]];
			struct uksm_frame *kf = &pool->frames[c->target[r]];

			if (err) {
				uksm_frame_put(pool, (size_t)c->target[r]);
				result[k] = UKSM_MERGE_NOVMA;
				c->target[r] = TARGET_NONE;
				continue;
			}
			pte_set_ksm(pool, src, (size_t)c->target[r]);
			pool->st.pages_merged++;
			c->wp[r] = 0;
			result[k] = UKSM_MERGE_OK;
			out_pfn[k] = src->pfn;
			out_key[k] = kf->key;
		}
		pool->st.merge_runs++;
	}
}

/* Step 5: sources protected but not merged get their write access back. */
static void merge_release(struct uksm_pool *pool, size_t i, size_t len,
			  const int64_t *src_vpn)
{
	struct uksm_run_ctx *c = &pool->run;

	for (size_t r = 0; r < len;) {
		size_t e = r + 1;

		if (!c->wp[r]) {
			r++;
			continue;
		}
		while (e < len && c->wp[e] && src_vpn[i + e] == src_vpn[i + e - 1] + 1)
			e++;
		/* should this fail, the handler makes the page writable on a write */
		(void)protect(pool, src_vpn[i + r], e - r, PROT_READ | PROT_WRITE);
		r = e;
	}
}

/*
 * uksm_merge_runs - carry out @n merge decisions, sorted by src_vpn.  Entry i
 * merges private page src_vpn[i] into either a stable node's frame
 * (dst_vpn[i] < 0: dst_pfn[i] seen through the keyhole dst_key[i]) or,
 * with the unstable tree's page dst_vpn[i] found equal, into a fresh frame
 * holding a copy of that page, which becomes its first view.
 *
 * Runs of entries whose sources and targets both advance by one page cost
 * one mprotect of the sources (and one of the tree pages), one mmap each.
 * result[i] is UKSM_MERGE_*; for merged entries out_pfn[i], out_key[i] name
 * the KSM frame, for the scanner's stable node.  *vma_budget is charged
 * per protection change or remap that could split a mapping; entries
 * beyond it are skipped with UKSM_MERGE_NOVMA, never failing anyone's mmap
 * later.  -EBUSY, every entry BUSY and nothing done, if the pool is an heir.
 */
int uksm_merge_runs(struct uksm_pool *pool, size_t n, const int64_t *src_vpn,
		    const int64_t *dst_vpn, const uint32_t *dst_pfn,
		    const uint32_t *dst_key, uint32_t max_sharing,
		    int64_t *vma_budget, uint32_t *out_pfn, uint32_t *out_key,
		    uint8_t *result)
{
	size_t i = 0;

	if (max_sharing < 2)
		max_sharing = 2;
	for (size_t k = 0; k < n; k++) {
		if (src_vpn[k] < 0 || (size_t)src_vpn[k] >= pool->va_pages ||
		    dst_vpn[k] >= (int64_t)pool->va_pages ||
		    (k && src_vpn[k] <= src_vpn[k - 1]))
			return -EINVAL;
		result[k] = UKSM_MERGE_BUSY;
	}
	while (i < n) {
		size_t j = i + 1, len, d0, d1;
		int stable = dst_vpn[i] < 0;
		int64_t at_start, before;

		/*
		 * A run: consecutive sources whose targets advance by one page
		 * (one remap for all) or stay on the same frame (identical
		 * pages: one write-protect for all, a remap each).
		 */
		while (j < n && j - i < UKSM_RUN_MAX && src_vpn[j] == src_vpn[j - 1] + 1 &&
		       (dst_vpn[j] < 0) == stable &&
		       (stable ? dst_pfn[j] - dst_pfn[j - 1] <= 1 :
				 (uint64_t)(dst_vpn[j] - dst_vpn[j - 1]) <= 1))
			j++;
		len = j - i;

		uksm_lock(pool);
		/*
		 * An heir's store is its parent's, never written: every entry
		 * stays BUSY, and -EBUSY tells pool.c's uksm_merge() to detach
		 * and call again.  Only a fork makes an heir, and the child has
		 * none of our threads: a pool found no heir at the first run
		 * stays one of its own.
		 */
		if (pool->heir) {
			uksm_unlock(pool);
			return -EBUSY;
		}
		/* a run's sources are consecutive, and so are its tree pages */
		d0 = stable ? 1 : (size_t)dst_vpn[i];
		d1 = stable ? 0 : (size_t)dst_vpn[j - 1];
		at_start = *vma_budget;
		before = uksm_vma_window(pool, src_vpn[i], src_vpn[j - 1], d0, d1);
		merge_resolve(pool, i, len, src_vpn, dst_vpn, dst_pfn, dst_key, result);
		merge_write_protect(pool, i, len, src_vpn, dst_vpn, vma_budget, result);
		merge_compare(pool, i, len, src_vpn, dst_vpn, max_sharing, result);
		merge_install_anchors(pool, i, len, dst_vpn, result);
		merge_install_sources(pool, i, len, src_vpn, vma_budget, out_pfn, out_key,
				      result);
		merge_release(pool, i, len, src_vpn);
		vma_settle(pool, vma_budget, at_start, before,
			   uksm_vma_window(pool, src_vpn[i], src_vpn[j - 1], d0, d1));
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		i = j;
	}
	return 0;
}

static int page_is_zero(const char *p)
{
	const uint64_t *w = (const uint64_t *)p;

	for (size_t i = 0; i < PG / 8; i += 8)
		if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] |
		    w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
			return 0;
	return 1;
}

/*
 * uksm_merge_zero - use_zero_pages: each of @n private pages (sorted) that
 * is still all zeroes under write-protect gets fresh anonymous memory over
 * it: it reads as the kernel's zero page and costs nothing until written.
 * Read-write in kernel mode (the first write just allocates; reconcile sees
 * it), read-only in signal mode (the handler counts the write).
 */
int uksm_merge_zero(struct uksm_pool *pool, size_t n, const int64_t *vpns,
		    int64_t *vma_budget, uint8_t *result)
{
	uint8_t *ok = pool->run.ok;	/* scratch, used under pool->lock only */
	int prot = view_prot(pool);
	size_t i = 0;

	for (size_t k = 0; k < n; k++) {
		if (vpns[k] < 0 || (size_t)vpns[k] >= pool->va_pages ||
		    (k && vpns[k] <= vpns[k - 1]))
			return -EINVAL;
		result[k] = UKSM_MERGE_BUSY;
	}
	while (i < n) {
		size_t j = i + 1, r;
		int64_t at_start = *vma_budget, before;

		while (j < n && j - i < UKSM_RUN_MAX && vpns[j] == vpns[j - 1] + 1)
			j++;
		uksm_lock(pool);
		before = uksm_vma_window(pool, vpns[i], vpns[j - 1], 1, 0);
		for (r = i; r < j;) {
			size_t e = r + 1, r0;

			if (!mergeable(&pool->ptes[vpns[r]])) {
				r++;
				continue;
			}
			while (e < j && mergeable(&pool->ptes[vpns[e]]))
				e++;
			if (!vma_charge(vma_budget, uksm_split_cost(pool, vpns[r], e - r)) ||
			    protect(pool, vpns[r], e - r, PROT_READ)) {
				for (; r < e; r++)
					result[r] = UKSM_MERGE_NOVMA;
				continue;
			}
			for (size_t k = r; k < e; k++)
				ok[k - i] = page_is_zero(page_addr(pool, vpns[k]));
			r0 = r;
			while (r < e) {
				size_t z = r + 1;
				int err;

				if (!ok[r - i]) {
					result[r] = UKSM_MERGE_DIFFER;
					(void)protect(pool, vpns[r], 1, PROT_READ | PROT_WRITE);
					r++;
					continue;
				}
				while (z < e && ok[z - i])
					z++;
				/* cuts the protected piece [r0, e) where it stays */
				err = vma_charge(vma_budget, (r > r0) + (z < e)) ?
				      uksm_map_anon(pool, vpns[r], z - r, prot) : -ENOMEM;
				if (err) {
					(void)protect(pool, vpns[r], z - r, PROT_READ | PROT_WRITE);
					for (; r < z; r++)
						result[r] = UKSM_MERGE_NOVMA;
					continue;
				}
				for (; r < z; r++) {
					struct uksm_pte *pte = &pool->ptes[vpns[r]];

					pte->state = UKSM_PTE_ZERO;
					pte->pfn = 0;
					pool->st.zero_pages++;
					pool->st.pages_merged++;
					result[r] = UKSM_MERGE_OK;
				}
				pool->st.merge_runs++;
			}
		}
		vma_settle(pool, vma_budget, at_start, before,
			   uksm_vma_window(pool, vpns[i], vpns[j - 1], 1, 0));
		uksm_unlock(pool);
		i = j;
	}
	return 0;
}
