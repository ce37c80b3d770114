// SPDX-License-Identifier: MIT
/*
 * merge.c - write_protect_page, try_to_merge_one_page and break_cow, by runs.
 *
 * The scanner hands over a batch of merge decisions; this file carries them
 * out under pool->lock and re-checks everything the scanner believed, since
 * the user may have written, freed or COW-broken any of those pages since
 * it looked: the keyhole of a stable node, the page states, and the page
 * contents themselves, compared again after write-protecting.
 */
#include "uksm_internal.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>

/*
 * Every protection change or remap of a page ends its reference hint: the
 * page is accessible again, so reclaim must not take it for cold (it would
 * evict a page that can still be written).  Only swap.c sets UKSM_PTE_HINT.
 */
static void clear_hints(struct uksm_pool *pool, size_t vpn, size_t n)
{
	for (size_t i = vpn; i < vpn + n; i++)
		pool->ptes[i].spare[0] &= ~UKSM_PTE_HINT;
}

static int protect_run(struct uksm_pool *pool, size_t vpn, size_t n, int writable)
{
	if (uksm_mprotect(page_addr(pool, vpn), n * PG,
		     PROT_READ | (writable ? PROT_WRITE : 0)))
		return -errno;
	clear_hints(pool, vpn, n);
	return 0;
}

/*
 * VMAs that changing the protection or the mapping of pages [vpn, vpn + n)
 * can add: one for each end of the range that cuts through a mapping.
 * Pages inside the range only ever fuse.
 */
static int64_t split_cost(struct uksm_pool *pool, size_t vpn, size_t n)
{
	return (vpn > 0 && uksm_same_vma(pool, vpn - 1)) +
	       (vpn + n < pool->va_pages && uksm_same_vma(pool, vpn + n - 1));
}

/* Take @cost VMAs from the caller's budget; refuse when it is spent. */
static int vma_charge(int64_t *budget, int64_t cost)
{
	if (*budget < cost)
		return 0;
	*budget -= cost;
	return 1;
}

/*
 * Frames for @n pages from @vpn that will coalesce with a neighbour: the
 * frame after the left neighbour's, or the run ending just before the
 * right neighbour's, when free.  Sequential writes through a merged run
 * (arr[:] = x) then fault page by page onto one growing run of frames, and
 * the kernel merges the new mappings into one VMA instead of splitting the
 * run into a VMA per page (vm.max_map_count).
 */
static size_t alloc_near(struct uksm_pool *pool, size_t vpn, size_t n,
			 size_t limit, size_t *pfn_out)
{
	size_t want[2];
	int nr = 0;

	if (limit > pool->frames_online)
		limit = pool->frames_online;
	if (vpn > 0 && pool->ptes[vpn - 1].state == UKSM_PTE_NORMAL)
		want[nr++] = (size_t)pool->ptes[vpn - 1].pfn + 1;
	if (vpn + n < pool->va_pages && pool->ptes[vpn + n].state == UKSM_PTE_NORMAL &&
	    pool->ptes[vpn + n].pfn >= n)
		want[nr++] = (size_t)pool->ptes[vpn + n].pfn - n;
	for (int i = 0; i < nr; i++) {
		size_t got = uksm_frame_alloc_at(pool, want[i], n, limit);

		if (got) {
			*pfn_out = want[i];
			return got;
		}
	}
	return uksm_frame_alloc_run(pool, n, limit, pfn_out);
}

/*
 * uksm_break_cow - give each of @n pages from @vpn (KSM or ZERO) a private
 * frame again: copy the KSM frame through the direct map (a fresh frame is
 * already zero for a ZERO page), map it read-write, drop the old mapping.
 * A KSM frame with no other mapper is simply made writable again: nothing
 * to copy, unless @whole: then every page gets a fresh frame, so that the
 * whole range can become one mapping.  Consecutive pages get consecutive
 * frames when free ones allow.  Frames come from below @limit.
 * Returns pages done (< @n when frames ran out) or -errno from mmap.
 * Caller holds pool->lock, and flushes.  Async-signal-safe.
 */
