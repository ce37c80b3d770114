/* SPDX-License-Identifier: MIT */
/*
 * uksm.h - the page machinery of a userspace KSM.
 *
 * DOC: Overview
 *
 * uksm backs every buffer of a pool with one anonymous memfd, the pool's
 * backing store.  The memfd is cut into 4 KiB frames; a frame number is a
 * "pfn".  The pool also reserves one contiguous range of virtual address
 * space; a virtual page number is a "vpn".  Each live virtual page maps one
 * frame of the memfd with MAP_SHARED|MAP_FIXED, exactly as a pte maps a
 * struct page.  Because the mapping is shared, two virtual pages can map the
 * same frame: that is a merge, and the frame is then a KSM frame.
 *
 * A linear read-write mapping of the whole memfd, the "direct map", lets this
 * code read, compare, hash and copy any frame without touching the user's
 * mappings or their protections, as the kernel uses its own direct map.
 *
 * Two tables live in plain C memory (private anonymous mappings, so that a
 * forked child gets its own copy and the signal handler can read them):
 *
 *   the frame table, struct uksm_frame per pfn: mapcount (how many virtual
 *   pages map it, 0 = free), key (bumped each time the frame changes owner
 *   or stops being KSM), flags (UKSM_FRAME_KSM);
 *
 *   the page table, struct uksm_pte per vpn: the pfn it maps and its state:
 *   NONE (no buffer: PROT_NONE, a touch crashes as it should), NORMAL
 *   (private to this page, read-write), KSM (shares a KSM frame, read-only),
 *   ZERO (maps the kernel's zero page through a private anonymous read-only
 *   mapping: costs no frame at all), SWAPPED (its contents are in a slot of
 *   the pool's swap file, the pte holds the slot; PROT_NONE, a touch swaps
 *   it back in: csrc/swap.c).  Flags beside the state: PINNED (pool.pin(),
 *   never moved or swapped), LOCKED (pool.lock(), never swapped), HINT (made
 *   PROT_NONE by the reclaim clock as a reference hint), and the group the
 *   page is charged to.
 *
 * Merging (the scanner decides which pages, merge.c does it): write-protect
 * the page with mprotect, compare it again with the KSM frame through the
 * direct map, then remap the virtual page read-only onto the KSM frame and
 * give its own frame back to the kernel with FALLOC_FL_PUNCH_HOLE.  When two
 * unmerged pages are found equal, the first page's own frame is upgraded in
 * place to the KSM frame, allocating nothing (the seed's patch 5).  Every
 * step works on runs: a run of virtual pages whose targets are a run of
 * frames costs one mprotect, one mmap and one punch, whatever its length; a
 * syscall per page would cost ~4000 times more per page (shared/notes).
 *
 * Copy-on-write (fault.c): a write to a KSM or ZERO page raises SIGSEGV.  The
 * handler takes a fresh frame, copies the KSM frame into it through the direct
 * map, maps it read-write over the faulting page and returns, so the write is
 * retried and lands in the writer's own copy.  A sole remaining mapper of a
 * KSM frame just gets it back writable.
 *
 * Keyhole references (patches 4 and 8): the scanner's stable nodes hold a
 * (pfn, key) pair and never pin a frame.  A node is alive only while the
 * frame table still shows the same key and the KSM flag; COW by the last
 * mapper, freeing or reuse all change the key, so a stale node is recognised
 * the next time it is looked at, and pruned.
 *
 * Locking: one lock per pool, pool->lock, a futex word (async-signal-safe to
 * take in the handler, unlike a pthread mutex).  It serialises every change
 * to the tables and to the user mappings.  The rule that keeps it deadlock
 * free: code holding pool->lock runs to completion in C.  It never calls
 * into Python (cffi releases the GIL around our calls, and a thread holding
 * the GIL may be spinning in the handler), never calls malloc, and never
 * touches a user mapping, only the direct map, so it can never fault into
 * its own handler.  Critical sections are bounded to UKSM_RUN_MAX pages so
 * a faulting writer waits for at most one run.
 *
 * Frame allocation is first-fit from the lowest free pfn, in runs: a buffer
 * gets contiguous frames when it can, so it is one VMA and one mmap, and the
 * memfd stays compact.  A freed frame is always punched before it is marked
 * free, so a fresh frame always reads as zeroes (no old contents leak into
 * a new allocation, and a ZERO page's COW needs no copy).
 *
 * Capacity: allocations through the API may use capacity frames; the fault
 * handler may also use a reserve above that, because a COW break cannot be
 * refused without losing the write.  If even the reserve is gone, the
 * process ends with a message naming uksm and the reason.
 *
 * Fork: the memfd mapping is MAP_SHARED, so a forked child would write into
 * its parent's frames.  At fork, the child copies every live frame into a
 * fresh memfd and remaps its pages there (as Mesh does), so parent and child
 * never see each other's writes.
 *
 * The rest of the machinery has essays of its own: csrc/swap.c (the swap
 * area: aging by reference hints, eviction, the swap map and swap cache),
 * csrc/migrate.c (compaction and offlining by rmap walk), csrc/fault.c (the
 * handler and chaining), csrc/inject.c (fault injection for the tests).
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

/* struct uksm_pte.state */
enum {
	UKSM_PTE_NONE = 0,	/* no buffer here: PROT_NONE */
	UKSM_PTE_NORMAL = 1,	/* maps its own frame read-write */
	UKSM_PTE_KSM = 2,	/* maps a KSM frame read-only */
	UKSM_PTE_ZERO = 3,	/* maps the kernel zero page read-only */
	UKSM_PTE_SWAPPED = 4,	/* in swap slot pfn; PROT_NONE: a touch swaps in */
};

