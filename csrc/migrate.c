// SPDX-License-Identifier: MIT
/*
 * migrate.c - moving stable frames: compaction and offlining of the frame
 * store, by rmap walk.
 *
 * The frame store holds only stable frames, and deferred ones a forked child
 * may still map.  Merges take the lowest free pfn, but COW breaks and freed
 * buffers give frames back wherever they are, so the memfd keeps the size
 * of the pool's busiest moment: the holes are punched and cost nothing, but
 * the file stays at its high-water mark.  uksm_compact() moves the highest
 * live frames into the lowest holes, so that the live ones fill [0, live)
 * again, and cuts the file after them; frames already below that line stay
 * put.  With @shrink_frames it also takes that many pfns off the top of the
 * store for good, moving what lives there below first: memory hot-remove.
 *
 * First it learns of the copies the kernel made, as reconcile does: a frame
 * that only copied views still referred to is freed, not moved.  Then the
 * rmap is built, where rmap_walk_ksm() keeps its list of rmap items: one
 * counting sort of the page table by pfn, made without pool->lock (a
 * faulting writer may be waiting for it), and trusted only as far as
 * indexing.  A frame moves only if, under the lock, the views the rmap
 * lists for it are all of its mapcount.
 *
 * A move, for a batch of frames under pool->lock:
 *
 *   write barrier	mprotect the views PROT_READ.  Frames are never written
 *			once filled, so the copy needs no barrier, but the remap
 *			does: with cow="kernel" the kernel copies a view on write
 *			without telling us, and a view copied between our check
 *			and our mmap would lose the write.  A writer faults now,
 *			waits on pool->lock in the SIGSEGV handler, and retries.
 *   pagemap check	a view found copied already holds the user's data: it is
 *			private now (uksm_page_cowed), and stays where it is.
 *   copy		through the direct map, into freshly allocated frames.
 *   remap		one mmap per run of views on consecutive frames.  The
 *			mapcount, key, flags and group go with the frame; the
 *			move is logged, so that the scanner's stable node follows
 *			its (pfn, key) keyhole; the old frame is punched, or
 *			deferred while a fork epoch is open.
 *   release		write access back for what was not remapped.
 *
 * A remap that fails (ENOMEM at vm.max_map_count) leaves its views on the
 * old frame, whose content is theirs: a frame some of whose views moved is
 * two stable frames then, and the stable node keeps the old one.  No frame
 * is freed while a view maps it.  Deferred frames are never moved, written
 * or freed: compaction fills around them, and an offlining that finds one
 * in the range to be taken away is refused.
 *
 * Cutting the file.  A punched hole leaves a view's private copy alone, but
 * ftruncate() does not: truncate_pagecache() unmaps even the COWed pages of
 * private mappings beyond the new size, and the user's data would be gone.
 * A page copied on write stays in its view's mapping, at the offset of the
 * frame it came from; so such pages above the cut first get anonymous memory
 * of their own (copied under the write barrier, put in place whole by
 * mremap), and the cut, checked against /proc/self/maps under the lock,
 * never goes below an offset that a private mapping of the store covers.
 * While a fork epoch is open the file is not cut: a child's mappings are not
 * in our maps.
 *
 * Each hold of pool->lock moves at most UKSM_RUN_MAX frames or pages (the
 * last one reads /proc/self/maps too): the pause a writer can see, reported
 * as max_hold_ns.
 */
#include "uksm_internal.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>

#define NONE		UINT32_MAX
#define BATCH_VIEWS	(4 * UKSM_RUN_MAX)	/* rmap entries looked at per hold */
#define EVAC_MAX	16384			/* mappings to empty above the cut */
#define READ_ONCE(x)	__atomic_load_n(&(x), __ATOMIC_RELAXED)