int uksm_break_cow(struct uksm_pool *pool, size_t vpn, size_t n, size_t limit,
		   int whole)
{
	size_t done = 0;

	while (done < n) {
		struct uksm_pte *pte = &pool->ptes[vpn + done];
		size_t m, got, pfn;
		int err;

		if (pte->state == UKSM_PTE_NORMAL || pte->state == UKSM_PTE_NONE) {
			done++;
			continue;
		}
		if (!whole && pte->state == UKSM_PTE_KSM &&
		    pool->frames[pte->pfn].mapcount == 1 &&
		    !uksm_swap_cached(pool, pte->pfn)) {
			struct uksm_frame *f = &pool->frames[pte->pfn];

			err = protect_run(pool, vpn + done, 1, 1);
			if (err)
				return err;
			f->flags &= ~UKSM_FRAME_KSM;
			f->key = ++pool->next_key;
			pool->st.ksm_frames--;
			pool->st.ksm_mappings--;
			pool->st.cow_reuse++;
			pte->state = UKSM_PTE_NORMAL;
			done++;
			continue;
		}
		m = 1;
		while (done + m < n) {
			struct uksm_pte *next = &pool->ptes[vpn + done + m];

			if (next->state == UKSM_PTE_ZERO ||
			    (next->state == UKSM_PTE_KSM &&
			     (whole || pool->frames[next->pfn].mapcount > 1 ||
			      uksm_swap_cached(pool, next->pfn))))
				m++;
			else
				break;
		}
		got = alloc_near(pool, vpn + done, m, limit, &pfn);
		if (!got)
			return (int)done;
		for (size_t k = 0; k < got; k++) {
			struct uksm_pte *p = &pool->ptes[vpn + done + k];

			if (p->state == UKSM_PTE_KSM)
				memcpy(frame_addr(pool, pfn + k),
				       frame_addr(pool, p->pfn), PG);
			else	/* a hole until written: allocate it, as uksm_alloc does */
				(void)uksm_fallocate(pool->fd, 0, (off_t)((pfn + k) * PG), PG);
		}
		err = uksm_map_frames(pool, vpn + done, got, pfn, 1);
		if (err) {
			for (size_t k = 0; k < got; k++) {
				pool->frames[pfn + k].mapcount = 1;
				uksm_frame_put(pool, pfn + k);
			}
			return err;
		}
		for (size_t k = 0; k < got; k++) {
			struct uksm_pte *p = &pool->ptes[vpn + done + k];

			if (p->state == UKSM_PTE_KSM) {
				pool->st.ksm_mappings--;
				pool->st.cow_breaks++;
				uksm_frame_put(pool, p->pfn);
			} else {
				pool->st.zero_pages--;
				pool->st.zero_cow++;
			}
			pool->frames[pfn + k].mapcount = 1;
			uksm_recharge(pool, pfn + k, uksm_pte_group(p));
			p->pfn = (uint32_t)(pfn + k);
			p->state = UKSM_PTE_NORMAL;
			p->spare[0] &= ~UKSM_PTE_HINT;
		}
		done += got;
	}
	return (int)done;
}

/*
 * uksm_unmerge - MADV_UNMERGEABLE for @npages from @vpn: break COW on every
 * KSM or ZERO page, within the API's capacity.  *unmerged counts the pages
 * given a private frame.  -ENOSPC if capacity ran out part way, -ENOMEM if
 * mmap did (vm.max_map_count): the pages done stay done, the rest stay
 * merged, nothing is lost.
 */
int uksm_unmerge(struct uksm_pool *pool, size_t vpn, size_t npages,
		 size_t *unmerged)
{
	size_t done = 0;
	int err = 0;

	*unmerged = 0;
	if (vpn + npages > pool->va_pages)
		return -EINVAL;
	while (done < npages && !err) {
		size_t n = npages - done, need = 0;
		int r;

		if (n > UKSM_RUN_MAX)
			n = UKSM_RUN_MAX;
		uksm_lock(pool);
		for (size_t i = 0; i < n && !err; i++) {
			struct uksm_pte *pte = &pool->ptes[vpn + done + i];

			if (pte->state == UKSM_PTE_SWAPPED)	/* in first, then private */
				err = uksm_swap_in_locked(pool, vpn + done + i, pool->capacity_frames);
			need += pte->state == UKSM_PTE_KSM || pte->state == UKSM_PTE_ZERO;
		}
		if (err) {
			uksm_frames_flush(pool);
			uksm_unlock(pool);
			break;
		}
		if (need && pool->st.frames_used + need > pool->capacity_frames)
			r = -ENOSPC;
		else
			r = need ? uksm_break_cow(pool, vpn + done, n,
						  pool->capacity_frames, 0) : (int)n;
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		if (r < 0)
			err = r;
		else if ((size_t)r < n)
			err = -ENOSPC;
		else
			*unmerged += need;
		done += n;
	}
	return err;
}

