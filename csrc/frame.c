// SPDX-License-Identifier: MIT
/*
 * frame.c - the frame store: the memfd that holds every KSM frame, its
 * allocator (a bitmap, a hint, a run of freed frames waiting to be
 * punched), the direct map the core copies through, and the primitives
 * that make a virtual page a view of a file or fresh anonymous memory.
 * pagemap, through which the core learns what the kernel did to a page,
 * is read here too.
 *
 * This is the bottom of the core: every other file calls in (the NEP 49
 * handler too, for uksm_map_anon); nothing here calls out, so a frame's
 * life can be read in this one file.  The fork epochs that decide whether
 * a freed frame may go back at once are pool.c's (uksm_must_defer()).
 */
#include "uksm_internal.h"

#include <sys/ioctl.h>
#include <stdio.h>
#include <sys/mman.h>

/* The memfd grows by at least this much, so ftruncate is rare. */
#define GROW_FRAMES	512

int uksm_bit_test(const uint64_t *map, size_t i)
{
	return (map[i >> 6] >> (i & 63)) & 1;
}

void uksm_bit_set(uint64_t *map, size_t i)
{
	map[i >> 6] |= 1ULL << (i & 63);
}

void uksm_bit_clear(uint64_t *map, size_t i)
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

/*
 * /proc/self/pagemap, opened once per process: a descriptor opened by the
 * parent would go on reading the parent's page tables in a forked child,
 * so the child's fork hook closes it and the next read reopens.
 */
static _Atomic int pagemap_fd = -1;

/* A forked child's pagemap is not its parent's: the next read reopens. */
void uksm_pagemap_forget(void)
{
	int pm = atomic_exchange(&pagemap_fd, -1);

	if (pm >= 0)
		close(pm);
}

/*
 * PAGEMAP_SCAN (Linux 6.7), for the one thing pagemap's entries cannot
 * say: that a present anonymous page is the kernel's zero page (a page
 * only ever read).  Such a page costs nothing, and is reported as not
 * present.  Declared here since older libc headers lack it; on an older
 * kernel the ioctl fails and the entries stand as read.
 */
struct uksm_page_region {
	uint64_t start, end, categories;
};

struct uksm_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

#define UKSM_PAGEMAP_SCAN	_IOWR('f', 16, struct uksm_pm_scan_arg)
#define UKSM_PAGE_IS_PFNZERO	(1 << 5)

static void clear_zero_pfn(int fd, size_t va, size_t n, uint64_t *out)
{
	struct uksm_page_region regs[32];
	uint64_t start = va, end = va + n * PG;

	while (start < end) {
		struct uksm_pm_scan_arg arg = {
			.size = sizeof(arg), .start = start, .end = end,
			.vec = (uintptr_t)regs, .vec_len = 32,
			.category_mask = UKSM_PAGE_IS_PFNZERO,
			.return_mask = UKSM_PAGE_IS_PFNZERO,
		};
		long r = ioctl(fd, UKSM_PAGEMAP_SCAN, &arg);

		if (r < 0)
			return;
		for (long i = 0; i < r; i++)
			for (uint64_t a = regs[i].start; a < regs[i].end; a += PG)
				out[(a - va) / PG] &= ~PM_PRESENT;
		if (r < 32 || arg.walk_end <= start)
			return;
		start = arg.walk_end;
	}
}

int uksm_pagemap_read(size_t va, size_t n, uint64_t *out)
{
	int shared_anon = 0;

	int fd = atomic_load(&pagemap_fd);
	size_t got = 0;

	if (fd < 0) {
		int nfd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
		int none = -1;

		if (nfd < 0)
			return -errno;
		if (!atomic_compare_exchange_strong(&pagemap_fd, &none, nfd))
			close(nfd);
		fd = atomic_load(&pagemap_fd);
	}
	while (got < n) {
		ssize_t r = pread(fd, out + got, (n - got) * 8,
				  (off_t)((va / PG + got) * 8));

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? -errno : -EIO;
		got += (size_t)r / 8;
	}
	for (size_t i = 0; i < n && !shared_anon; i++)
		shared_anon = (out[i] & PM_PRESENT) && !(out[i] & (PM_FILE | PM_EXCLUSIVE));
	if (!shared_anon)
		return 0;
	/*
	 * An anonymous page mapped more than once is the zero page (4 KiB or
	 * huge) - or, once this process has forked, a page it shares with a
	 * relative.  Before any fork there is no doubt; after one, PAGEMAP_SCAN
	 * tells the 4 KiB zero page (this kernel does not flag the huge one).
	 */
	if (!atomic_load(&uksm_ever_forked)) {
		for (size_t i = 0; i < n; i++)
			if ((out[i] & PM_PRESENT) && !(out[i] & (PM_FILE | PM_EXCLUSIVE)))
				out[i] &= ~PM_PRESENT;
		return 0;
	}
	clear_zero_pfn(fd, va, n, out);
	return 0;
}

