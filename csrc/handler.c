// SPDX-License-Identifier: MIT
/*
 * handler.c - every numpy array, without changing the program: a NEP 49
 * data-memory handler whose big allocations come from a pool.
 *
 * DOC: Overview
 *
 * numpy (1.22 and later) asks a handler, held in a context variable as a
 * capsule named "mem_handler", for the data of every array it makes, and
 * hands the same capsule back when the array dies.  Ours sends requests of
 * at least h->threshold bytes to uksm_alloc(): a fresh run of virtual
 * pages, page aligned, committed only as it is written, so calloc needs no
 * memset.  Smaller ones go to the handler that was in place when ours was
 * made (numpy's default, usually): a page-sized run for a ten-byte array
 * would waste more than merging could ever give back.  The previous
 * handler's capsule is held for as long as ours lives, because every array
 * made under ours, small ones included, is freed through ours.
 *
 * Who frees.  numpy frees array data from wherever the last reference
 * goes: any thread, the garbage collector, deep inside a ufunc loop with
 * the GIL released, or in a finalizer that interrupted a pool call of the
 * same thread holding the pool's policy lock.  So free() must never run
 * Python and never take a lock that Python code can hold.  It does not:
 * pool memory is known by its address (the pool's reserved range; nobody
 * else maps there) and given back with uksm_release(), under pool->lock
 * alone, which no Python code ever holds.  The Python side learns of it
 * later, as ksmd learns of an exited mm: through a queue.
 *
 * The queue.  The scanner tracks ranges, and only its policy lock may
 * change what it tracks.  Each pool has a ring of events (ALLOC, FREE,
 * TRIM, with a vpn and a page count) under pool->lock, which _Core.reap()
 * drains under the policy lock, in order.  The ring is bounded and never
 * grows (no malloc under pool->lock): a FREE must never find it full, so
 * every live buffer has a slot set aside for its FREE from the moment it
 * is admitted (queued + live + in flight never exceeds the ring), and an
 * allocation that finds no room goes to the previous handler instead of
 * waiting for a reaper that may be this very thread.
 *
 * Reuse.  Of the two ways to keep the scanner from confusing an old range
 * with a new one at the same address, we keep the address: a freed range
 * is cut off at once (its memory and frames go back to the kernel and the
 * frame store immediately) but its virtual pages stay reserved until the
 * Python side, draining the FREE, has made the scanner forget them and
 * calls uksm_va_free() itself, exactly as for a buffer the garbage
 * collector freed from under a pool section.  Ordering events alone would
 * not do: the pool's own allocations are not in the queue, and one of
 * them could take a range whose FREE is still queued, and lose its record
 * to it.  The price is address space held for a reaper's interval; the
 * short-lived array, the common case, does not pay it: when its ALLOC is
 * still in the ring (the Python side never heard of it), the free turns
 * that ALLOC into a hole and the range is ours to reuse at once.
 *
 * The quicklist.  Such a range is not even given back: it goes, mapped and
 * committed as it is, on a short list (64 ranges, 16 MiB at most) that the
 * next request of the same size takes, as the page allocator's per-cpu
 * lists keep hot pages for the next fault.  A loop of temporaries would
 * otherwise pay an mmap, a release and a page fault per page for every
 * array, several times what numpy's own allocator costs; with the list it
 * costs what malloc does.  calloc clears a reused range itself.  The list
 * goes back to the kernel when the pool closes.
 *
 * Realloc.  Within the pool a shrink releases the tail in place; a grow
 * takes a new range and moves the old pages into its head: mremap() when
 * every old page is plain private memory (the kernel moves the page table
 * entries, no byte is copied), memcpy() otherwise (merged, zero or swapped
 * pages are read like any others).  Across the threshold the bytes are
 * copied between pool and previous handler; growing a small buffer into
 * the pool lets the previous handler realloc it first, since only it
 * knows how many bytes it holds.
 *
 * Lifetime.  Each array holds the capsule it was made under, so the
 * capsule outlives its last array; the capsule holds the Python pool (its
 * "owner"), so the pool does too, and the native pool is destroyed only
 * once no capsule, live buffer or queued event remains (Pool._reap).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL uksm_handler_ARRAY_API
#include <numpy/arrayobject.h>

#include <string.h>
#include "uksm_internal.h"

#ifndef MREMAP_FIXED
#define MREMAP_FIXED 2
#endif

/* How far back a free looks for its own ALLOC still in the ring. */
#define UKSM_EV_CANCEL_WINDOW	256
/* The quicklist: ranges of buffers that died unseen, kept for reuse. */
#define UKSM_QUICK_NR		64
#define UKSM_QUICK_PAGES	4096	/* 16 MiB at most, in all */
#define UKSM_QUICK_MAX		512	/* pages: bigger ones go back at once */