/*
 * uksm_merge - carry out @n merge decisions, sorted by src_vpn.  Entry i
 * merges page src_vpn[i] into either a stable node's frame (dst_vpn[i] < 0:
 * dst_pfn[i] seen through the keyhole dst_key[i]) or the frame of another
 * page found equal in the unstable tree (dst_vpn[i] >= 0), which is upgraded
 * in place to a KSM frame first, allocating nothing (patch 5).
 *
 * Runs of entries whose sources and targets both advance by one page cost
 * one mprotect of the anchors, one of the sources, one mmap, one punch.
 * result[i] is UKSM_MERGE_*; for merged entries out_pfn[i], out_key[i] name
 * the KSM frame, for the scanner's stable node.  *vma_budget is charged two
 * per protection change or remap that could split a mapping; entries beyond
 * it are skipped with UKSM_MERGE_NOVMA, never failing anyone's mmap later.
 */
int uksm_merge(struct uksm_pool *pool, size_t n, const int64_t *src_vpn,
	       const int64_t *dst_vpn, const uint32_t *dst_pfn,
	       const uint32_t *dst_key, uint32_t max_sharing,
	       int64_t *vma_budget, uint32_t *out_pfn, uint32_t *out_key,
	       uint8_t *result)
{
	struct uksm_run_ctx *c = &pool->run;	/* used under pool->lock only */
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
		size_t j = i + 1, r, len;
		int stable = dst_vpn[i] < 0;

		/*
		 * A run: consecutive sources whose targets advance by one page
		 * (one remap for all) or stay on the same frame (identical pages:
		 * one write-protect for all, a remap each).
		 */
		while (j < n && j - i < UKSM_RUN_MAX && src_vpn[j] == src_vpn[j - 1] + 1 &&
		       (dst_vpn[j] < 0) == stable &&
		       (stable ? dst_pfn[j] - dst_pfn[j - 1] <= 1 :
				 (uint64_t)(dst_vpn[j] - dst_vpn[j - 1]) <= 1))
			j++;
		len = j - i;

		uksm_lock(pool);
		/* 1: resolve targets; check the keyholes and the page states */
		for (r = 0; r < len; r++) {
			size_t k = i + r;
			struct uksm_pte *src = &pool->ptes[src_vpn[k]];

			c->target[r] = -1;
			c->promoted[r] = 0;
			c->wp[r] = 0;
			if (src->state != UKSM_PTE_NORMAL)
				continue;		/* BUSY */
			if (stable) {
				struct uksm_frame *f;

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
				struct uksm_pte *anchor = &pool->ptes[dst_vpn[k]];

				if (dst_vpn[k] == src_vpn[k])
					continue;
				if (anchor->state == UKSM_PTE_KSM)
					c->target[r] = anchor->pfn;
				else if (anchor->state == UKSM_PTE_NORMAL)
					c->target[r] = -2;	/* promote first */
			}
			if (c->target[r] == (int64_t)src->pfn) {
				c->target[r] = -1;
				result[k] = UKSM_MERGE_SELF;
			}
		}

		/* 2: upgrade unstable anchors in place: write-protect, mark KSM */
		for (r = 0; r < len;) {
			size_t e = r + 1, span;

			if (c->target[r] != -2) {
				r++;
				continue;
			}
			while (e < len && c->target[e] == -2 &&
			       (uint64_t)(dst_vpn[i + e] - dst_vpn[i + e - 1]) <= 1)
				e++;
			span = (size_t)(dst_vpn[i + e - 1] - dst_vpn[i + r]) + 1;
			if (!vma_charge(vma_budget, split_cost(pool, dst_vpn[i + r], span)) ||
			    protect_run(pool, dst_vpn[i + r], span, 0)) {
				for (; r < e; r++) {
					c->target[r] = -1;
					result[i + r] = UKSM_MERGE_NOVMA;
				}
				continue;
			}
			for (; r < e; r++) {
				struct uksm_pte *anchor = &pool->ptes[dst_vpn[i + r]];
				struct uksm_frame *f = &pool->frames[anchor->pfn];

				if (anchor->state == UKSM_PTE_KSM) {
					/* upgraded just now for an earlier entry */
					c->target[r] = anchor->pfn;
					continue;
				}
				f->flags |= UKSM_FRAME_KSM;
				f->key = ++pool->next_key;
				pool->st.ksm_frames++;
				pool->st.ksm_mappings++;
				anchor->state = UKSM_PTE_KSM;
				c->target[r] = anchor->pfn;
				c->promoted[r] = 1;
			}
		}

		/* 3: write_protect_page on the sources, then compare again */
		for (r = 0; r < len;) {
			size_t e = r + 1;

			if (c->target[r] < 0) {
				r++;
				continue;
			}
			while (e < len && c->target[e] >= 0)
				e++;
			if (!vma_charge(vma_budget, split_cost(pool, src_vpn[i + r], e - r)) ||
			    protect_run(pool, src_vpn[i + r], e - r, 0)) {
				for (; r < e; r++) {
					c->target[r] = -1;
					result[i + r] = UKSM_MERGE_NOVMA;
				}
				continue;
			}
			for (; r < e; r++) {
				struct uksm_pte *src = &pool->ptes[src_vpn[i + r]];
				struct uksm_frame *kf = &pool->frames[c->target[r]];

				c->wp[r] = 1;
				if (src->state != UKSM_PTE_NORMAL) {
					/* it was upgraded as an anchor in step 2 */
					c->wp[r] = 0;
					c->target[r] = -1;
				} else if (kf->mapcount >= max_sharing) {
					result[i + r] = UKSM_MERGE_FULL;
					c->target[r] = -1;
				} else if (memcmp(frame_addr(pool, src->pfn),
						  frame_addr(pool, c->target[r]), PG)) {
					result[i + r] = UKSM_MERGE_DIFFER;
					c->target[r] = -1;
				} else {
					kf->mapcount++;	/* taken now: max_sharing holds within the run */
				}
			}
		}

		/* 4: replace_page: remap runs of sources onto runs of frames */
		for (r = 0; r < len;) {
			size_t e = r + 1;
			int64_t cost;
			int err;

			if (c->target[r] < 0) {
				r++;
				continue;
			}
			while (e < len && c->target[e] == c->target[e - 1] + 1 &&
			       src_vpn[i + e] == src_vpn[i + e - 1] + 1)
				e++;
			/*
			 * The sources were write-protected as one piece; remapping
			 * part of it cuts it where a neighbour is still
			 * protected and not remapped (c->wp still set).
			 */
			cost = (r > 0 && c->wp[r - 1] &&
				src_vpn[i + r - 1] + 1 == src_vpn[i + r]) +
			       (e < len && c->wp[e] && src_vpn[i + e - 1] + 1 == src_vpn[i + e]);
			err = vma_charge(vma_budget, cost) ?
			      uksm_map_frames(pool, src_vpn[i + r], e - r,
					      c->target[r], 0) : -ENOMEM;
			for (; r < e; r++) {
				size_t k = i + r;
				struct uksm_pte *src = &pool->ptes[src_vpn[k]];
				struct uksm_frame *kf = &pool->frames[c->target[r]];

				if (err) {
					kf->mapcount--;
					result[k] = UKSM_MERGE_NOVMA;
					c->target[r] = -1;
					continue;
				}
				uksm_frame_put(pool, src->pfn);
				src->pfn = (uint32_t)c->target[r];
				src->state = UKSM_PTE_KSM;
				pool->st.ksm_mappings++;
				pool->st.pages_merged++;
				c->wp[r] = 0;
				result[k] = UKSM_MERGE_OK;
				out_pfn[k] = src->pfn;
				out_key[k] = kf->key;
			}
			pool->st.merge_runs++;
		}

		/*
		 * 5: undo.  Sources write-protected but not merged get their
		 * write access back; anchors upgraded for nothing go back to
		 * being ordinary pages, with a new key.  Should mprotect fail
		 * here, the page stays NORMAL but read-only and the fault
		 * handler makes it writable on the first write.
		 */
		for (r = 0; r < len;) {
			size_t e = r + 1;

			if (!c->wp[r]) {
				r++;
				continue;
			}
			while (e < len && c->wp[e])
				e++;
			protect_run(pool, src_vpn[i + r], e - r, 1);
			r = e;
		}
		for (r = 0; r < len; r++) {
			struct uksm_pte *anchor;
			struct uksm_frame *f;

			if (!c->promoted[r])
				continue;
			anchor = &pool->ptes[dst_vpn[i + r]];
			f = &pool->frames[anchor->pfn];
			if (anchor->state != UKSM_PTE_KSM || f->mapcount != 1)
				continue;
			protect_run(pool, dst_vpn[i + r], 1, 1);
			f->flags &= ~UKSM_FRAME_KSM;
			f->key = ++pool->next_key;
			pool->st.ksm_frames--;
			pool->st.ksm_mappings--;
			anchor->state = UKSM_PTE_NORMAL;
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		i = j;
	}
	return 0;
}

