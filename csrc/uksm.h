/* SPDX-License-Identifier: MIT */
/*
 * uksm.h - the page machinery of a userspace KSM.
 *
 * DOC: Overview
 *
 * A pool reserves one contiguous range of virtual address space; a virtual
 * page number in it is a "vpn".  Buffers are runs of vpns.  Every page of a
 * buffer is in one of three states, and in each of them it is memory the
 * kernel manages exactly as it manages the rest of the process's memory:
 *
 *   PRIVATE	anonymous memory, MAP_PRIVATE|MAP_ANONYMOUS, read-write.
 *		Demand-zero and committed on first write, like numpy's own
 *		arrays; transparent huge pages where the buffer is big enough
 *		(MADV_HUGEPAGE, as numpy asks); copied on write at fork by the
 *		kernel.  This is where every page starts, and where a merged or
 *		swapped page returns when it is written.
 *
 *   KSM	a MAP_PRIVATE view of a stable frame.  Stable frames live in
 *		the frame store, an anonymous memfd cut into 4 KiB frames; a
 *		frame number is a "pfn".  Views are mapped from a read-only
 *		descriptor of the memfd (/proc/self/fd/N opened O_RDONLY), so
 *		no access through any view, not even a debugger's through
 *		/proc/self/mem, can write a shared frame: a write to a view is
 *		copied on write by the kernel's own fault path into a private
 *		anonymous page, and the frame is untouched.  Reads map the frame
 *		itself (shared, as PSS counts it).  Two pages merged = two views
 *		of one frame.
 *
 *   SWAPPED	a MAP_PRIVATE view of the page's slot in the pool's swap file
 *		(swap.c).  An access, by the program or by the kernel
 *		(read(2), write(2), np.save), reads the slot back through the
 *		page cache, with the kernel's readahead; a write copies it, as
 *		for a KSM view.
 *
 * Besides these, ZERO is a private page the scanner found all zeroes and
 * gave back (a fresh anonymous mapping over it: it reads as the kernel's
 * zero page and costs nothing until written), and NONE is no buffer at all
 * (PROT_NONE: a touch is a use-after-free, and crashes as it should).
 *
 * Copy-on-write: two modes, chosen per pool.
 *
 *   UKSM_COW_KERNEL (the default): views are mapped read-write and the
 *   kernel does every COW, in its fault path, for user and kernel accesses
 *   alike; no signal is taken.  The scanner learns of COWs lazily, as ksmd
 *   does, from /proc/self/pagemap: a view's page not yet written has the
 *   "file page" bit 61 set; once the kernel has copied it, bit 61 is clear
 *   (and bit 56, exclusively mapped, set), and it never goes back.
 *   uksm_reconcile() turns such pages back into PRIVATE and drops their
 *   frame (or slot) reference.  A frame is never freed while a page may
 *   still map it: until pagemap has said so, a view counts as a mapper.
 *
 *   UKSM_COW_SIGNAL: views are mapped read-only; a write raises SIGSEGV
 *   and the handler (fault.c) makes the page writable and forces the
 *   kernel's COW itself, under pool->lock, so the counters are exact at
 *   once.  Kernel writes into such a view fail with EFAULT, as with any
 *   read-only page.
 *
 * Merging (merge.c) works on runs: write-protect the sources (mprotect: the
 * page lock of write_protect_page), compare, then map the frames over them
 * with one mmap per run of consecutive frames.  An unstable-tree match of
 * two private pages copies the tree page into a fresh frame once (the first
 * page of a run costs one copy) and maps both onto it.  The anonymous pages
 * replaced go back to the kernel with the mmap itself; frames are given
 * back with FALLOC_FL_PUNCH_HOLE when their last view goes.
 *
 * The SIGSEGV handler remains as the waiter for pages in transit: a page
 * being merged, migrated or swapped out is write-protected while pool->lock
 * is held, and a writer faults and waits on that lock, like the kernel's
 * page lock, then retries.
 *
 * A linear read-write mapping of the whole memfd, the "direct map", lets
 * this code fill, compare and copy frames without touching the user's
 * views; it is zapped (MADV_DONTNEED, which on a shared mapping only drops
 * the page table entries) after use, so that RSS counts each frame once per
 * view, as for any other shared file page.
 *
 * Two tables live in plain C memory (private anonymous mappings, so that a
 * forked child gets its own copy and the signal handler can read them):
 * the frame table (struct uksm_frame per pfn: mapcount, key, flags, group)
 * and the page table (struct uksm_pte per vpn: the pfn or slot, the state,
 * flags and group).
 *
 * Keyhole references (patches 4 and 8): the scanner's stable nodes hold a
 * (pfn, key) pair and never pin a frame.  A node is alive only while the
 * frame table still shows the same key and the KSM flag.
 *
 * Fork is O(mappings), the kernel's own: every state above is a private
 * mapping, so the kernel shares the pages copy-on-write with the child.  A
 * frame or swap slot that a live child may still map must never be written,
 * freed or reused by the parent: each fork opens an epoch, a close-on-exec
 * pipe whose write end only the child (and its descendants) hold, and a
 * frame or slot freed while an epoch is open is deferred, tagged with the
 * fork generation, until every epoch as old as the free has read EOF (the
 * children exited or exec'd: uksm_fork_poll).  The child's own pool starts
 * as an heir: its frame store and swap file are the parent's, which it only
 * reads.  At its first merge, compaction or swap-out it detaches: copies the
 * frames it maps (and the swap file) into a store of its own and remaps its
 * views there.  A child that only computes, or execs, costs nothing.
 *
 * Locking: one lock per pool, pool->lock, a futex word (async-signal-safe to
 * take in the handler, unlike a pthread mutex).  It serialises every change
 * to the tables and to the user mappings.  The rule that keeps it deadlock
 * free: code holding pool->lock runs to completion in C.  It never calls
 * into Python (cffi releases the GIL around our calls, and a thread holding
 * the GIL may be spinning in the handler) and never calls malloc.  It may
 * read user pages only in states that are readable (PRIVATE, KSM) and never
 * writes them, so it cannot fault into its own handler.  Critical sections
 * are bounded to UKSM_RUN_MAX pages.  Above it sits the policy lock of
 * csrc/lock.c, held across the Python side's sections, which finalizers and
 * signal handlers can interrupt in the holding thread: its word is the
 * owner's tid, so that such a nested caller learns it would wait for itself.
 *
 * The rest of the machinery has essays of its own: csrc/swap.c (the swap
 * area), csrc/migrate.c (compaction and offlining of the frame store by rmap
 * walk), csrc/fault.c (the handler and chaining), csrc/inject.c (fault
 * injection for the tests); docs/architecture.md draws a page's life.
 */