#define UKSM_MAX_GROUPS		64	/* group 0 is the pool's own */

/* struct uksm_frame.flags */
#define UKSM_FRAME_KSM		0x1u

/* checksum algorithms */
enum {
	UKSM_CSUM_JHASH2 = 0,	/* jhash2(page, 1024, 17), as mm/ksm.c had it */
	UKSM_CSUM_XXHASH = 1,	/* XXH3 64-bit, the fast one (Linux 6.x uses xxhash) */
};

/* which step of uksm_alloc() failed, in *vpn_out */
enum {
	UKSM_ALLOC_CAPACITY = 0,
	UKSM_ALLOC_VA = 1,
	UKSM_ALLOC_FALLOCATE = 2,
	UKSM_ALLOC_MMAP = 3,
};

/* operations uksm_inject() can make fail */
enum {
	UKSM_OP_MMAP = 0,
	UKSM_OP_MPROTECT = 1,
	UKSM_OP_FALLOCATE = 2,
	UKSM_OP_PWRITE = 3,
	UKSM_OP_NR = 4,
};

/* uksm_merge() result codes, per entry (0 = merged) */
#define UKSM_MERGE_OK		0
#define UKSM_MERGE_STALE	1	/* stable node's keyhole no longer fits */
#define UKSM_MERGE_DIFFER	2	/* contents not equal under write-protect */
#define UKSM_MERGE_BUSY		3	/* page not in a mergeable state */
#define UKSM_MERGE_FULL		4	/* KSM frame at max_page_sharing */
#define UKSM_MERGE_NOVMA	5	/* skipped: VMA budget or mmap ENOMEM */
#define UKSM_MERGE_SELF		6	/* page already maps the target frame */

struct uksm_frame {
	uint32_t mapcount;	/* virtual pages mapping this frame; 0 = free */
	uint32_t key;		/* keyhole: changes when the owner changes */
	uint32_t flags;		/* UKSM_FRAME_* */
	uint32_t group;		/* the group charged for this frame (memcg) */
};

struct uksm_pte {
	uint32_t pfn;		/* frame mapped, when NORMAL or KSM */
	uint8_t state;		/* UKSM_PTE_* */
	uint8_t spare[3];
};