static int grow_file(struct uksm_pool *pool, size_t end)
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

/* Zap the direct map's entries for the frames touched under this hold. */
/*
 * The window is widened to the kernel's fault-around (64 KiB): a read
 * through the direct map maps the cached neighbours of the page read too.
 */
#define FAULT_AROUND	16

void uksm_direct_zap(struct uksm_pool *pool)
{
	/* the window is aligned in virtual addresses, not in frames */
	size_t lo = pool->direct_lo > FAULT_AROUND ? pool->direct_lo - FAULT_AROUND : 0;
	size_t hi = pool->direct_hi + FAULT_AROUND;

	if (hi > pool->nr_frames)
		hi = pool->nr_frames;
	madvise(pool->direct + lo * PG, (hi - lo) * PG, MADV_DONTNEED);
	pool->direct_lo = pool->direct_hi = 0;
}

/*
 * uksm_frame_alloc_run - take up to @want free frames below @limit, as one
 * run starting at the lowest free pfn.  Returns how many were taken (0 when
 * none is free), *pfn_out the first.  The frames are allocated in the
 * memfd at once, so that a full tmpfs fails here rather than with SIGBUS
 * later: filled from @fill with one pwrite when given (the pages are
 * allocated and written in one call: no zeroing, no direct map), else
 * with one fallocate for the run (the caller copies in through the direct
 * map, with no shmem fault per page).  They carry a fresh key.  Caller
 * holds pool->lock and sets the mapcounts.
 */
size_t uksm_frame_alloc_run(struct uksm_pool *pool, size_t want, size_t limit,
			    size_t *pfn_out, const void *fill)
{
	size_t pfn, n;

	if (limit > pool->frames_online)
		limit = pool->frames_online;
	pfn = uksm_find_zero_bit(pool->frame_map, pool->frame_hint, limit);
	if (pfn >= limit)
		return 0;
	pool->frame_hint = pfn;
	n = uksm_frame_alloc_at(pool, pfn, want, limit, fill);
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
			   size_t limit, const void *fill)
{
	size_t n = 0;

	/*
	 * An heir's store is its parent's, never written: the entry points
	 * that allocate (pool.c's uksm_merge, uksm_compact) detach first.
	 */
	if (pool->heir)
		return 0;
	if (limit > pool->frames_online)
		limit = pool->frames_online;
	while (n < want && pfn + n < limit && !uksm_bit_test(pool->frame_map, pfn + n))
		n++;
	if (!n || grow_file(pool, pfn + n))
		return 0;
	if (fill) {
		ssize_t w = uksm_injected(UKSM_OP_FALLOCATE) ? -1 :
			    pwrite(pool->fd, fill, n * PG, (off_t)(pfn * PG));

		if (w < 0)
			return 0;
		n = (size_t)w / PG;	/* a short write: the tmpfs is full */
		if (!n)
			return 0;
	} else if (uksm_fallocate(pool->fd, 0, (off_t)(pfn * PG), (off_t)(n * PG))) {
		return 0;
	}
	for (size_t i = 0; i < n; i++) {
		struct uksm_frame *f = &pool->frames[pfn + i];

		uksm_bit_set(pool->frame_map, pfn + i);
		f->key = ++pool->next_key;
		f->flags = 0;
		f->mapcount = 0;
		f->group = 0;
		f->gen = 0;
	}
	pool->st.frames_used += n;
	return n;
}

