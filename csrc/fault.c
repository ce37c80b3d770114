// SPDX-License-Identifier: MIT
/*
 * fault.c - the SIGSEGV handler: do_wp_page for pool memory.
 *
 * Every fault the pool causes is a write: KSM and ZERO pages are mapped
 * read-only, and a NORMAL page is read-only only for the moment a merge
 * holds it write-protected.  So the handler needs no decoding of the fault
 * (no REG_ERR, no ESR): the page table says what to do.
 *
 *   KSM or ZERO	break COW (merge.c), return: the write is retried.
 *   NORMAL		a merge had it write-protected and has given up (we
 *			waited for it on pool->lock), or an undo could not
 *			restore its protection: make it writable, return.
 *   NONE		not a buffer: the user touched freed memory.  Chain.
 *
 * Faults outside every pool, and signals sent by kill() or raise()
 * (si_code <= 0), go to the handler that was installed before ours, so
 * real crashes still crash, with faulthandler's traceback.
 *
 * Async-signal-safe throughout: pool->lock is a futex word; allocation is
 * a bitmap; the copy is memcpy through the direct map; the rest are
 * syscalls.  errno is saved and restored.  If a COW break cannot be done
 * (no frame even in the reserve, or mmap fails: vm.max_map_count), the
 * write cannot be honoured and must not be lost silently: the process is
 * ended with a message naming uksm and the reason.
 */
#include "uksm_internal.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/*
 * The handler we replaced, for chaining.  Published through an index into
 * two slots so that a thread chaining while another re-installs never reads
 * a half-copied struct sigaction.
 */
static struct sigaction prev_actions[2];
static _Atomic int prev_idx;

/*
 * Per-thread memory of chaining, in a small table keyed by tid (not TLS:
 * TLS in a shared object may allocate, which a signal handler must not).
 *   reraise	the previous handler left a SIGSEGV pending for this thread
 *		(faulthandler prints its traceback, puts back its own
 *		predecessor, possibly us, and raises again): when it arrives,
 *		it is time to die by SIG_DFL.
 *   addr/count	the same fault address passed on again and again: a previous
 *		handler that returns without fixing anything (a disabled
 *		faulthandler) would spin forever; a thousand times within a
 *		second is a loop, and we die by SIG_DFL instead.
 * A full table reuses slots by tid hash: at worst one loop is caught late.
 */
#define CHAIN_SLOTS 64
#define LOOP_FAULTS 1000
struct chain_slot {
	_Atomic pid_t tid;
	_Atomic int reraise;
	void *_Atomic addr;
	_Atomic unsigned count;
	_Atomic uint64_t since_ns;
};
static struct chain_slot chain_slots[CHAIN_SLOTS];

static void say(const char *s)
{
	(void)!write(2, s, strlen(s));
}

static void __attribute__((noreturn)) uksm_fatal(const char *why)
{
	say("uksm: fatal: ");
	say(why);
	say("\n");
	abort();
}

static void die_by_default(int sig, siginfo_t *si)
{
	struct sigaction dfl;

	memset(&dfl, 0, sizeof(dfl));
	dfl.sa_handler = SIG_DFL;
	sigemptyset(&dfl.sa_mask);
	sigaction(sig, &dfl, NULL);
	/* A real fault kills when it re-executes; a sent signal needs sending. */
	if (si->si_code <= 0)
		raise(sig);
}

static pid_t my_tid(void)
{
	return (pid_t)syscall(SYS_gettid);
}

static uint64_t mono_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static struct chain_slot *chain_find(pid_t tid, int take)
{
	for (int i = 0; i < CHAIN_SLOTS; i++)
		if (atomic_load(&chain_slots[i].tid) == tid)
			return &chain_slots[i];
	if (!take)
		return NULL;
	for (int i = 0; i < CHAIN_SLOTS; i++) {
		pid_t none = 0;

		if (atomic_compare_exchange_strong(&chain_slots[i].tid, &none, tid))
			return &chain_slots[i];
	}
	atomic_store(&chain_slots[tid % CHAIN_SLOTS].tid, tid);
	return &chain_slots[tid % CHAIN_SLOTS];
}