struct compact_ctl {
	size_t online;		/* frames_online before a shrink */
	size_t live, deferred;	/* frames, at the start */
	size_t base, top;	/* the rmap covers frames [base, top) */
	size_t scan;		/* the next frame to consider moving */
	uint32_t *head;		/* rmap of frame f: vpn[head[f - base] ..      */
	uint32_t *vpn;		/*   head[f - base + 1]), NONE in unused slots */
	uint32_t *idx;		/* frame f's index in the batch, or NONE */
	uint64_t *wp;		/* per vpn: write-protected by this batch */
	uint64_t *pm;		/* UKSM_RUN_MAX pagemap entries */
	uint32_t *src, *dst, *moved;	/* the batch, UKSM_RUN_MAX each */
	size_t n;
	uint32_t *evac;		/* (vpn, pages) of mappings above the cut */
	size_t nr_evac;
	void *mem;
	size_t bytes;
};

#define for_each_batch_vpn(c, i, j, v)						\
	for ((i) = 0; (i) < (c)->n; (i)++)					\
		for ((j) = (c)->head[(c)->src[i] - (c)->base];			\
		     (j) < (c)->head[(c)->src[i] - (c)->base + 1]; (j)++)	\
			if (((v) = (c)->vpn[j]) == NONE) {} else

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t hold_begin(struct uksm_pool *pool)
{
	uksm_lock(pool);
	return now_ns();
}

static void hold_end(struct uksm_pool *pool, uint64_t t0, struct uksm_compact_stats *out)
{
	uksm_frames_flush(pool);
	uksm_unlock(pool);
	t0 = now_ns() - t0;
	if (t0 > out->max_hold_ns)
		out->max_hold_ns = t0;
}

/* First set bit at or after @from, below @limit; @limit if none. */
static size_t find_set_bit(const uint64_t *map, size_t from, size_t limit)
{
	for (size_t i = from; i < limit; i = (i | 63) + 1) {
		uint64_t w = map[i >> 6] & (~0ULL << (i & 63));

		if (w) {
			i = (i & ~(size_t)63) + (size_t)__builtin_ctzll(w);
			return i < limit ? i : limit;
		}
	}
	return limit;
}

/* One past the last set bit below @limit; 0 if none. */
static size_t last_set_bit(const uint64_t *map, size_t limit)
{
	for (size_t w = (limit + 63) / 64; w--;) {
		uint64_t m = map[w] & ((w + 1) * 64 > limit ? (1ULL << (limit & 63)) - 1 : ~0ULL);

		if (m)
			return w * 64 + 64 - (size_t)__builtin_clzll(m);
	}
	return 0;
}

static uint32_t batch_idx(const struct compact_ctl *c, size_t pfn)
{
	return pfn >= c->base && pfn < c->top ? c->idx[pfn - c->base] : NONE;
}

/* A view of a frame of this batch. */
static int batch_view(struct uksm_pool *pool, const struct compact_ctl *c, size_t vpn)
{
	return pool->ptes[vpn].state == UKSM_PTE_KSM && batch_idx(c, pool->ptes[vpn].pfn) != NONE;
}

/* ... write-protected, checked, and not remapped yet. */
static int remappable(struct uksm_pool *pool, const struct compact_ctl *c, size_t vpn)
{
	return uksm_bit_test(c->wp, vpn) && batch_view(pool, c, vpn);
}

/* Do views @vpn and @vpn + 1 go, in one mmap, onto consecutive new frames? */
static int remap_next(struct uksm_pool *pool, const struct compact_ctl *c, size_t vpn)
{
	const struct uksm_pte *a = &pool->ptes[vpn], *b = a + 1;

	return vpn + 1 < pool->va_pages && remappable(pool, c, vpn) &&
	       remappable(pool, c, vpn + 1) && b->pfn == a->pfn + 1 &&
	       c->dst[batch_idx(c, b->pfn)] == c->dst[batch_idx(c, a->pfn)] + 1;
}

/* The protection a page we write-protected gets back. */
static int page_prot(struct uksm_pool *pool, size_t vpn)
{
	return pool->ptes[vpn].state == UKSM_PTE_KSM ? view_prot(pool) : PROT_READ | PROT_WRITE;
}

