/* Declarations for cffi's cdef: no preprocessor lines allowed here.  The
 * real definitions, with their documentation, are in uksm.h; API mode makes
 * the C compiler check that both agree. */
#define UKSM_PAGE_SIZE ...
#define UKSM_MAX_POOLS ...
#define UKSM_RUN_MAX ...
#define UKSM_HPAGE_PAGES ...
#define UKSM_MAX_GROUPS ...
#define UKSM_FRAME_KSM ...
#define UKSM_FRAME_DEFERRED ...
#define UKSM_PTE_PINNED ...
#define UKSM_PTE_LOCKED ...
#define UKSM_PTE_NONE ...
#define UKSM_PTE_PRIVATE ...
#define UKSM_PTE_KSM ...
#define UKSM_PTE_ZERO ...
#define UKSM_PTE_SWAPPED ...
#define UKSM_SCAN_UNTOUCHED ...
#define UKSM_COW_KERNEL ...
#define UKSM_COW_SIGNAL ...
#define UKSM_CSUM_JHASH2 ...
#define UKSM_CSUM_XXHASH ...
#define UKSM_ALLOC_OK ...
#define UKSM_ALLOC_CAPACITY ...
#define UKSM_ALLOC_VA ...
#define UKSM_ALLOC_COMMIT ...
#define UKSM_OP_MMAP ...
#define UKSM_OP_MPROTECT ...
#define UKSM_OP_FALLOCATE ...
#define UKSM_OP_PWRITE ...
#define UKSM_OP_NR ...
#define UKSM_MERGE_OK ...
#define UKSM_MERGE_STALE ...
#define UKSM_MERGE_DIFFER ...
#define UKSM_MERGE_BUSY ...
#define UKSM_MERGE_FULL ...
#define UKSM_MERGE_NOVMA ...
#define UKSM_MERGE_SELF ...
#define UKSM_MERGE_NOFRAME ...
#define UKSM_EV_HOLE ...
#define UKSM_EV_ALLOC ...
#define UKSM_EV_FREE ...
#define UKSM_EV_TRIM ...
#define UKSM_HST_ALLOCS ...
#define UKSM_HST_FREES ...
#define UKSM_HST_FALLBACKS ...
#define UKSM_HST_CANCELLED ...
#define UKSM_HST_REALLOCS ...
#define UKSM_HST_MOVED ...
#define UKSM_HST_LIVE ...
#define UKSM_HST_QUEUED ...
#define UKSM_HST_HANDLERS ...
#define UKSM_HST_CAP ...
#define UKSM_HST_QUICK ...
#define UKSM_HST_QUICK_PAGES ...
#define UKSM_HST_NR ...

struct uksm_frame {
	uint32_t mapcount;
	uint32_t key;
	uint32_t flags;
	uint32_t group;
	uint32_t gen;
};

struct uksm_pte {
	uint32_t pfn;
	uint8_t state;
	uint8_t flags;
	uint8_t group;
	uint8_t pad;
};

struct uksm_stats {
	uint64_t frames_used;
	uint64_t frames_file;
	uint64_t frames_deferred;
	uint64_t ksm_frames;
	uint64_t ksm_mappings;
	uint64_t zero_pages;
	uint64_t pages_mapped;
	uint64_t cow_breaks;
	uint64_t cow_signal;
	uint64_t zero_cow;
	uint64_t pages_merged;
	uint64_t merge_runs;
	uint64_t fault_waits;
	uint64_t transit_faults;
	uint64_t pages_swapped;
	uint64_t swap_outs;
	uint64_t swap_ins;
	uint64_t slots_used;
	uint64_t swap_file_slots;
	uint64_t swap_errors;
	uint64_t last_swap_errno;
	uint64_t reclaim_runs;
	uint64_t detaches;
	uint64_t cow_wide;
};

struct uksm_memory {
	uint64_t private_present;
	uint64_t private_shared;
	uint64_t views_present;
	uint64_t frames_single;
	uint64_t frames_present;
	uint64_t swap_views_present;
	uint64_t slots_present;
	uint64_t slots_single;
	uint64_t swap_cached;
	uint64_t frames_blocks;
};

struct uksm_compact_stats {
	uint64_t frames_moved;
	uint64_t runs_moved;
	uint64_t frames_skipped;
	uint64_t file_frames_before;
	uint64_t file_frames_after;
	uint64_t max_hold_ns;
};

struct uksm_pool;

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
uint32_t uksm_jhash2(const uint32_t *k, uint32_t length, uint32_t initval);
uint64_t uksm_calc_checksum(const void *page, int algo);
int uksm_checksum_range(struct uksm_pool *pool, size_t vpn, size_t npages,
			int algo, const uint8_t *skip, uint64_t *sums,
			uint8_t *state);
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
int uksm_compact(struct uksm_pool *pool, uint64_t shrink_frames,
		 uint32_t *log_from, uint32_t *log_to, size_t log_cap,
		 size_t *log_n, struct uksm_compact_stats *out);
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
int uksm_inject(int op, long skip, long fail, int err);
long uksm_inject_hits(int op);
int uksm_install_handler(void);
int uksm_handler_installed(void);
void uksm_handler_pop_prev(void);
#define UKSM_PLOCK_BUSY ...
#define UKSM_PLOCK_TAKEN ...
#define UKSM_PLOCK_NESTED ...
int uksm_plock_lock(uint32_t *word, int blocking);
void uksm_plock_unlock(uint32_t *word);
int uksm_plock_owned(const uint32_t *word);
void uksm_plock_adopt(uint32_t *word, uint32_t parent_tid);
void uksm_plock_unlock_if_owned(uint32_t *word);
void uksm_block_async_signals(void);

/* handler.c */
int uksm_events_enable(struct uksm_pool *pool, size_t cap);
int uksm_events_drain(struct uksm_pool *pool, uint64_t *vpn, uint32_t *npages,
		      uint8_t *type, uint8_t *released, size_t max);
void uksm_events_stats(struct uksm_pool *pool, uint64_t *out);
void uksm_events_close(struct uksm_pool *pool);
void uksm_events_flush(struct uksm_pool *pool);
int uksm_events_idle(struct uksm_pool *pool);