#ifndef UKSM_H
#define UKSM_H

#include <stddef.h>
#include <stdint.h>

#define UKSM_PAGE_SHIFT		12
#define UKSM_PAGE_SIZE		(1UL << UKSM_PAGE_SHIFT)
#define UKSM_MAX_POOLS		1024
/* The longest run handled under one hold of pool->lock. */
#define UKSM_RUN_MAX		512
/* Buffers of at least this many pages start on a huge-page boundary. */
#define UKSM_HPAGE_PAGES	512

/* struct uksm_pte.state */
enum uksm_page_state {
	UKSM_PTE_NONE = 0,	/* no buffer here: PROT_NONE */
	UKSM_PTE_PRIVATE = 1,	/* anonymous memory, read-write */
	UKSM_PTE_KSM = 2,	/* a MAP_PRIVATE view of stable frame pte->pfn */
	UKSM_PTE_ZERO = 3,	/* given back as zeroes: a fresh anonymous page */
	UKSM_PTE_SWAPPED = 4,	/* a MAP_PRIVATE view of swap slot pte->pfn */
	UKSM_SCAN_UNTOUCHED = 5,	/* uksm_checksum_range(): private, never written */
};

/* Pool(cow=...) */
enum uksm_cow_mode {
	UKSM_COW_KERNEL = 0,	/* views read-write: the kernel's fault path COWs */
	UKSM_COW_SIGNAL = 1,	/* views read-only: our SIGSEGV handler COWs */
};

#define UKSM_MAX_GROUPS		64	/* group 0 is the pool's own */

/* struct uksm_frame.flags */
#define UKSM_FRAME_KSM		0x1u	/* a stable frame with views */
#define UKSM_FRAME_DEFERRED	0x2u	/* freed, but a child may map it */