static void chain_release(struct chain_slot *cs)
{
	atomic_store(&cs->reraise, 0);
	atomic_store(&cs->count, 0);
	atomic_store(&cs->addr, NULL);
	atomic_store(&cs->tid, 0);
}

/*
 * Pass a signal that is not ours to the previous handler.  A handler that
 * fixes its own faults (a JVM, a GC's guard pages) just returns, however
 * often it faults; faulthandler's re-raise and a handler that fixes nothing
 * are caught as described at chain_slots.
 */
static void chain(int sig, siginfo_t *si, void *uc)
{
	const struct sigaction *prev = &prev_actions[atomic_load(&prev_idx)];
	pid_t tid = my_tid();
	struct chain_slot *cs = chain_find(tid, si->si_code > 0);
	sigset_t pending;

	if (si->si_code <= 0 && cs && atomic_load(&cs->reraise)) {
		chain_release(cs);
		die_by_default(sig, si);
		return;
	}
	if (si->si_code > 0) {
		uint64_t now = mono_ns();

		if (atomic_load(&cs->addr) != si->si_addr ||
		    now - atomic_load(&cs->since_ns) > 1000000000ull) {
			atomic_store(&cs->addr, si->si_addr);
			atomic_store(&cs->since_ns, now);
			atomic_store(&cs->count, 0);
		}
		if (atomic_fetch_add(&cs->count, 1) >= LOOP_FAULTS) {
			chain_release(cs);
			die_by_default(sig, si);
			return;
		}
	}
	if (prev->sa_flags & SA_SIGINFO) {
		if (!prev->sa_sigaction) {
			die_by_default(sig, si);
			return;
		}
		prev->sa_sigaction(sig, si, uc);
	} else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
		prev->sa_handler(sig);
	} else {
		die_by_default(sig, si);
		return;
	}
	/* did it leave a SIGSEGV for this thread, to arrive when we return? */
	if (!sigpending(&pending) && sigismember(&pending, sig)) {
		cs = chain_find(tid, 1);
		atomic_store(&cs->reraise, 1);
	} else if (si->si_code <= 0 && cs) {
		chain_release(cs);
	}
}

static struct uksm_pool *pool_of(void *addr)
{
	uintptr_t a = (uintptr_t)addr;
	size_t high = atomic_load(&uksm_pools_high);

	for (size_t slot = 0; slot < high; slot++) {
		/* hi is set last and cleared first: read it first */
		uintptr_t hi = atomic_load(&uksm_pool_hi[slot]);
		uintptr_t lo;

		if (!hi || a >= hi)
			continue;
		lo = atomic_load(&uksm_pool_lo[slot]);
		if (lo && a >= lo)
			return atomic_load(&uksm_pools[slot]);
	}
	return NULL;
}

static int merged_state(uint8_t state)
{
	return state == UKSM_PTE_KSM || state == UKSM_PTE_ZERO;
}

/*
 * mmap said ENOMEM: the process is at vm.max_map_count, and mapping one
 * page into the middle of a read-only run would split it.  Instead give the
 * whole run of merged pages around the fault fresh, contiguous frames: its
 * ends are mapping boundaries already (a NORMAL or NONE neighbour has other
 * protections), so one mmap replaces whole VMAs and needs no split; the VMA
 * count goes down.  Costs a frame per page of the run: degraded, not dead.
 */
