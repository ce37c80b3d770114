// SPDX-License-Identifier: MIT
/*
 * migrate.c - moving frames: compaction and offlining (seed patches 7, 8).
 *
 * Merging, COW and freeing scatter a long-lived pool's frames over its
 * memfd: the file keeps its high-water size, and a buffer whose pages sit on
 * scattered frames is a mapping per page (VMAs, vm.max_map_count).
 * uksm_compact() moves frames so that the live ones fill [0, frames_used)
 * and each buffer's pages lie on consecutive frames again, then truncates
 * the memfd.  With @shrink_frames it also takes that many frames off the
 * top of the pool for good, migrating whatever lives there below first: the
 * memory hot-remove of patch 8.
 *
 * The plan.  Walking the page table in address order, each frame is given
 * the next free slot the first time a page mapping it is met: NORMAL runs
 * get runs of frames, and the pages merged onto a KSM run follow it.  The
 * plan is made under pool->lock, together with the rmap: every mapped vpn
 * sorted by frame (a counting sort of the page table) - rmap_walk_ksm()'s
 * list of rmap items, built when needed instead of kept.
 *
 * The moves.  Slots are filled in order.  A slot still occupied by some
 * other frame is first evacuated (that frame moves out of the way, to a free
 * frame above the live region when there is one, and later on to its own
 * slot).  Moving a run of frames, under pool->lock, is the migration write
 * barrier of Mesh: write-protect its NORMAL mappers (KSM mappers are
 * read-only already), copy through the direct map, remap every mapper onto
 * the new frames (one mmap per run of mappers), fix the tables, punch the
 * old frames.  A writer that faults meanwhile waits on pool->lock in the
 * fault handler and then writes to the new frame; readers never see a
 * half-copied page, because the page they map changes only by one mmap
 * after the copy is complete.  A KSM frame keeps its key when all its
 * mappers moved, and the move is logged, so the scanner's stable node
 * follows it by pfn; a frame that lost or gained mappers behind the plan's
 * back is simply not moved.  Pinned pages (pool.pin: a device or O_DIRECT
 * may be writing into them) are never moved.
 *
 * Each lock hold is one run of at most UKSM_RUN_MAX frames: the pause a
 * writer can see is one such move, reported as max_hold_ns.
 */
#include "uksm_internal.h"

#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

struct mapper {
	uint32_t vpn;
	uint32_t off;		/* which frame of the run it maps */
};

struct compact_scratch {
	uint32_t *rmap_head;	/* nr_frames + 1: rmap of orig frame f is ...      */
	uint32_t *rmap_vpn;	/* ... rmap_vpn[rmap_head[f] .. rmap_head[f + 1]) */
	uint32_t *plan;		/* slot s gets orig frame plan[s], or NONE         */
	uint32_t *seq;		/* frames in address order of their first mapper  */
	uint8_t *taken;		/* slots already given out                         */
	uint32_t *plan_key;	/* its key when planned                            */
	uint32_t *cur;		/* nr_frames: where orig frame f is now            */
	uint32_t *slot_of;	/* nr_frames: the slot planned for orig frame f    */
	uint32_t *orig_at;	/* nr_frames: orig frame now at pfn p, or NONE     */
	struct mapper *mappers;	/* scratch for one run                             */
	uint32_t moved[UKSM_RUN_MAX];	/* per frame of a run: mappers moved       */
	size_t nr_slots, nr_mapped, bytes;
	void *mem;
};

#define NONE UINT32_MAX
/* runs at least this long, already in place, are not moved (and slack) */
#define ANCHOR_RUN 16

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int mapped_state(uint8_t state)
{
	return state == UKSM_PTE_NORMAL || state == UKSM_PTE_KSM;
}

/*
 * Sort a run's mappers by vpn, in place and without malloc (qsort may
 * allocate, and we hold pool->lock): Shell's sort, gaps 3h + 1.
 */
static void sort_mappers(struct mapper *m, size_t n)
{
	size_t gap = 1;

	while (gap < n / 3)
		gap = 3 * gap + 1;
	for (; gap; gap /= 3) {
		for (size_t i = gap; i < n; i++) {
			struct mapper t = m[i];
			size_t j = i;

			while (j >= gap && m[j - gap].vpn > t.vpn) {
				m[j] = m[j - gap];
				j -= gap;
			}
			m[j] = t;
		}
	}
}