struct uksm_event {
	uint64_t vpn;
	uint32_t npages;
	uint8_t type;		/* UKSM_EV_* */
	uint8_t released;	/* FREE: the pages were cut off already */
	uint16_t pad;
};

struct uksm_events {
	size_t cap;		/* ring entries */
	uint64_t head, tail;	/* monotonic: next to drain, next to fill */
	uint64_t live;		/* handler buffers not yet freed */
	uint64_t inflight;	/* admitted, ALLOC not yet queued */
	uint64_t handlers;	/* capsules on this pool */
	int closed;		/* the pool takes no new handler buffers */
	uint32_t *len;		/* per vpn: a handler buffer's pages, at its first vpn */
	size_t len_bytes;
	size_t bytes;		/* of this mapping, ring included */
	uint64_t st[UKSM_HST_NR];
	size_t nquick, quick_pages;
	uint64_t quick_vpn[UKSM_QUICK_NR];
	uint32_t quick_n[UKSM_QUICK_NR];
	struct uksm_event ring[];
};

struct uksm_handler {
	PyDataMem_Handler mem;		/* what numpy's capsule points to */
	struct uksm_pool *pool;
	_Atomic size_t threshold;
	PyObject *prev;			/* the previous handler's capsule */
	PyDataMem_Handler *prev_mem;
	PyObject *owner;		/* called, then dropped, when the capsule goes */
};

/* -- the queue, under pool->lock --------------------------------------------- */