static int break_cow_whole_run(struct uksm_pool *pool, size_t vpn)
{
	size_t a = vpn, b = vpn + 1;
	int r;

	while (a > 0 && merged_state(pool->ptes[a - 1].state))
		a--;
	while (b < pool->va_pages && merged_state(pool->ptes[b].state))
		b++;
	/* not enough frames for the whole run: one page, and hope */
	if (b - a > pool->frames_online - pool->st.frames_used)
		return uksm_break_cow(pool, vpn, 1, pool->nr_frames, 0);
	r = uksm_break_cow(pool, a, b - a, pool->nr_frames, 1);
	if (r < 0)
		return r;
	return pool->ptes[vpn].state == UKSM_PTE_NORMAL ? 1 : 0;
}

/*
 * A fault that added a frame may have taken the pool (or the faulting page's
 * group) a whole batch past its budget: evict here and now, so residency
 * stays within budget plus one batch even when nothing else runs.
 */
static void direct_reclaim(struct uksm_pool *pool, uint32_t group)
{
	size_t high = pool->max_resident + pool->reclaim_batch;

	if (pool->swap_fd < 0 || uksm_swap_backing_off(pool))
		return;
	if (high > pool->capacity_frames)
		high = pool->capacity_frames;
	if (pool->st.frames_used > high)
		uksm_reclaim_locked(pool, pool->st.frames_used - pool->max_resident, -1, 1);
	if (group < UKSM_MAX_GROUPS && pool->group_max[group] &&
	    pool->group_frames[group] > pool->group_max[group] + pool->reclaim_batch)
		uksm_reclaim_locked(pool, pool->group_frames[group] - pool->group_max[group],
				    (int)group, 1);
}

static void uksm_sigsegv(int sig, siginfo_t *si, void *uc)
{
	int saved_errno = errno;
	struct uksm_pool *pool = NULL;
	struct uksm_pte *pte;
	size_t vpn;
	int r, was_hidden;

	if (si->si_code > 0)
		pool = pool_of(si->si_addr);
	if (!pool) {
		chain(sig, si, uc);
		errno = saved_errno;
		return;
	}
	vpn = (size_t)((char *)si->si_addr - pool->va) >> UKSM_PAGE_SHIFT;
	pte = &pool->ptes[vpn];
	/* what the page was when it faulted (a racy read: only compared) */
	was_hidden = pte->state == UKSM_PTE_SWAPPED || (pte->spare[0] & UKSM_PTE_HINT);
	if (!uksm_trylock(pool)) {
		uksm_lock(pool);
		pool->st.fault_waits++;
	}
	if (was_hidden && pte->state == UKSM_PTE_KSM && !(pte->spare[0] & UKSM_PTE_HINT)) {
		/*
		 * Readable now: another thread swapped it in or lifted its hint
		 * while we waited, and this may have been a read.  Let the access
		 * retry; a write faults once more and gets its COW then.
		 */
		uksm_unlock(pool);
		errno = saved_errno;
		return;
	}
	if ((pte->state == UKSM_PTE_NORMAL || pte->state == UKSM_PTE_KSM) &&
	    (pte->spare[0] & UKSM_PTE_HINT)) {
		/* a reference hint: the page is in use; a write to a KSM page
		 * faults again, for its COW */
		if (uksm_hint_restore(pool, vpn))
			uksm_fatal("cannot give a page its protection back after a "
				   "reference hint (vm.max_map_count reached?)");
		uksm_unlock(pool);
		errno = saved_errno;
		return;
	}
	switch (pte->state) {
	case UKSM_PTE_SWAPPED:
		r = uksm_swap_in_locked(pool, vpn, pool->nr_frames);
		if (r == -EBADMSG)
			uksm_fatal("a swap slot failed its checksum: the swap file was "
				   "corrupted; refusing to return wrong data");
		if (r == -EIO)
			uksm_fatal("reading the swap file failed (EIO)");
		if (r == -ENOMEM)
			uksm_fatal("no free frame to swap a page in: pool capacity and "
				   "COW reserve exhausted");
		if (r)
			uksm_fatal("mapping a swapped-in page failed (mmap: "
				   "vm.max_map_count reached?)");
		direct_reclaim(pool, uksm_pte_group(pte));
		uksm_frames_flush(pool);
		break;
	case UKSM_PTE_NORMAL:
		/* mprotect may need a split; a fresh mmap of the same frame over
		 * the page may fuse with its neighbours instead */
		if (uksm_mprotect(page_addr(pool, vpn), PG, PROT_READ | PROT_WRITE) &&
		    uksm_map_frames(pool, vpn, 1, pte->pfn, 1))
			uksm_fatal("cannot make a page writable again (mprotect and mmap "
				   "failed: vm.max_map_count reached?)");
		break;
	case UKSM_PTE_KSM:
	case UKSM_PTE_ZERO:
		if (pool->vma_estimate + 2 > pool->vma_soft_limit) {
			r = break_cow_whole_run(pool, vpn);
		} else {
			int cut = (vpn > 0 && uksm_same_vma(pool, vpn - 1)) +
				  (vpn + 1 < pool->va_pages && uksm_same_vma(pool, vpn));

			r = uksm_break_cow(pool, vpn, 1, pool->nr_frames, 0);
			if (r == 0 && pool->swap_fd >= 0) {
				/* no frame: make one by swapping cold pages out */
				uksm_reclaim_locked(pool, pool->reclaim_batch, -1, 2);
				r = uksm_break_cow(pool, vpn, 1, pool->nr_frames, 0);
			}
			if (r == -ENOMEM)
				r = break_cow_whole_run(pool, vpn);
			else if (r == 1)
				/* what the split added, less what the new frame fused */
				pool->vma_estimate += cut -
					(vpn > 0 && uksm_same_vma(pool, vpn - 1)) -
					(vpn + 1 < pool->va_pages && uksm_same_vma(pool, vpn));
		}
		if (r == 0)
			uksm_fatal("copy-on-write break found no free frame: pool "
				   "capacity and COW reserve exhausted; the write "
				   "cannot be kept");
		if (r < 0)
			uksm_fatal("copy-on-write break could not map its new frame "
				   "(mmap failed: vm.max_map_count reached?)");
		if (pool->st.frames_used > pool->capacity_frames &&
		    pool->st.frames_used - pool->capacity_frames > pool->st.frames_reserve_used)
			pool->st.frames_reserve_used = pool->st.frames_used - pool->capacity_frames;
		direct_reclaim(pool, uksm_pte_group(pte));
		uksm_frames_flush(pool);
		break;
	default:
		uksm_unlock(pool);
		chain(sig, si, uc);
		errno = saved_errno;
		return;
	}
	uksm_unlock(pool);
	errno = saved_errno;
}