static int zero_candidate(const struct uksm_pte *pte)
{
	return pte->state == UKSM_PTE_NORMAL;
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
 * uksm_merge_zero - use_zero_pages: map each of @n pages (sorted) that is
 * still all zeroes under write-protect onto the kernel's zero page, through
 * a private anonymous read-only mapping, and free its frame.  A write later
 * faults and gets a fresh frame, which is zero already: no copy.
 */
int uksm_merge_zero(struct uksm_pool *pool, size_t n, const int64_t *vpns,
		    int64_t *vma_budget, uint8_t *result)
{
	uint8_t *ok = pool->run.wp;	/* scratch, used under pool->lock only */
	size_t i = 0;

	for (size_t k = 0; k < n; k++) {
		if (vpns[k] < 0 || (size_t)vpns[k] >= pool->va_pages ||
		    (k && vpns[k] <= vpns[k - 1]))
			return -EINVAL;
		result[k] = UKSM_MERGE_BUSY;
	}
	while (i < n) {
		size_t j = i + 1, r;

		while (j < n && j - i < UKSM_RUN_MAX && vpns[j] == vpns[j - 1] + 1)
			j++;
		uksm_lock(pool);
		for (r = i; r < j;) {
			size_t e = r + 1, r0;

			if (!zero_candidate(&pool->ptes[vpns[r]])) {
				r++;
				continue;
			}
			while (e < j && zero_candidate(&pool->ptes[vpns[e]]))
				e++;
			if (!vma_charge(vma_budget, split_cost(pool, vpns[r], e - r)) ||
			    protect_run(pool, vpns[r], e - r, 0)) {
				for (; r < e; r++)
					result[r] = UKSM_MERGE_NOVMA;
				continue;
			}
			for (size_t k = r; k < e; k++)
				ok[k - i] = page_is_zero(frame_addr(pool, pool->ptes[vpns[k]].pfn));
			r0 = r;
			while (r < e) {
				size_t z = r + 1;
				void *p;

				if (!ok[r - i]) {
					result[r] = UKSM_MERGE_DIFFER;
					protect_run(pool, vpns[r], 1, 1);
					r++;
					continue;
				}
				while (z < e && ok[z - i])
					z++;
				/* cuts the protected piece [r0, e) where it stays */
				p = vma_charge(vma_budget, (r > r0) + (z < e)) ?
				    uksm_mmap(page_addr(pool, vpns[r]), (z - r) * PG, PROT_READ,
					 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) :
				    MAP_FAILED;
				if (p == MAP_FAILED) {
					protect_run(pool, vpns[r], z - r, 1);
					for (; r < z; r++)
						result[r] = UKSM_MERGE_NOVMA;
					continue;
				}
				for (; r < z; r++) {
					struct uksm_pte *pte = &pool->ptes[vpns[r]];

					uksm_frame_put(pool, pte->pfn);
					pte->spare[0] &= ~UKSM_PTE_HINT;
					pte->state = UKSM_PTE_ZERO;
					pte->pfn = 0;
					pool->st.zero_pages++;
					pool->st.pages_merged++;
					result[r] = UKSM_MERGE_OK;
				}
				pool->st.merge_runs++;
			}
		}
		uksm_frames_flush(pool);
		uksm_unlock(pool);
		i = j;
	}
	return 0;
}