int uksm_events_enable(struct uksm_pool *pool, size_t cap)
{
	struct uksm_events *ev;
	size_t bytes = sizeof(*ev) + cap * sizeof(struct uksm_event);
	size_t len_bytes = pool->va_pages * sizeof(uint32_t);
	uint32_t *len;

	if (pool->events)
		return 0;
	if (cap < 16)
		return -EINVAL;
	ev = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (ev == MAP_FAILED)
		return -errno;
	/* one word per vpn, written only at buffers' first pages: untouched, free */
	len = mmap(NULL, len_bytes, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (len == MAP_FAILED) {
		int err = -errno;

		munmap(ev, bytes);
		return err;
	}
	ev->cap = cap;
	ev->len = len;
	ev->len_bytes = len_bytes;
	ev->bytes = bytes;
	uksm_lock(pool);
	if (pool->events) {
		uksm_unlock(pool);
		munmap(len, len_bytes);
		munmap(ev, bytes);
		return 0;
	}
	pool->events = ev;
	uksm_unlock(pool);
	return 0;
}

void uksm_events_destroy(struct uksm_pool *pool)
{
	struct uksm_events *ev = pool->events;

	if (!ev)
		return;
	pool->events = NULL;
	munmap(ev->len, ev->len_bytes);
	munmap(ev, ev->bytes);
}

static void ev_push(struct uksm_events *ev, int type, size_t vpn, size_t npages, int released)
{
	struct uksm_event *e = &ev->ring[ev->tail % ev->cap];

	e->vpn = vpn;
	e->npages = (uint32_t)npages;
	e->type = (uint8_t)type;
	e->released = (uint8_t)released;
	ev->tail++;
}

/*
 * The ALLOC of the buffer at @vpn, if it is still queued among the last
 * few events: the Python side has not heard of the buffer yet.
 */
static struct uksm_event *ev_find_alloc(struct uksm_events *ev, size_t vpn)
{
	uint64_t i = ev->tail;
	uint64_t stop = ev->tail - ev->head > UKSM_EV_CANCEL_WINDOW ?
			ev->tail - UKSM_EV_CANCEL_WINDOW : ev->head;

	while (i > stop) {
		struct uksm_event *e = &ev->ring[--i % ev->cap];

		if (e->vpn == vpn && e->type == UKSM_EV_ALLOC)
			return e;
		/* an older event at this vpn belongs to an older buffer */
		if (e->vpn == vpn)
			return NULL;
	}
	return NULL;
}

int uksm_events_drain(struct uksm_pool *pool, uint64_t *vpn, uint32_t *npages,
		      uint8_t *type, uint8_t *released, size_t max)
{
	struct uksm_events *ev;
	size_t n = 0;

	uksm_lock(pool);
	ev = pool->events;
	while (ev && n < max && ev->head != ev->tail) {
		struct uksm_event *e = &ev->ring[ev->head++ % ev->cap];

		if (e->type == UKSM_EV_HOLE)
			continue;
		vpn[n] = e->vpn;
		npages[n] = e->npages;
		type[n] = e->type;
		released[n] = e->released;
		n++;
	}
	uksm_unlock(pool);
	return (int)n;
}

void uksm_events_stats(struct uksm_pool *pool, uint64_t *out)
{
	struct uksm_events *ev;

	memset(out, 0, UKSM_HST_NR * sizeof(*out));
	uksm_lock(pool);
	ev = pool->events;
	if (ev) {
		memcpy(out, ev->st, sizeof(ev->st));
		out[UKSM_HST_LIVE] = ev->live;
		out[UKSM_HST_QUEUED] = ev->tail - ev->head;
		out[UKSM_HST_HANDLERS] = ev->handlers;
		out[UKSM_HST_CAP] = ev->cap;
		out[UKSM_HST_QUICK_PAGES] = ev->quick_pages;
	}
	uksm_unlock(pool);
}

/* Give the quicklist's ranges back (the pool closes, or memory is wanted). */
void uksm_events_flush(struct uksm_pool *pool)
{
	struct uksm_events *ev = pool->events;

	if (!ev)
		return;
	for (;;) {
		size_t vpn, n;

		uksm_lock(pool);
		if (!ev->nquick) {
			uksm_unlock(pool);
			return;
		}
		ev->nquick--;
		vpn = ev->quick_vpn[ev->nquick];
		n = ev->quick_n[ev->nquick];
		ev->quick_pages -= n;
		uksm_unlock(pool);
		if (!uksm_release(pool, vpn, n))
			uksm_va_free(pool, vpn, n);
	}
}

void uksm_events_close(struct uksm_pool *pool)
{
	uksm_lock(pool);
	if (pool->events)
		pool->events->closed = 1;
	uksm_unlock(pool);
	uksm_events_flush(pool);
}

/* Nothing of the handler's left: no capsule, no live buffer, no event. */
int uksm_events_idle(struct uksm_pool *pool)
{
	struct uksm_events *ev;
	int idle;

	uksm_lock(pool);
	ev = pool->events;
	idle = !ev || (!ev->handlers && !ev->live && !ev->inflight && ev->head == ev->tail);
	uksm_unlock(pool);
	return idle;
}

/* -- pool memory -------------------------------------------------------------- */

static int in_pool(struct uksm_pool *pool, const void *p)
{
	const char *c = p;

	return c >= pool->va && c < pool->va + pool->va_pages * PG;
}

static size_t vpn_of(struct uksm_pool *pool, const void *p)
{
	return (size_t)((const char *)p - pool->va) / PG;
}

static void *pool_alloc(struct uksm_handler *h, size_t size, int zero)
{
	struct uksm_pool *pool = h->pool;
	struct uksm_events *ev;
	size_t npages = size ? (size + PG - 1) / PG : 1;
	size_t vpn;
	int stage;

	if (npages > UINT32_MAX)
		return NULL;
	uksm_lock(pool);
	ev = pool->events;
	/* room for this ALLOC and, later, its FREE, besides everyone else's */
	if (!ev || ev->closed ||
	    (ev->tail - ev->head) + ev->live + ev->inflight + 2 > ev->cap) {
		if (ev)
			ev->st[UKSM_HST_FALLBACKS]++;
		uksm_unlock(pool);
		return NULL;
	}
	/*
	 * The pcp list of this allocator: a range whose buffer died before
	 * the scanner heard of it is still mapped, private and committed;
	 * giving it to the next request of the same size skips the mmap and
	 * the page faults that make short-lived arrays dear.
	 */
	for (size_t i = 0; i < ev->nquick; i++) {
		if (ev->quick_n[i] != npages)
			continue;
		vpn = ev->quick_vpn[i];
		ev->nquick--;
		ev->quick_vpn[i] = ev->quick_vpn[ev->nquick];
		ev->quick_n[i] = ev->quick_n[ev->nquick];
		ev->quick_pages -= npages;
		ev->live++;
		ev->len[vpn] = (uint32_t)npages;
		ev_push(ev, UKSM_EV_ALLOC, vpn, npages, 0);
		ev->st[UKSM_HST_ALLOCS]++;
		ev->st[UKSM_HST_QUICK]++;
		uksm_unlock(pool);
		if (zero)
			memset(page_addr(pool, vpn), 0, size);
		return page_addr(pool, vpn);
	}
	ev->inflight++;
	uksm_unlock(pool);

	if (uksm_alloc(pool, npages, &vpn, &stage)) {
		uksm_lock(pool);
		ev->inflight--;
		ev->st[UKSM_HST_FALLBACKS]++;
		uksm_unlock(pool);
		return NULL;
	}
	uksm_lock(pool);
	ev->inflight--;
	ev->live++;
	ev->len[vpn] = (uint32_t)npages;
	ev_push(ev, UKSM_EV_ALLOC, vpn, npages, 0);
	ev->st[UKSM_HST_ALLOCS]++;
	uksm_unlock(pool);
	return page_addr(pool, vpn);
}

static void pool_free(struct uksm_handler *h, void *p)
{
	struct uksm_pool *pool = h->pool;
	struct uksm_events *ev = pool->events;
	size_t vpn = vpn_of(pool, p);
	struct uksm_event *e;
	size_t n;
	int err;

	if (page_addr(pool, vpn) != p)
		return;		/* not a buffer's start: nothing we may touch */
	uksm_lock(pool);
	n = ev->len[vpn];
	ev->len[vpn] = 0;
	uksm_unlock(pool);
	if (!n)
		return;		/* not a live buffer of ours */

	uksm_lock(pool);
	if (n <= UKSM_QUICK_MAX && !ev->closed && ev->nquick < UKSM_QUICK_NR &&
	    ev->quick_pages + n <= UKSM_QUICK_PAGES && (e = ev_find_alloc(ev, vpn))) {
		e->type = UKSM_EV_HOLE;
		ev->live--;
		ev->st[UKSM_HST_FREES]++;
		ev->st[UKSM_HST_CANCELLED]++;
		ev->quick_vpn[ev->nquick] = vpn;
		ev->quick_n[ev->nquick++] = (uint32_t)n;
		ev->quick_pages += n;
		uksm_unlock(pool);
		return;
	}
	uksm_unlock(pool);

	/* cut off now: the memory goes back whatever the scanner knows */
	err = uksm_release(pool, vpn, n);

	uksm_lock(pool);
	ev->live--;
	ev->st[UKSM_HST_FREES]++;
	e = err ? NULL : ev_find_alloc(ev, vpn);
	if (e) {
		/* never reached the Python side: nobody to tell */
		e->type = UKSM_EV_HOLE;
		ev->st[UKSM_HST_CANCELLED]++;
		uksm_unlock(pool);
		uksm_va_free(pool, vpn, n);
		return;
	}
	/* its slot was set aside when it was admitted */
	ev_push(ev, UKSM_EV_FREE, vpn, n, !err);
	uksm_unlock(pool);
}

/*
 * Shrink in place: the tail's pages go back now, its range once the
 * Python side has forgotten it (or at once, if it never knew the buffer).
 * Without room in the ring for a TRIM the buffer simply keeps its tail.
 */
static void pool_trim(struct uksm_handler *h, size_t vpn, size_t n, size_t new_n)
{
	struct uksm_pool *pool = h->pool;
	struct uksm_events *ev = pool->events;
	struct uksm_event *e;
	int err;

	if (new_n >= n)
		return;
	uksm_lock(pool);
	e = ev_find_alloc(ev, vpn);
	if (e) {
		e->npages = (uint32_t)new_n;
		ev->len[vpn] = (uint32_t)new_n;
		uksm_unlock(pool);
		if (!uksm_release(pool, vpn + new_n, n - new_n))
			uksm_va_free(pool, vpn + new_n, n - new_n);
		return;
	}
	if ((ev->tail - ev->head) + ev->live + ev->inflight + 1 > ev->cap) {
		uksm_unlock(pool);
		return;
	}
	ev->inflight++;		/* the TRIM's slot */
	uksm_unlock(pool);
	/*
	 * Cut off before the TRIM is queued: once queued, the Python side may
	 * give the tail's range to another buffer at any moment.  A failed
	 * release (vm.max_map_count) is retried there, before that.
	 */
	err = uksm_release(pool, vpn + new_n, n - new_n);
	uksm_lock(pool);
	ev->inflight--;
	ev->len[vpn] = (uint32_t)new_n;
	ev_push(ev, UKSM_EV_TRIM, vpn, new_n, !err);
	uksm_unlock(pool);
}

/*
 * Move @n pages from @old to the head of @new (a fresh run of at least
 * @n + 1 private pages).  Plain private pages are moved by the kernel,
 * page table entries and all; then the old range is left PROT_NONE and
 * without frames, as uksm_release() leaves it.  Anything else is copied.
 */
static int pool_move(struct uksm_pool *pool, size_t old, size_t n, size_t new)
{
	int movable = 1;

	uksm_lock(pool);
	for (size_t i = 0; i < n; i++) {
		const struct uksm_pte *pte = &pool->ptes[old + i];

		if (pte->state != UKSM_PTE_PRIVATE || pte->flags ||
		    pool->ptes[new + i].state != UKSM_PTE_PRIVATE) {
			movable = 0;
			break;
		}
	}
	if (movable && pool->cow_mode == UKSM_COW_KERNEL &&
	    mremap(page_addr(pool, old), n * PG, n * PG, MREMAP_MAYMOVE | MREMAP_FIXED,
		   page_addr(pool, new)) != MAP_FAILED) {
		/*
		 * The old range is a hole now, and its ptes still say PRIVATE
		 * (uksm_release() counts them out in a moment): fill it with
		 * fresh zero pages before dropping the lock, so that a scanner
		 * still tracking it reads zeroes, not a fault under pool->lock.
		 */
		if (uksm_map_anon(pool, old, n, PROT_READ | PROT_WRITE))
			(void)mmap(page_addr(pool, old), n * PG, PROT_READ | PROT_WRITE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
		uksm_unlock(pool);
		return 1;
	}
	uksm_unlock(pool);
	memcpy(page_addr(pool, new), page_addr(pool, old), n * PG);
	return 0;
}

/* -- the allocator numpy calls ----------------------------------------------- */

static void *h_malloc(void *ctx, size_t size)
{
	struct uksm_handler *h = ctx;
	void *p;

	if (size >= atomic_load_explicit(&h->threshold, memory_order_relaxed)) {
		p = pool_alloc(h, size, 0);
		if (p)
			return p;
	}
	return h->prev_mem->allocator.malloc(h->prev_mem->allocator.ctx, size);
}

static void *h_calloc(void *ctx, size_t nelem, size_t elsize)
{
	struct uksm_handler *h = ctx;
	void *p;

	if (elsize && nelem > SIZE_MAX / elsize)
		return NULL;
	if (nelem * elsize >= atomic_load_explicit(&h->threshold, memory_order_relaxed)) {
		/* fresh anonymous pages read as zero: nothing to clear */
		p = pool_alloc(h, nelem * elsize, 1);
		if (p)
			return p;
	}
	return h->prev_mem->allocator.calloc(h->prev_mem->allocator.ctx, nelem, elsize);
}

static void h_free(void *ctx, void *p, size_t size)
{
	struct uksm_handler *h = ctx;

	if (!p)
		return;
	if (in_pool(h->pool, p)) {
		pool_free(h, p);
		return;
	}
	h->prev_mem->allocator.free(h->prev_mem->allocator.ctx, p, size);
}

static void *h_realloc(void *ctx, void *p, size_t size)
{
	struct uksm_handler *h = ctx;
	struct uksm_pool *pool = h->pool;
	PyDataMem_Handler *prev = h->prev_mem;
	size_t threshold = atomic_load_explicit(&h->threshold, memory_order_relaxed);
	void *q, *r;

	if (!p)
		return h_malloc(ctx, size);
	if (in_pool(pool, p)) {
		size_t vpn = vpn_of(pool, p);
		size_t n, new_n = size ? (size + PG - 1) / PG : 1;

		uksm_lock(pool);
		n = pool->events->len[vpn];
		uksm_unlock(pool);
		if (!n)
			return NULL;	/* not ours: refuse rather than corrupt */
		if (size >= threshold) {
			if (new_n <= n) {
				pool_trim(h, vpn, n, new_n);
				return p;
			}
			q = pool_alloc(h, size, 0);
			if (q) {
				uksm_lock(pool);
				pool->events->st[UKSM_HST_REALLOCS]++;
				uksm_unlock(pool);
				if (pool_move(pool, vpn, n, vpn_of(pool, q))) {
					uksm_lock(pool);
					pool->events->st[UKSM_HST_MOVED]++;
					uksm_unlock(pool);
				}
				pool_free(h, p);
				return q;
			}
		}
		q = prev->allocator.malloc(prev->allocator.ctx, size);
		if (!q)
			return NULL;
		memcpy(q, p, size < n * PG ? size : n * PG);
		pool_free(h, p);
		return q;
	}
	if (size < threshold)
		return prev->allocator.realloc(prev->allocator.ctx, p, size);
	q = pool_alloc(h, size, 0);
	if (!q)
		return prev->allocator.realloc(prev->allocator.ctx, p, size);
	/* only the previous handler knows how many bytes @p holds */
	r = prev->allocator.realloc(prev->allocator.ctx, p, size);
	if (!r) {
		pool_free(h, q);
		return NULL;
	}
	memcpy(q, r, size);
	prev->allocator.free(prev->allocator.ctx, r, size);
	return q;
}

/* -- the Python side (called through ctypes.PyDLL: the GIL is held) ---------- */

static int numpy_imported;

static int import_numpy(void)
{
	if (numpy_imported)
		return 0;
	if (_import_array() < 0)
		return -1;
	numpy_imported = 1;
	return 0;
}

static void capsule_destructor(PyObject *capsule)
{
	PyDataMem_Handler *mem = PyCapsule_GetPointer(capsule, "mem_handler");
	struct uksm_handler *h = (struct uksm_handler *)mem;
	PyObject *type, *value, *tb, *res;

	if (!h)
		return;
	uksm_lock(h->pool);
	h->pool->events->handlers--;
	uksm_unlock(h->pool);
	PyErr_Fetch(&type, &value, &tb);
	res = PyObject_CallNoArgs(h->owner);
	if (!res)
		PyErr_WriteUnraisable(h->owner);
	Py_XDECREF(res);
	PyErr_Restore(type, value, tb);
	Py_DECREF(h->owner);
	Py_DECREF(h->prev);
	free(h);
}

/*
 * A new handler on @pool: big allocations from the pool, the rest to the
 * handler current now.  @owner is called once the capsule is gone.
 */
PyObject *uksm_handler_new(void *pool_p, size_t threshold, PyObject *owner)
{
	struct uksm_pool *pool = pool_p;
	struct uksm_handler *h;
	PyObject *capsule;

	if (import_numpy() < 0)
		return NULL;
	if (!pool->events) {
		PyErr_SetString(PyExc_RuntimeError, "uksm: the pool's event queue is not enabled");
		return NULL;
	}
	h = calloc(1, sizeof(*h));
	if (!h)
		return PyErr_NoMemory();
	h->prev = PyDataMem_GetHandler();
	if (!h->prev) {
		free(h);
		return NULL;
	}
	h->prev_mem = PyCapsule_GetPointer(h->prev, "mem_handler");
	if (!h->prev_mem) {
		Py_DECREF(h->prev);
		free(h);
		return NULL;
	}
	snprintf(h->mem.name, sizeof(h->mem.name), "uksm");
	h->mem.version = 1;
	h->mem.allocator.ctx = h;
	h->mem.allocator.malloc = h_malloc;
	h->mem.allocator.calloc = h_calloc;
	h->mem.allocator.realloc = h_realloc;
	h->mem.allocator.free = h_free;
	h->pool = pool;
	atomic_store(&h->threshold, threshold);
	h->owner = owner;
	Py_INCREF(owner);
	capsule = PyCapsule_New(&h->mem, "mem_handler", capsule_destructor);
	if (!capsule) {
		Py_DECREF(owner);
		Py_DECREF(h->prev);
		free(h);
		return NULL;
	}
	uksm_lock(pool);
	pool->events->handlers++;
	uksm_unlock(pool);
	return capsule;
}

/* Make @capsule the current context's handler; the previous one back. */
PyObject *uksm_handler_set(PyObject *capsule)
{
	if (import_numpy() < 0)
		return NULL;
	return PyDataMem_SetHandler(capsule);
}

PyObject *uksm_handler_get(void)
{
	if (import_numpy() < 0)
		return NULL;
	return PyDataMem_GetHandler();
}

/* Is @capsule one of ours, and on which pool: its pool, or NULL. */
void *uksm_handler_pool(PyObject *capsule)
{
	PyDataMem_Handler *mem;

	if (!PyCapsule_IsValid(capsule, "mem_handler"))
		return NULL;
	mem = PyCapsule_GetPointer(capsule, "mem_handler");
	if (!mem || mem->allocator.malloc != h_malloc)
		return NULL;
	return ((struct uksm_handler *)mem)->pool;
}

size_t uksm_handler_threshold(PyObject *capsule, size_t threshold)
{
	struct uksm_handler *h = PyCapsule_GetPointer(capsule, "mem_handler");

	if (!h) {
		PyErr_Clear();
		return 0;
	}
	if (threshold)
		atomic_store(&h->threshold, threshold);
	return atomic_load(&h->threshold);
}