/* checksum algorithms */
enum uksm_checksum {
	UKSM_CSUM_JHASH2 = 0,	/* jhash2(page, 1024, 17), as mm/ksm.c had it */
	UKSM_CSUM_XXHASH = 1,	/* XXH3 64-bit, the fast one (Linux 6.x uses xxhash) */
};

/* which step of uksm_alloc() failed, in *stage */
enum uksm_alloc_stage {
	UKSM_ALLOC_OK = 0,
	UKSM_ALLOC_CAPACITY = 1,	/* the pool's capacity: -ENOMEM */
	UKSM_ALLOC_VA = 2,		/* no free run of virtual pages: -ENOSPC */
	UKSM_ALLOC_COMMIT = 3,		/* the kernel refused the mapping (commit, map count) */
};

/* operations uksm_inject() can make fail */
enum uksm_inject_op_nr {
	UKSM_OP_MMAP = 0,
	UKSM_OP_MPROTECT = 1,
	UKSM_OP_FALLOCATE = 2,
	UKSM_OP_PWRITE = 3,
	UKSM_OP_NR = 4,
};

/* uksm_merge() result codes, per entry */
enum uksm_merge_result {
	UKSM_MERGE_OK = 0,
	UKSM_MERGE_STALE = 1,	/* stable node's keyhole no longer fits */
	UKSM_MERGE_DIFFER = 2,	/* contents not equal under write-protect */
	UKSM_MERGE_BUSY = 3,	/* page not in a mergeable state */
	UKSM_MERGE_FULL = 4,	/* KSM frame at max_page_sharing */
	UKSM_MERGE_NOVMA = 5,	/* skipped: VMA budget or mmap ENOMEM */
	UKSM_MERGE_SELF = 6,	/* page already maps the target frame */
	UKSM_MERGE_NOFRAME = 7,	/* no free frame in the store */
};

struct uksm_frame {
	uint32_t mapcount;	/* views of this frame (pages in KSM state); 0 = free */
	uint32_t key;		/* keyhole: changes when the owner changes */
	uint32_t flags;		/* UKSM_FRAME_* */
	uint32_t group;		/* the group charged for this frame (memcg) */
	uint32_t gen;		/* DEFERRED: the fork generation it was freed in */
};

/* struct uksm_pte.flags */
#define UKSM_PTE_PINNED		0x1	/* pool.pin(): never merged, moved or swapped */
#define UKSM_PTE_LOCKED		0x2	/* pool.lock(): never swapped (mlock) */

struct uksm_pte {
	uint32_t pfn;		/* KSM: the frame; SWAPPED: the slot */
	uint8_t state;		/* enum uksm_page_state */
	uint8_t flags;		/* UKSM_PTE_* */
	uint8_t group;		/* the buffer's group */
	uint8_t pad;
};

struct uksm_stats {
	uint64_t frames_used;	/* frames with mapcount > 0 or deferred */
	uint64_t frames_file;	/* frames covered by the memfd's size */
	uint64_t frames_deferred;	/* freed frames a live child may still map */
	uint64_t ksm_frames;	/* frames with UKSM_FRAME_KSM: pages_shared */
	uint64_t ksm_mappings;	/* ptes in KSM state: pages_shared + pages_sharing */
	uint64_t zero_pages;	/* ptes in ZERO state: ksm_zero_pages */
	uint64_t pages_mapped;	/* ptes not NONE */
	uint64_t cow_breaks;	/* KSM pages copied on write (either mode) */
	uint64_t cow_signal;	/* ... of which by our handler (cow="signal") */
	uint64_t zero_cow;	/* ZERO pages written */
	uint64_t pages_merged;	/* successful merges, ever */
	uint64_t merge_runs;	/* remap calls made by merges */
	uint64_t fault_waits;	/* faults that found pool->lock taken */
	uint64_t transit_faults;	/* faults on pages in transit */
	uint64_t pages_swapped;	/* ptes in SWAPPED state */
	uint64_t swap_outs;	/* pages written to swap */
	uint64_t swap_ins;	/* SWAPPED pages made private again (written, pinned) */
	uint64_t slots_used;	/* swap slots with a mapper, or deferred */
	uint64_t swap_file_slots;	/* size of the swap file, in slots */
	uint64_t swap_errors;	/* failed swap writes (eviction stopped) */
	uint64_t last_swap_errno;	/* errno of the last one */
	uint64_t reclaim_runs;	/* eviction batches */
	uint64_t detaches;	/* a forked child took a frame store of its own */
	uint64_t cow_wide;	/* faults that made a whole run writable (no VMA to split) */
};