/*
 * The first hold: the pool has a store of its own (pool.c's uksm_compact()
 * detached an heir; one still an heir is left alone); an offlining is
 * checked and its range taken from the allocator at once, so that no merge
 * puts a frame there meanwhile.
 */
static int compact_begin(struct uksm_pool *pool, uint64_t shrink_frames,
			 struct compact_ctl *c)
{
	size_t end, p;
	int err = pool->heir ? -EBUSY : 0;

	if (err)
		return err;
	c->online = pool->frames_online;
	c->top = pool->file_frames;
	c->deferred = pool->st.frames_deferred;
	c->live = pool->st.frames_used - pool->st.frames_deferred;
	if (!shrink_frames)
		return 0;
	if (shrink_frames >= c->online || c->online - shrink_frames < pool->st.frames_used)
		return -ENOSPC;
	end = c->online < c->top ? c->online : c->top;
	for (p = find_set_bit(pool->frame_map, c->online - shrink_frames, end); p < end;
	     p = find_set_bit(pool->frame_map, p + 1, end))
		if (!(pool->frames[p].flags & UKSM_FRAME_KSM))
			return -EBUSY;		/* deferred: may not move */
	pool->frames_online = c->online - shrink_frames;
	return 0;
}

/*
 * Without pool->lock: the line below which the live frames fit (the pfns not
 * deferred, counted up to @live), and the rmap of the frames above it, in
 * one scratch mapping sized for the worst case and touched as far as used.
 */