/*
 * uksm_install_handler - make uksm_sigsegv the SIGSEGV handler, remembering
 * the one it replaces for chaining.  Idempotent: returns 0 if ours was
 * already in place, 1 if it was (re)installed.  The Python layer calls this
 * whenever someone (faulthandler.enable/disable, pytest) may have replaced
 * it: a COW fault that reaches faulthandler first is a "Fatal Python error".
 */
int uksm_install_handler(void)
{
	struct sigaction cur, sa;

	if (sigaction(SIGSEGV, NULL, &cur))
		return -errno;
	if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == uksm_sigsegv)
		return 0;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = uksm_sigsegv;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	{
		int next = !atomic_load(&prev_idx);

		prev_actions[next] = cur;
		atomic_store(&prev_idx, next);
	}
	if (sigaction(SIGSEGV, &sa, NULL))
		return -errno;
	return 1;
}

/*
 * faulthandler.disable() put our handler back itself (it was faulthandler's
 * own predecessor): the handler we chain to is then the one we had before
 * faulthandler came, kept in the other slot.
 */
void uksm_handler_pop_prev(void)
{
	atomic_store(&prev_idx, !atomic_load(&prev_idx));
}

int uksm_handler_installed(void)
{
	struct sigaction cur;

	if (sigaction(SIGSEGV, NULL, &cur))
		return 0;
	return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == uksm_sigsegv;
}