/* uksm_memory(): what the kernel holds for the pool, from pagemap/mincore */
struct uksm_memory {
	uint64_t private_present;	/* PRIVATE pages present (anonymous) */
	uint64_t private_shared;	/* ... of which shared with a forked relative */
	uint64_t views_present;		/* KSM views mapped in (RSS counts each) */
	uint64_t frames_single;		/* frames with exactly one view present */
	uint64_t frames_present;	/* frames with at least one view present */
	uint64_t swap_views_present;	/* SWAPPED views mapped in */
	uint64_t slots_present;		/* slots with at least one view present */
	uint64_t slots_single;		/* slots with exactly one view present */
	uint64_t swap_cached;		/* swap file pages in the page cache */
	uint64_t frames_blocks;		/* memfd blocks allocated, in pages */
};

struct uksm_compact_stats {
	uint64_t frames_moved;		/* frame copies made, evacuations included */
	uint64_t runs_moved;		/* moves: one write barrier and remap set each */
	uint64_t frames_skipped;	/* planned moves given up (pinned, raced, no room) */
	uint64_t file_frames_before;	/* memfd size in frames, before */
	uint64_t file_frames_after;	/* and after */
	uint64_t max_hold_ns;		/* longest pool->lock hold: a writer's worst wait */
};

struct uksm_pool;

/* pool.c */
int uksm_pool_create(size_t capacity_pages, size_t nr_frames, size_t va_pages,
		     int cow_mode, struct uksm_pool **out);
void uksm_pool_destroy(struct uksm_pool *pool);
char *uksm_pool_va(struct uksm_pool *pool);
int uksm_pool_fd(struct uksm_pool *pool);
void uksm_pool_stats(struct uksm_pool *pool, struct uksm_stats *st);
int uksm_alloc(struct uksm_pool *pool, size_t npages, size_t *vpn_out, int *stage);
int uksm_release(struct uksm_pool *pool, size_t vpn, size_t npages);
int uksm_va_free(struct uksm_pool *pool, size_t vpn, size_t npages);
int uksm_pages_info(struct uksm_pool *pool, size_t vpn, size_t npages,
		    uint8_t *state, uint32_t *pfn, uint32_t *mapcount);
int uksm_frames_info(struct uksm_pool *pool, const uint32_t *pfns, size_t n,
		     uint32_t *mapcount, uint32_t *key, uint32_t *flags);
int uksm_memory(struct uksm_pool *pool, size_t vpn, size_t npages,
		struct uksm_memory *out);
int uksm_memory_ranges(struct uksm_pool *pool, const uint64_t *ranges,
		       size_t nranges, struct uksm_memory *out);
int uksm_fork_poll(void);

/* checksum.c */
uint32_t uksm_jhash2(const uint32_t *k, uint32_t length, uint32_t initval);
uint64_t uksm_calc_checksum(const void *page, int algo);
int uksm_checksum_range(struct uksm_pool *pool, size_t vpn, size_t npages,
			int algo, const uint8_t *skip, uint64_t *sums,
			uint8_t *state);

/* pool.c, over merge.c's uksm_merge_runs(): an heir detaches once the call is taken */
int uksm_merge(struct uksm_pool *pool, size_t n, const int64_t *src_vpn,
	       const int64_t *dst_vpn, const uint32_t *dst_pfn,
	       const uint32_t *dst_key, uint32_t max_sharing,
	       int64_t *vma_budget, uint32_t *out_pfn, uint32_t *out_key,
	       uint8_t *result);
int uksm_merge_zero(struct uksm_pool *pool, size_t n, const int64_t *vpns,
		    int64_t *vma_budget, uint8_t *result);
int uksm_unmerge(struct uksm_pool *pool, size_t vpn, size_t npages,
		 size_t *unmerged);