static int compact_plan(struct uksm_pool *pool, struct compact_ctl *c)
{
	size_t nv = pool->va_pages, nr, p = c->live, seen = 0;
	char *m;

	if (c->deferred)
		for (p = 0; p < c->top && seen < c->live; p++)
			seen += !(READ_ONCE(pool->frames[p].flags) & UKSM_FRAME_DEFERRED);
	if (p > pool->frames_online)
		p = pool->frames_online;
	c->scan = c->base = p < c->top ? p : c->top;
	nr = c->top - c->base;
	c->bytes = UKSM_RUN_MAX * 20 + (nv + 63) / 64 * 8 + EVAC_MAX * 8 + (2 * nr + 1 + nv) * 4;
	m = mmap(NULL, c->bytes, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (m == MAP_FAILED)
		return -ENOMEM;
	c->mem = m;
	c->pm = (uint64_t *)m;		m += UKSM_RUN_MAX * 8;
	c->wp = (uint64_t *)m;		m += (nv + 63) / 64 * 8;
	c->evac = (uint32_t *)m;	m += EVAC_MAX * 8;
	c->src = (uint32_t *)m;		m += UKSM_RUN_MAX * 4;
	c->dst = (uint32_t *)m;		m += UKSM_RUN_MAX * 4;
	c->moved = (uint32_t *)m;	m += UKSM_RUN_MAX * 4;
	c->head = (uint32_t *)m;	m += (nr + 1) * 4;
	c->idx = (uint32_t *)m;		m += nr * 4;
	c->vpn = (uint32_t *)m;

	/* count, then place; idx counts each bucket's fill, as the table may change */
	for (int place = 0; nr && place < 2; place++) {
		for (size_t v = 0; v < nv; v++) {
			uint32_t f = READ_ONCE(pool->ptes[v].pfn) - (uint32_t)c->base;

			if (READ_ONCE(pool->ptes[v].state) != UKSM_PTE_KSM || f >= nr)
				continue;
			if (!place)
				c->head[f + 1]++;
			else if (c->head[f] + c->idx[f] < c->head[f + 1])
				c->vpn[c->head[f] + c->idx[f]++] = (uint32_t)v;
		}
		for (size_t f = 0; !place && f < nr; f++)
			c->head[f + 1] += c->head[f];
	}
	for (size_t f = 0; f < nr; f++) {
		for (uint32_t j = c->head[f] + c->idx[f]; j < c->head[f + 1]; j++)
			c->vpn[j] = NONE;
		c->idx[f] = NONE;
	}
	return 0;
}

/* Does the rmap list every view frame @pfn has? */
static int rmap_complete(struct uksm_pool *pool, const struct compact_ctl *c, size_t pfn)
{
	uint32_t found = 0;

	for (uint32_t j = c->head[pfn - c->base]; j < c->head[pfn - c->base + 1]; j++)
		found += c->vpn[j] != NONE && pool->ptes[c->vpn[j]].state == UKSM_PTE_KSM &&
			 pool->ptes[c->vpn[j]].pfn == pfn;
	return found == pool->frames[pfn].mapcount;
}

/*
 * Step 1: the next live frames above the line, in pfn order, each with a
 * fresh frame in the lowest hole below it (a run of holes: one fallocate).
 * Returns 0 when there is nothing left to move.
 */
static int batch_collect(struct uksm_pool *pool, struct compact_ctl *c,
			 struct uksm_compact_stats *out)
{
	size_t p = c->scan, views = 0, i = 0;

	for (c->n = 0; c->n < UKSM_RUN_MAX && views < BATCH_VIEWS &&
	     (p = find_set_bit(pool->frame_map, p, c->top)) < c->top; p++) {
		if (!(pool->frames[p].flags & UKSM_FRAME_KSM))
			continue;			/* deferred: it stays */
		views += c->head[p - c->base + 1] - c->head[p - c->base] + 1;
		if (rmap_complete(pool, c, p))
			c->src[c->n++] = (uint32_t)p;
		else
			out->frames_skipped++;		/* a view the rmap missed */
	}
	c->scan = p;
	while (i < c->n) {
		size_t lim = c->src[i] < pool->frames_online ? c->src[i] : pool->frames_online;
		size_t d = uksm_find_zero_bit(pool->frame_map, pool->frame_hint, lim), got;

		got = d < lim ? uksm_frame_alloc_at(pool, d, c->n - i, pool->frames_online, NULL) : 0;
		if (!got)
			break;
		pool->frame_hint = d + got;
		for (size_t k = i; k < i + got; k++) {
			c->dst[k] = (uint32_t)(d + k - i);
			c->moved[k] = 0;
			c->idx[c->src[k] - c->base] = (uint32_t)k;
		}
		i += got;
	}
	if (i < c->n) {
		/* no room below c->src[i]: try it again next time, or give it up */
		out->frames_skipped += !i;
		c->scan = i ? c->src[i] : c->src[0] + 1;
		c->n = i;
	}
	return c->n || c->scan < c->top;
}

/*
 * Step 2: the write barrier, one mprotect per run of consecutive views, and
 * the pagemap check under it: a view copied already leaves the batch.
 */
static void batch_protect(struct uksm_pool *pool, struct compact_ctl *c)
{
	size_t i, j, v, e, a, len;

	for_each_batch_vpn(c, i, j, v) {
		if (!batch_view(pool, c, v) || uksm_bit_test(c->wp, v) ||
		    (v && batch_view(pool, c, v - 1) && !uksm_bit_test(c->wp, v - 1)))
			continue;	/* not a run's start, or done */
		for (e = v + 1; e < pool->va_pages && batch_view(pool, c, e) &&
		     !uksm_bit_test(c->wp, e); e++)
			;
		if (uksm_mprotect(page_addr(pool, v), (e - v) * PG, PROT_READ)) {
			/* these stay; undo what a partial mprotect did */
			(void)uksm_mprotect(page_addr(pool, v), (e - v) * PG, view_prot(pool));
			continue;
		}
		for (a = v; a < e; a++)
			uksm_bit_set(c->wp, a);
		for (a = v; a < e; a += len) {
			len = e - a < UKSM_RUN_MAX ? e - a : UKSM_RUN_MAX;
			if (uksm_pagemap_read((size_t)page_addr(pool, a), len, c->pm)) {
				(void)uksm_mprotect(page_addr(pool, a), len * PG, view_prot(pool));
				for (size_t k = a; k < a + len; k++)
					uksm_bit_clear(c->wp, k);
				continue;
			}
			for (size_t k = 0; k < len; k++)
				if (pm_cowed(c->pm[k]))
					uksm_page_cowed(pool, a + k);
		}
	}
}

/*
 * Step 3: copy the frames still mapped (runs of them at once), and map the
 * checked views onto the copies, one mmap per run.
 */
static void batch_remap(struct uksm_pool *pool, struct compact_ctl *c)
{
	size_t i, j, v, e, k;

	for (i = 0; i < c->n; i += k) {
		k = 1;
		if (!pool->frames[c->src[i]].mapcount)
			continue;	/* every view was copied: it is gone */
		while (i + k < c->n && c->src[i + k] == c->src[i] + k &&
		       c->dst[i + k] == c->dst[i] + k && pool->frames[c->src[i + k]].mapcount)
			k++;
		memcpy(frames_addr(pool, c->dst[i], k), frames_addr(pool, c->src[i], k), k * PG);
	}
	for_each_batch_vpn(c, i, j, v) {
		if (!remappable(pool, c, v) || (v && remap_next(pool, c, v - 1)))
			continue;
		for (e = v + 1; remap_next(pool, c, e - 1); e++)
			;
		/* on failure the views stay on the old frame, which is theirs */
		if (uksm_map_view(pool, v, e - v, pool->ro_fd,
				  c->dst[batch_idx(c, pool->ptes[v].pfn)], view_prot(pool)))
			continue;
		for (k = v; k < e; k++) {
			uint32_t b = batch_idx(c, pool->ptes[k].pfn);

			pool->ptes[k].pfn = c->dst[b];
			c->moved[b]++;
			uksm_bit_clear(c->wp, k);
		}
	}
}

/* Step 4: the frame table: what moved takes its count, key and group along. */
static void batch_finish(struct uksm_pool *pool, struct compact_ctl *c,
			 uint32_t *log_from, uint32_t *log_to, size_t log_cap,
			 size_t *log_n, struct uksm_compact_stats *out)
{
	for (size_t i = 0; i < c->n; i++) {
		struct uksm_frame *old = &pool->frames[c->src[i]];
		struct uksm_frame *new = &pool->frames[c->dst[i]];

		if (!c->moved[i]) {
			out->frames_skipped += old->mapcount != 0;
			new->mapcount = 1;
			uksm_frame_put(pool, c->dst[i]);	/* never mapped */
			continue;
		}
		new->mapcount = c->moved[i];
		new->flags = UKSM_FRAME_KSM;
		new->group = old->group;
		pool->st.ksm_frames++;
		out->frames_moved++;
		out->runs_moved += !(i && c->moved[i - 1] && c->src[i] == c->src[i - 1] + 1 &&
				     c->dst[i] == c->dst[i - 1] + 1);
		if (old->mapcount > c->moved[i]) {
			old->mapcount -= c->moved[i];	/* two frames now */
			continue;
		}
		new->key = old->key;	/* the keyhole moves with the frame */
		if (*log_n < log_cap) {
			log_from[*log_n] = c->src[i];
			log_to[(*log_n)++] = c->dst[i];
		}
		old->mapcount = 1;
		uksm_frame_put(pool, c->src[i]);	/* new key; punched or deferred */
	}
}

/* Step 5: write access back for every page protected and not remapped. */
static void batch_release(struct uksm_pool *pool, struct compact_ctl *c)
{
	size_t i, j, v, e;

	for_each_batch_vpn(c, i, j, v) {
		int prot = page_prot(pool, v);

		if (!uksm_bit_test(c->wp, v) ||
		    (v && uksm_bit_test(c->wp, v - 1) && page_prot(pool, v - 1) == prot))
			continue;
		for (e = v + 1; e < pool->va_pages && uksm_bit_test(c->wp, e) &&
		     page_prot(pool, e) == prot; e++)
			;
		/* should this fail, the handler mends the page on its first write */
		(void)uksm_mprotect(page_addr(pool, v), (e - v) * PG, prot);
		for (size_t k = v; k < e; k++)
			uksm_bit_clear(c->wp, k);
	}
	for (i = 0; i < c->n; i++)
		c->idx[c->src[i] - c->base] = NONE;
}

/*
 * The private mappings of the store that reach frame @cut or above: returns
 * the end of the highest (@cut if none), or -errno.  With @c, their parts
 * above the cut inside the pool are noted in c->evac.  /proc/self/maps is
 * read into the stack: no malloc, no stdio.
 */
static long store_maps(struct uksm_pool *pool, struct compact_ctl *c, size_t cut)
{
	uintptr_t va = (uintptr_t)pool->va, va_end = va + pool->va_pages * PG;
	size_t have = 0, top = cut;
	char buf[8192], *line, *nl;
	struct stat st;
	ssize_t r;
	int fd;

	if (fstat(pool->fd, &st))
		return -errno;
	fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	while ((r = read(fd, buf + have, sizeof(buf) - 1 - have)) > 0 ||
	       (r < 0 && errno == EINTR)) {
		have += r > 0 ? (size_t)r : 0;
		buf[have] = 0;
		for (line = buf; (nl = strchr(line, '\n')); line = nl + 1) {
			/* lo-hi perms offset major:minor inode path */
			char *s, private;
			uint64_t lo = strtoull(line, &s, 16), hi, off, end;
			unsigned int major, minor;

			hi = strtoull(s + 1, &s, 16);
			private = s[4];
			off = strtoull(s + 6, &s, 16) / PG;
			major = (unsigned int)strtoul(s + 1, &s, 16);
			minor = (unsigned int)strtoul(s + 1, &s, 16);
			end = off + (hi - lo) / PG;
			if (private != 'p' || strtoull(s + 1, NULL, 10) != st.st_ino ||
			    makedev(major, minor) != st.st_dev || end <= cut)
				continue;
			top = end > top ? end : top;
			if (c && lo >= va && hi <= va_end && c->nr_evac < EVAC_MAX) {
				uint64_t first = (lo - va) / PG + (off < cut ? cut - off : 0);

				c->evac[2 * c->nr_evac] = (uint32_t)first;
				c->evac[2 * c->nr_evac++ + 1] = (uint32_t)((hi - va) / PG - first);
			}
		}
		if (line == buf && have == sizeof(buf) - 1)
			break;		/* no line is this long */
		have -= (size_t)(line - buf);
		memmove(buf, line, have);
	}
	close(fd);
	return r || have ? -EIO : (long)top;
}

/*
 * Pages [vpn, vpn + n), copied on write, get anonymous memory of their own:
 * write-protected, copied into a fresh mapping, which mremap puts in their
 * place whole (writable memory mapped first and filled after would let a
 * write in before the copy, and the copy over it).  The kernel checks the
 * map count before it unmaps anything: if it refuses, nothing changed.
 */
static void evacuate_run(struct uksm_pool *pool, size_t vpn, size_t n)
{
	char *p = page_addr(pool, vpn), *tmp;

	if (uksm_mprotect(p, n * PG, PROT_READ))
		return;
	tmp = uksm_mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (tmp != MAP_FAILED) {
		memcpy(tmp, p, n * PG);
		if (mremap(tmp, n * PG, n * PG, MREMAP_MAYMOVE | MREMAP_FIXED, p) != MAP_FAILED)
			return;
		munmap(tmp, n * PG);
	}
	(void)uksm_mprotect(p, n * PG, PROT_READ | PROT_WRITE);
}

/*
 * The private pages in mappings of the store above the cut, a run of at
 * most UKSM_RUN_MAX per hold.  Best effort: what stays keeps the file from
 * being cut below it (compact_end).
 */
static void compact_evacuate(struct uksm_pool *pool, struct compact_ctl *c,
			     struct uksm_compact_stats *out)
{
	size_t cut = last_set_bit(pool->frame_map, pool->file_frames);

	if (!c->mem || uksm_must_defer(pool) || cut >= pool->file_frames ||
	    store_maps(pool, c, cut) < 0)
		return;
	for (size_t r = 0; r < c->nr_evac; r++) {
		size_t v = c->evac[2 * r], end = v + c->evac[2 * r + 1];

		for (size_t n; v < end; v += n) {
			uint64_t t0 = hold_begin(pool);

			n = end - v < UKSM_RUN_MAX ? end - v : UKSM_RUN_MAX;
			for (size_t a = v, e; a < v + n; a = e + 1) {
				for (e = a; e < v + n && pool->ptes[e].state == UKSM_PTE_PRIVATE &&
				     !(pool->ptes[e].flags & UKSM_PTE_PINNED); e++)
					;
				if (e > a)
					evacuate_run(pool, a, e - a);
			}
			hold_end(pool, t0, out);
		}
	}
}

/*
 * The last hold: an offlining that left a live frame behind is undone; the
 * file is cut after the highest frame in use or deferred, and after every
 * private mapping of it.
 */
static int compact_end(struct uksm_pool *pool, struct compact_ctl *c, int err,
		       struct uksm_compact_stats *out)
{
	size_t end = c->online < pool->file_frames ? c->online : pool->file_frames;
	long top;

	for (size_t p = find_set_bit(pool->frame_map, pool->frames_online, end);
	     !err && p < end; p = find_set_bit(pool->frame_map, p + 1, end))
		if (pool->frames[p].flags & UKSM_FRAME_KSM)
			err = -EBUSY;
	if (err)
		pool->frames_online = c->online;
	uksm_frames_flush(pool);
	top = (long)last_set_bit(pool->frame_map, pool->file_frames);
	if (uksm_must_defer(pool) || (size_t)top >= pool->file_frames)
		top = -EBUSY;	/* a child may map the frames above, or the last is in use */
	else
		top = store_maps(pool, NULL, (size_t)top);
	if (top >= 0 && (size_t)top < pool->file_frames &&
	    !ftruncate(pool->fd, (off_t)top * (off_t)PG)) {
		pool->file_frames = (size_t)top;
		pool->st.frames_file = (size_t)top;
	}
	out->file_frames_after = pool->file_frames;
	return err;
}

/*
 * uksm_compact_frames - compaction, and offlining of @shrink_frames frames from the
 * top of the store (0: just compact).  KSM frames moved are logged in
 * log_from/log_to, in order, so that the scanner can move its stable nodes
 * along.  -ENOSPC if the frames in use would not fit below the new top, and
 * -EBUSY if a frame there cannot be moved (deferred, raced, no room): then
 * nothing is taken away.  What was moved stays moved.
 */
int uksm_compact_frames(struct uksm_pool *pool, uint64_t shrink_frames,
			uint32_t *log_from, uint32_t *log_to, size_t log_cap,
			size_t *log_n, struct uksm_compact_stats *out)
{
	struct compact_ctl c;
	uint64_t t0;
	int err, more = 1;

	memset(out, 0, sizeof(*out));
	memset(&c, 0, sizeof(c));
	*log_n = 0;
	out->file_frames_before = READ_ONCE(pool->file_frames);

	(void)uksm_reconcile(pool, 0, pool->va_pages);	/* best effort */
	t0 = hold_begin(pool);
	out->file_frames_after = pool->file_frames;
	err = compact_begin(pool, shrink_frames, &c);
	hold_end(pool, t0, out);
	if (err)
		return err;

	err = compact_plan(pool, &c);
	while (!err && more) {
		t0 = hold_begin(pool);
		more = batch_collect(pool, &c, out);
		if (c.n) {
			batch_protect(pool, &c);
			batch_remap(pool, &c);
			batch_finish(pool, &c, log_from, log_to, log_cap, log_n, out);
			batch_release(pool, &c);
		}
		hold_end(pool, t0, out);
	}
	compact_evacuate(pool, &c, out);

	t0 = hold_begin(pool);
	err = compact_end(pool, &c, err, out);
	hold_end(pool, t0, out);
	if (c.mem)
		munmap(c.mem, c.bytes);
	return err;
}