struct uksm_stats {
	uint64_t frames_used;	/* frames with mapcount > 0 */
	uint64_t frames_file;	/* frames covered by the memfd's size */
	uint64_t ksm_frames;	/* frames with UKSM_FRAME_KSM: pages_shared */
	uint64_t ksm_mappings;	/* ptes in KSM state: pages_shared + pages_sharing */
	uint64_t zero_pages;	/* ptes in ZERO state: ksm_zero_pages */
	uint64_t pages_mapped;	/* ptes not NONE */
	uint64_t cow_breaks;	/* faults that copied a KSM frame */
	uint64_t cow_reuse;	/* faults that reused a sole-mapped KSM frame */
	uint64_t zero_cow;	/* faults that replaced a zero page */
	uint64_t pages_merged;	/* successful merges, ever */
	uint64_t merge_runs;	/* remap calls made by merges */
	uint64_t frames_reserve_used;	/* high water of the COW reserve in use */
	uint64_t fault_waits;	/* faults that found pool->lock taken */
	uint64_t pages_swapped;	/* ptes in SWAPPED state */
	uint64_t swap_outs;	/* frames written to swap */
	uint64_t swap_ins;	/* slots read back (swap cache hits not counted) */
	uint64_t swap_cache_hits;	/* swap-ins that found the frame in the swap cache */
	uint64_t slots_used;	/* swap slots with a mapper */
	uint64_t swap_file_slots;	/* size of the swap file, in slots */
	uint64_t swap_errors;	/* failed swap writes (eviction stopped) */
	uint64_t last_swap_errno;	/* errno of the last one */
	uint64_t hint_faults;	/* reference hints taken (aging) */
	uint64_t reclaim_runs;	/* eviction batches */
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
int uksm_pool_create(size_t capacity_frames, size_t reserve_frames,
		     size_t va_pages, struct uksm_pool **out);
void uksm_pool_destroy(struct uksm_pool *pool);
char *uksm_pool_va(struct uksm_pool *pool);
int uksm_pool_fd(struct uksm_pool *pool);
size_t uksm_pool_va_pages(struct uksm_pool *pool);
void uksm_pool_stats(struct uksm_pool *pool, struct uksm_stats *st);
int uksm_alloc(struct uksm_pool *pool, size_t npages, size_t *vpn_out);
int uksm_release(struct uksm_pool *pool, size_t vpn, size_t npages);
void uksm_va_free(struct uksm_pool *pool, size_t vpn, size_t npages);
int uksm_pages_info(struct uksm_pool *pool, size_t vpn, size_t npages,
		    uint8_t *state, uint32_t *pfn, uint32_t *mapcount);
int uksm_frames_info(struct uksm_pool *pool, const uint32_t *pfns, size_t n,
		     uint32_t *mapcount, uint32_t *key, uint32_t *flags);

/* checksum.c */
uint32_t uksm_jhash2(const uint32_t *k, uint32_t length, uint32_t initval);
uint64_t uksm_xxhash(const void *page);
uint64_t uksm_calc_checksum(const void *page, int algo);
int uksm_checksum_range(struct uksm_pool *pool, size_t vpn, size_t npages,
			int algo, const uint8_t *skip, uint64_t *sums,
			uint8_t *state);
int uksm_memcmp_pages(struct uksm_pool *pool, size_t vpn_a, size_t vpn_b);

/* merge.c */
int uksm_merge(struct uksm_pool *pool, size_t n, const int64_t *src_vpn,
	       const int64_t *dst_vpn, const uint32_t *dst_pfn,
	       const uint32_t *dst_key, uint32_t max_sharing,
	       int64_t *vma_budget, uint32_t *out_pfn, uint32_t *out_key,
	       uint8_t *result);
int uksm_merge_zero(struct uksm_pool *pool, size_t n, const int64_t *vpns,
		    int64_t *vma_budget, uint8_t *result);
int uksm_unmerge(struct uksm_pool *pool, size_t vpn, size_t npages,
		 size_t *unmerged);
void uksm_set_vma_state(struct uksm_pool *pool, int64_t maps, int64_t soft_limit);
int64_t uksm_vma_estimate(struct uksm_pool *pool);
int uksm_set_pinned(struct uksm_pool *pool, size_t vpn, size_t npages, int on);

/* migrate.c */
int uksm_compact(struct uksm_pool *pool, uint64_t shrink_frames,
		 uint32_t *log_from, uint32_t *log_to, size_t log_cap,
		 size_t *log_n, struct uksm_compact_stats *out);

/* swap.c */
int uksm_swap_enable(struct uksm_pool *pool, int swap_fd, int dir_fd,
		     size_t max_resident_frames, size_t batch);
int uksm_reclaim(struct uksm_pool *pool, size_t nr_frames, int group);
int uksm_set_locked(struct uksm_pool *pool, size_t vpn, size_t npages, int on);
int uksm_set_group(struct uksm_pool *pool, size_t vpn, size_t npages, int group);
int uksm_group_limit(struct uksm_pool *pool, int group, size_t max_frames);
int uksm_group_stats(struct uksm_pool *pool, int group, uint64_t *out4);
int uksm_swap_in_range(struct uksm_pool *pool, size_t vpn, size_t npages);
int uksm_set_max_resident(struct uksm_pool *pool, size_t frames);
int uksm_swap_trim(struct uksm_pool *pool, size_t min);

/* inject.c (tests) */
int uksm_inject(int op, long skip, long fail, int err);
long uksm_inject_hits(int op);

/* fault.c */
int uksm_install_handler(void);
int uksm_handler_installed(void);
void uksm_handler_pop_prev(void);

#endif /* UKSM_H */