/* End of the run of consecutive NORMAL mappers starting at @a (@a if none). */
static size_t normal_run_end(struct uksm_pool *pool, const struct mapper *m,
			     size_t n, size_t a)
{
	size_t b = a;

	if (a >= n || pool->ptes[m[a].vpn].state != UKSM_PTE_NORMAL)
		return a;
	b++;
	while (b < n && m[b].vpn == m[b - 1].vpn + 1 &&
	       pool->ptes[m[b].vpn].state == UKSM_PTE_NORMAL)
		b++;
	return b;
}

/*
 * The plan and the rmap, read WITHOUT pool->lock: the pass is O(virtual
 * pages) and a faulting writer must not wait for it.  The page table may
 * change under us (COW breaks, frees, swap-ins later), so nothing read here
 * is trusted beyond indexing: every bucket is bounded, and every move checks
 * again under the lock what it relies on (frame key, the mappers found
 * against the mapcount).  One anonymous mapping holds all the tables, sized
 * for the worst case and touched only as far as used.
 */
static int plan_compaction(struct uksm_pool *pool, struct compact_scratch *sc,
			   size_t live)
{
	size_t nf = pool->nr_frames, nv = pool->va_pages, next = 0;
	char *p;

	size_t L = live + ANCHOR_RUN < pool->frames_online ? live + ANCHOR_RUN :
								pool->frames_online;

	sc->bytes = (nf + 1) * 4 + nv * 4 + 2 * L * 4 + live * 4 + L + 3 * nf * 4 +
		    (nv + 1) * sizeof(struct mapper);
	sc->mem = mmap(NULL, sc->bytes, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (sc->mem == MAP_FAILED)
		return -ENOMEM;
	p = sc->mem;
	sc->rmap_head = (uint32_t *)p;		p += (nf + 1) * 4;
	sc->rmap_vpn = (uint32_t *)p;		p += nv * 4;
	sc->plan = (uint32_t *)p;		p += L * 4;
	sc->plan_key = (uint32_t *)p;		p += L * 4;
	sc->seq = (uint32_t *)p;		p += live * 4;
	sc->cur = (uint32_t *)p;		p += nf * 4;
	sc->slot_of = (uint32_t *)p;		p += nf * 4;
	sc->orig_at = (uint32_t *)p;		p += nf * 4;
	sc->mappers = (struct mapper *)p;	p += (nv + 1) * sizeof(struct mapper);
	sc->taken = (uint8_t *)p;		/* bytes last: the rest stay aligned */

	/* rmap: counting sort of the mapped vpns by frame */
	for (size_t v = 0; v < nv; v++) {
		struct uksm_pte pte = pool->ptes[v];

		if (mapped_state(pte.state) && pte.pfn < nf)
			sc->rmap_head[pte.pfn + 1]++;
	}
	for (size_t f = 0; f < nf; f++)
		sc->rmap_head[f + 1] += sc->rmap_head[f];
	/* slot_of counts each frame's vpns placed so far, for now (zeroed) */
	for (size_t v = 0; v < nv; v++) {
		struct uksm_pte pte = pool->ptes[v];
		uint32_t f = pte.pfn;

		if (!mapped_state(pte.state) || f >= nf ||
		    sc->slot_of[f] >= sc->rmap_head[f + 1] - sc->rmap_head[f])
			continue;
		sc->rmap_vpn[sc->rmap_head[f] + sc->slot_of[f]++] = (uint32_t)v;
	}
	for (size_t f = 0; f < nf; f++) {
		sc->cur[f] = (uint32_t)f;
		sc->orig_at[f] = (uint32_t)f;
		sc->slot_of[f] = NONE;
	}
	/* the order: frames in address order of their first mapper */
	for (size_t v = 0; v < nv && next < live; v++) {
		struct uksm_pte pte = pool->ptes[v];
		uint32_t f = pte.pfn;

		if (!mapped_state(pte.state) || f >= nf || sc->slot_of[f] != NONE)
			continue;
		sc->slot_of[f] = (uint32_t)next;
		sc->seq[next++] = f;
	}
	/*
	 * The plan.  A long run of the order that already sits on consecutive
	 * frames inside the final size stays where it is (moving it would gain
	 * nothing: think of one hole below a large merged buffer); the other
	 * frames fill the free slots below the final size in order, so short
	 * runs and scattered pages come together.
	 */
	for (size_t s = 0; s < L; s++)
		sc->plan[s] = NONE;
	for (size_t i = 0; i < next;) {
		size_t j = i + 1;

		while (j < next && sc->seq[j] == sc->seq[j - 1] + 1)
			j++;
		if (j - i >= ANCHOR_RUN && sc->seq[i] + (j - i) <= L) {
			for (size_t k = i; k < j; k++) {
				sc->plan[sc->seq[k]] = sc->seq[k];
				sc->taken[sc->seq[k]] = 1;
			}
		}
		i = j;
	}
	for (size_t i = 0, cursor = 0; i < next; i++) {
		uint32_t f = sc->seq[i];

		if (f < L && sc->plan[f] == f)
			continue;		/* anchored */
		while (cursor < L && sc->taken[cursor])
			cursor++;
		if (cursor >= L)
			break;			/* no room: the rest stay put */
		sc->plan[cursor] = f;
		sc->taken[cursor] = 1;
	}
	for (size_t s = 0; s < L; s++)
		if (sc->plan[s] != NONE)
			sc->plan_key[s] = pool->frames[sc->plan[s]].key;
	sc->nr_slots = L;
	return 0;
}

/*
 * move_run - migrate the @k frames now at @from (orig frames @orig..) to the
 * free frames at @to.  Caller holds pool->lock and has checked that frames
 * from..from+k hold orig..orig+k.  Returns @k, or 0 if the run must stay
 * (a mapper is pinned, a mapper unknown to the rmap, no room, ENOMEM).
 */
static size_t move_run(struct uksm_pool *pool, struct compact_scratch *sc,
		       size_t orig, size_t from, size_t to, size_t k,
		       uint32_t *log_from, uint32_t *log_to, size_t log_cap,
		       size_t *log_n)
{
	size_t nm = 0, done, barrier_end;
	int err = 0;

	for (size_t i = 0; i < k; i++) {
		size_t f = orig + i, found = 0;

		for (uint32_t j = sc->rmap_head[f]; j < sc->rmap_head[f + 1]; j++) {
			struct uksm_pte *pte = &pool->ptes[sc->rmap_vpn[j]];

			if (!mapped_state(pte->state) || pte->pfn != from + i)
				continue;
			if (pte->spare[0] & UKSM_PTE_PINNED)
				return 0;
			sc->mappers[nm].vpn = sc->rmap_vpn[j];
			sc->mappers[nm].off = (uint32_t)i;
			nm++;
			found++;
		}
		/* a mapper we do not know of would keep mapping the old frame */
		if (found != pool->frames[from + i].mapcount || !found)
			return 0;
	}
	done = uksm_frame_alloc_at(pool, to, k, pool->frames_online);
	if (done != k) {
		/* alloc_at takes what it can: give a partial run back */
		for (size_t i = 0; i < done; i++) {
			pool->frames[to + i].mapcount = 1;
			uksm_frame_put(pool, to + i);
		}
		return 0;
	}
	sort_mappers(sc->mappers, nm);

	/* the write barrier: NORMAL mappers read-only while we copy */
	barrier_end = nm;
	for (size_t a = 0; a < nm;) {
		size_t b = normal_run_end(pool, sc->mappers, nm, a);

		if (b == a) {
			a++;
			continue;
		}
		if (uksm_mprotect(page_addr(pool, sc->mappers[a].vpn), (b - a) * PG, PROT_READ)) {
			err = -errno;
			barrier_end = a;
			break;
		}
		a = b;
	}
	done = 0;
	if (!err) {
		memcpy(frame_addr(pool, to), frame_addr(pool, from), k * PG);
		/* remap: one mmap per run of mappers on consecutive frames */
		while (done < nm) {
			size_t b = done + 1;
			uint8_t st = pool->ptes[sc->mappers[done].vpn].state;

			while (b < nm && sc->mappers[b].vpn == sc->mappers[b - 1].vpn + 1 &&
			       sc->mappers[b].off == sc->mappers[b - 1].off + 1 &&
			       pool->ptes[sc->mappers[b].vpn].state == st)
				b++;
			err = uksm_map_frames(pool, sc->mappers[done].vpn, b - done,
					      to + sc->mappers[done].off,
					      st == UKSM_PTE_NORMAL);
			if (err)
				break;
			done = b;
		}
	}
	if (err) {
		/*
		 * ENOMEM (vm.max_map_count) part way.  Remapping anything back
		 * would meet the same limit, so roll forward instead, with no
		 * more mmaps: mappers [0, done) are on the new frames, the rest
		 * on the old ones.  Lift the write barrier from those still on
		 * the old frames, over the runs it was put on (should even that
		 * fail, the fault handler mends a NORMAL page on its first write).
		 */
		for (size_t a = done; a < barrier_end;) {
			size_t b = normal_run_end(pool, sc->mappers, barrier_end, a);

			if (b == a) {
				a++;
				continue;
			}
			uksm_mprotect(page_addr(pool, sc->mappers[a].vpn), (b - a) * PG,
				      PROT_READ | PROT_WRITE);
			for (size_t c = a; c < b; c++)
				pool->ptes[sc->mappers[c].vpn].spare[0] &= ~UKSM_PTE_HINT;
			a = b;
		}
	}

	/* the tables: each page where its mapping now is, then the frames */
	for (size_t i = 0; i < k; i++)
		sc->moved[i] = 0;
	for (size_t a = 0; a < done; a++) {
		const struct mapper *m = &sc->mappers[a];

		pool->ptes[m->vpn].pfn = (uint32_t)(to + m->off);
		pool->ptes[m->vpn].spare[0] &= ~UKSM_PTE_HINT;	/* mapped accessible now */
		sc->moved[m->off]++;
	}
	for (size_t i = 0; i < k; i++) {
		struct uksm_frame *old = &pool->frames[from + i];
		struct uksm_frame *new = &pool->frames[to + i];

		if (!sc->moved[i]) {		/* nothing maps the copy */
			new->mapcount = 1;
			uksm_frame_put(pool, to + i);
			continue;
		}
		new->flags = old->flags;
		uksm_recharge(pool, to + i, old->group);
		if (new->flags & UKSM_FRAME_KSM)
			pool->st.ksm_frames++;
		if (sc->moved[i] < old->mapcount) {
			/*
			 * Some mappers of a KSM frame moved, some did not: two
			 * read-only copies of the same page, each a KSM frame of
			 * its own.  The stable node keeps the old one; the new one
			 * has a fresh key and is simply not indexed.
			 */
			new->mapcount = sc->moved[i];
			old->mapcount -= sc->moved[i];
			continue;
		}
		new->mapcount = old->mapcount;
		new->key = old->key;	/* the keyhole moves with the frame */
		if ((new->flags & UKSM_FRAME_KSM) && *log_n < log_cap) {
			log_from[*log_n] = (uint32_t)(from + i);
			log_to[*log_n] = (uint32_t)(to + i);
			(*log_n)++;
		}
		old->mapcount = 1;
		uksm_frame_put(pool, from + i);	/* frees, new key, punches */
		sc->cur[orig + i] = (uint32_t)(to + i);
		sc->orig_at[to + i] = (uint32_t)(orig + i);
		sc->orig_at[from + i] = NONE;
	}
	return err ? 0 : k;
}

/* A free frame for an evacuee: above the live region if possible. */
static size_t evacuation_target(struct uksm_pool *pool, size_t live, size_t avoid_lo,
				size_t avoid_hi)
{
	size_t f = uksm_find_zero_bit(pool->frame_map, live, pool->frames_online);

	while (f < pool->frames_online && f >= avoid_lo && f < avoid_hi)
		f = uksm_find_zero_bit(pool->frame_map, avoid_hi, pool->frames_online);
	if (f < pool->frames_online)
		return f;
	f = uksm_find_zero_bit(pool->frame_map, 0, pool->frames_online);
	while (f < pool->frames_online && f >= avoid_lo && f < avoid_hi)
		f = uksm_find_zero_bit(pool->frame_map, avoid_hi, pool->frames_online);
	return f < pool->frames_online ? f : NONE;
}

static void hold_end(struct uksm_pool *pool, uint64_t t0,
		     struct uksm_compact_stats *out)
{
	uint64_t held;

	uksm_frames_flush(pool);
	uksm_unlock(pool);
	held = now_ns() - t0;
	if (held > out->max_hold_ns)
		out->max_hold_ns = held;
}

/*
 * uksm_compact - compaction, and offlining of @shrink_frames frames from the
 * top of the pool (0: just compact).  KSM frames moved are logged in
 * log_from/log_to (in order: a frame may move twice), so the scanner can
 * move its stable nodes along.  -ENOSPC if the live frames would not fit
 * below the new top (nothing changed then); -EBUSY if some frame above it
 * could not be moved (pinned, or raced): the shrink is undone.
 */
int uksm_compact(struct uksm_pool *pool, uint64_t shrink_frames,
		 uint32_t *log_from, uint32_t *log_to, size_t log_cap,
		 size_t *log_n, struct uksm_compact_stats *out)
{
	struct compact_scratch sc;
	size_t online_before, capacity_before, live, top;
	uint64_t t0;
	int err;

	memset(out, 0, sizeof(*out));
	memset(&sc, 0, sizeof(sc));
	*log_n = 0;

	t0 = now_ns();
	uksm_lock(pool);
	out->file_frames_before = pool->file_frames;
	online_before = pool->frames_online;
	capacity_before = pool->capacity_frames;
	if (shrink_frames) {
		if (shrink_frames >= pool->frames_online ||
		    pool->frames_online - shrink_frames < pool->st.frames_used ||
		    shrink_frames > pool->capacity_frames ||
		    pool->capacity_frames - shrink_frames < pool->st.frames_used) {
			uksm_unlock(pool);
			return -ENOSPC;
		}
		/* from now on nothing new is allocated in the range going away */
		pool->frames_online -= shrink_frames;
		pool->capacity_frames -= shrink_frames;
	}
	live = pool->st.frames_used;
	hold_end(pool, t0, out);
	err = plan_compaction(pool, &sc, live);
	if (err)
		goto undo_shrink;

	for (size_t s = 0; s < sc.nr_slots;) {
		size_t orig = sc.plan[s], from, k = 1;

		if (orig == NONE) {
			s++;
			continue;
		}
		t0 = now_ns();
		uksm_lock(pool);
		from = sc.cur[orig];
		if (from == s || pool->frames[from].key != sc.plan_key[s] ||
		    !pool->frames[from].mapcount) {
			hold_end(pool, t0, out);
			s++;
			continue;
		}
		/* extend: consecutive slots wanting consecutive frames, not overlapping */
		while (s + k < sc.nr_slots && k < UKSM_RUN_MAX &&
		       sc.plan[s + k] == orig + k && sc.cur[orig + k] == from + k &&
		       pool->frames[from + k].key == sc.plan_key[s + k] &&
		       (from > s ? s + k < from : from + k < s))
			k++;
		/* clear the slots: evacuate whoever sits there */
		for (size_t i = 0; i < k; i++) {
			size_t occ = s + i, dst;
			uint32_t who;

			if (!uksm_bit_test(pool->frame_map, occ))
				continue;
			who = sc.orig_at[occ];
			dst = evacuation_target(pool, live, s, s + k);
			if (who == NONE || dst == NONE ||
			    !move_run(pool, &sc, who, occ, dst, 1, log_from, log_to,
				      log_cap, log_n)) {
				k = i;	/* move what we can */
				break;
			}
			out->frames_moved++;
			out->runs_moved++;
		}
		/* the evacuated slots are free only once punched */
		uksm_frames_flush(pool);
		if (k && move_run(pool, &sc, orig, from, s, k, log_from, log_to,
				  log_cap, log_n)) {
			out->frames_moved += k;
			out->runs_moved++;
		} else {
			out->frames_skipped += k ? k : 1;
			k = k ? k : 1;
		}
		hold_end(pool, t0, out);
		s += k;
	}

	/* offlining: anything left above the new top must go below it */
	for (size_t f = online_before - shrink_frames; shrink_frames && f < online_before &&
	     !err; f++) {
		size_t dst;

		t0 = now_ns();
		uksm_lock(pool);
		if (pool->frames[f].mapcount) {
			dst = uksm_find_zero_bit(pool->frame_map, 0, pool->frames_online);
			if (dst >= pool->frames_online || sc.orig_at[f] == NONE ||
			    !move_run(pool, &sc, sc.orig_at[f], f, dst, 1, log_from,
				      log_to, log_cap, log_n)) {
				err = -EBUSY;
			} else {
				out->frames_moved++;
				out->runs_moved++;
			}
		}
		hold_end(pool, t0, out);
	}
	t0 = now_ns();
	uksm_lock(pool);
	if (err) {
		pool->frames_online = online_before;
		pool->capacity_frames = capacity_before;
	}
	/* truncate the memfd to what is live, in whole 64 KiB clusters */
	top = pool->frames_online;
	while (top > 0 && !uksm_bit_test(pool->frame_map, top - 1))
		top--;
	top = (top + 15) & ~(size_t)15;
	if (top > pool->frames_online)
		top = pool->frames_online;
	uksm_frames_flush(pool);
	if (top < pool->file_frames && !ftruncate(pool->fd, (off_t)(top * PG))) {
		pool->file_frames = top;
		pool->st.frames_file = top;
	}
	out->file_frames_after = pool->file_frames;
	hold_end(pool, t0, out);
	munmap(sc.mem, sc.bytes);
	return err;

undo_shrink:
	uksm_lock(pool);
	pool->frames_online = online_before;
	pool->capacity_frames = capacity_before;
	uksm_unlock(pool);
	return err;
}