int uksm_reconcile(struct uksm_pool *pool, size_t vpn, size_t npages);
void uksm_set_vma_state(struct uksm_pool *pool, int64_t maps, int64_t soft_limit);
int64_t uksm_vma_estimate(struct uksm_pool *pool);
int uksm_set_pinned(struct uksm_pool *pool, size_t vpn, size_t npages, int on);

/* migrate.c; uksm_compact() enters through pool.c, which detaches an heir first */
int uksm_compact(struct uksm_pool *pool, uint64_t shrink_frames,
		 uint32_t *log_from, uint32_t *log_to, size_t log_cap,
		 size_t *log_n, struct uksm_compact_stats *out);

/* swap.c; uksm_reclaim() enters through pool.c, which detaches an heir first */
int uksm_swap_enable(struct uksm_pool *pool, int swap_fd, int dir_fd,
		     size_t max_resident_pages, size_t batch);
int uksm_reclaim(struct uksm_pool *pool, size_t nr_pages, int group);
int uksm_set_locked(struct uksm_pool *pool, size_t vpn, size_t npages, int on);
int uksm_set_group(struct uksm_pool *pool, size_t vpn, size_t npages, int group);
int uksm_group_limit(struct uksm_pool *pool, int group, size_t max_pages);
int uksm_group_stats(struct uksm_pool *pool, int group, uint64_t *out4);
int uksm_swap_in_range(struct uksm_pool *pool, size_t vpn, size_t npages);
int uksm_set_max_resident(struct uksm_pool *pool, size_t pages);
int uksm_swap_trim(struct uksm_pool *pool, size_t min);

/* inject.c (tests) */
int uksm_inject(int op, long skip, long fail, int err);
long uksm_inject_hits(int op);

/* handler.c: the NEP 49 handler's event queue (the rest is Python's) */
enum uksm_event_type {
	UKSM_EV_HOLE = 0,	/* an ALLOC whose buffer died before it was drained */
	UKSM_EV_ALLOC = 1,	/* a handler buffer: vpn, npages */
	UKSM_EV_FREE = 2,	/* it is gone (released: its pages cut off already) */
	UKSM_EV_TRIM = 3,	/* realloc shrank it in place to npages */
};

/* uksm_events_stats() slots */
enum uksm_handler_stat {
	UKSM_HST_ALLOCS = 0,	/* buffers the handler took from the pool */
	UKSM_HST_FREES = 1,
	UKSM_HST_FALLBACKS = 2,	/* big requests sent to the previous handler */
	UKSM_HST_CANCELLED = 3,	/* freed before the Python side heard of them */
	UKSM_HST_REALLOCS = 4,	/* grown into a new range */
	UKSM_HST_MOVED = 5,	/* ... by mremap, not memcpy */
	UKSM_HST_LIVE = 6,
	UKSM_HST_QUEUED = 7,
	UKSM_HST_HANDLERS = 8,
	UKSM_HST_CAP = 9,
	UKSM_HST_QUICK = 10,	/* allocations served from the quicklist */
	UKSM_HST_QUICK_PAGES = 11,	/* pages on it now */
	UKSM_HST_NR = 12,
};

int uksm_events_enable(struct uksm_pool *pool, size_t cap);
int uksm_events_drain(struct uksm_pool *pool, uint64_t *vpn, uint32_t *npages,
		      uint8_t *type, uint8_t *released, size_t max);
void uksm_events_stats(struct uksm_pool *pool, uint64_t *out);
void uksm_events_close(struct uksm_pool *pool);
void uksm_events_flush(struct uksm_pool *pool);
int uksm_events_idle(struct uksm_pool *pool);

/* fault.c */
int uksm_install_handler(void);
int uksm_handler_installed(void);
void uksm_handler_pop_prev(void);

/* lock.c: the policy lock (the Python side's), owner-aware */
enum { UKSM_PLOCK_BUSY = 0, UKSM_PLOCK_TAKEN = 1, UKSM_PLOCK_NESTED = 2 };
int uksm_plock_lock(uint32_t *word, int blocking);
void uksm_plock_unlock(uint32_t *word);
int uksm_plock_owned(const uint32_t *word);
void uksm_plock_adopt(uint32_t *word, uint32_t parent_tid);
void uksm_plock_unlock_if_owned(uint32_t *word);
void uksm_block_async_signals(void);

#endif /* UKSM_H */