/* Punch the pending run of freed frames and only then mark them free. */
void uksm_frames_flush(struct uksm_pool *pool)
{
	size_t start = pool->punch_start, len = pool->punch_len;

	if (!len)
		return;
	/* punching gives the memory back; a failed punch only keeps it */
	(void)uksm_fallocate(pool->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			     (off_t)(start * PG), (off_t)(len * PG));
	for (size_t i = 0; i < len; i++)
		uksm_bit_clear(pool->frame_map, start + i);
	if (start < pool->frame_hint)
		pool->frame_hint = start;
	pool->punch_len = 0;
}

static void frame_release(struct uksm_pool *pool, size_t pfn)
{
	pool->st.frames_used--;
	if (pool->punch_len && pool->punch_start + pool->punch_len == pfn) {
		pool->punch_len++;
		return;
	}
	uksm_frames_flush(pool);
	pool->punch_start = pfn;
	pool->punch_len = 1;
}

/*
 * uksm_frame_put - one view of @pfn is gone.  The last one frees the frame:
 * its key changes (so stable nodes see through the keyhole that it is
 * gone), and it is punched by uksm_frames_flush(), which the caller calls
 * before dropping pool->lock - unless a forked child may still map it:
 * then it waits, DEFERRED, for the child (uksm_fork_poll).  An heir never
 * punches: the store is its parent's.
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
	f->group = 0;
	if (uksm_must_defer(pool)) {
		f->flags = UKSM_FRAME_DEFERRED;
		f->gen = pool->heir ? UINT32_MAX : atomic_load(&uksm_fork_gen);
		pool->st.frames_deferred++;
		return;
	}
	frame_release(pool, pfn);
}

/* Deferred frames whose children are all gone go back now. */
void uksm_frames_release_deferred(struct uksm_pool *pool)
{
	if (!pool->st.frames_deferred || pool->heir)
		return;
	for (size_t pfn = 0; pfn < pool->file_frames && pool->st.frames_deferred; pfn++) {
		struct uksm_frame *f = &pool->frames[pfn];

		if (!(f->flags & UKSM_FRAME_DEFERRED) || !uksm_gen_released(f->gen))
			continue;
		f->flags = 0;
		pool->st.frames_deferred--;
		frame_release(pool, pfn);
	}
	uksm_frames_flush(pool);
}

/*
 * Map @n pages from @vpn as a MAP_PRIVATE view of @fd from page @off: one
 * mmap call, one VMA for a run of consecutive offsets.
 */
int uksm_map_view(struct uksm_pool *pool, size_t vpn, size_t n, int fd,
		  size_t off, int prot)
{
	/*
	 * Mapped with its final protection in one call: a read-only view
	 * mapped writable first would let a writer copy it unseen between the
	 * two calls (signal mode counts every copy as it happens).  The price:
	 * under vm.overcommit_memory=2 or RLIMIT_DATA, the write that makes a
	 * read-only view writable is charged then, and may be refused.
	 */
	void *p = uksm_mmap(page_addr(pool, vpn), n * PG, prot,
			    MAP_PRIVATE | MAP_FIXED, fd, (off_t)(off * PG));

	return p == MAP_FAILED ? -errno : 0;
}

/*
 * Fresh anonymous memory over @n pages from @vpn: what they held is gone
 * (a COWed copy too: MADV_DONTNEED on a view would re-expose the file's
 * page instead).  Read-write pages are charged to the commit limit like
 * numpy's own; PROT_NONE ones are not.
 */
int uksm_map_anon(struct uksm_pool *pool, size_t vpn, size_t n, int prot)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
	void *p;

	if (prot == PROT_NONE)
		flags |= MAP_NORESERVE;
	p = uksm_mmap(page_addr(pool, vpn), n * PG, prot, flags, -1, 0);
	return p == MAP_FAILED ? -errno : 0;
}

/* A read-only descriptor of @fd, for views: no view can write the file. */
int uksm_reopen_ro(int fd)
{
	char path[40];
	int ro;

	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ro = open(path, O_RDONLY | O_CLOEXEC);
	/* no /proc: views of the read-write descriptor are private all the same */
	return ro >= 0 ? ro : fcntl(fd, F_DUPFD_CLOEXEC, 0);
}
