// SPDX-License-Identifier: MIT
/*
 * fault.c - the SIGSEGV and SIGBUS handler: the page lock's waiter, and
 * do_wp_page for cow="signal".
 *
 * In the default mode the kernel does every copy-on-write itself, and the
 * only faults uksm causes are on pages in transit: a page being merged,
 * migrated or swapped out is write-protected while pool->lock is held.  A
 * writer faults, waits here on pool->lock like a task on a locked page, and
 * retries: by then the page is a view (writable: the kernel COWs the
 * retried write) or private and writable again.
 *
 * With cow="signal", views and ZERO pages are mapped read-only, so every
 * first write to them faults here.  The handler makes the page writable
 * and writes to it itself - an atomic add of zero, which changes no byte -
 * so that the kernel's COW happens now, under pool->lock, and the page is
 * counted private at once.  A write racing in from another thread lands in
 * the same fresh copy: the kernel copies a private view once.  Near
 * vm.max_map_count the whole run of views around the page is made
 * writable instead (its ends are mapping boundaries already: no split),
 * or failing that the whole buffer; the rest of that run is then COWed by
 * the kernel as in the default mode and reconcile finds it.
 *
 * The page table says what to do, so the handler needs no decoding of
 * the fault (no REG_ERR, no ESR):
 *
 *   PRIVATE		transit is over (we waited for it): make sure it is
 *			writable, return.
 *   KSM, SWAPPED	kernel mode: as PRIVATE.  signal mode: COW as above.
 *   ZERO		signal mode: make it writable; the write allocates.
 *   NONE		not a buffer: the user touched freed memory.  Chain.
 *
 * Faults outside every pool, and signals sent by kill() or raise()
 * (si_code <= 0), go to the handler that was installed before ours, so
 * real crashes still crash, with faulthandler's traceback.  A fault on a
 * NONE page is a crash too, but one uksm can explain: the handler says so
 * on stderr (a view that outlived pool.free()) before chaining.
 *
 * SIGBUS is taken by the same handler and chained the same way.  Inside a
 * pool it means that a view points past the end of its file: someone else
 * truncated the frame store or the swap file.  Nothing can be mended; the
 * handler names the cause and chains, and the process dies of it.
 *
 * Async-signal-safe throughout: pool->lock is a futex word; the rest are
 * syscalls and atomics.  errno is saved and restored.  No memory is
 * allocated here, not even a frame: a COW can no longer fail for want of
 * one.  If even a whole-run mprotect fails, the write cannot be honoured
 * and must not be lost silently: the process ends with a message naming
 * uksm and the reason.
 */
#include "uksm_internal.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

/*
 * The handlers we replaced, for chaining: one pair for SIGSEGV, one for
 * SIGBUS, kept the same way.  Published through an index into two slots so
 * that a thread chaining while another re-installs never reads a
 * half-copied struct sigaction.
 */
#define NR_OUR_SIGS 2
static const int our_sigs[NR_OUR_SIGS] = { SIGSEGV, SIGBUS };
static struct sigaction prev_actions[NR_OUR_SIGS][2];
static _Atomic int prev_idx[NR_OUR_SIGS];

static int sig_slot(int sig)
{
	return sig == SIGBUS;
}

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

/* An address in hex, with no stdio: snprintf is not async-signal-safe. */
static void say_addr(const void *addr)
{
	uintptr_t v = (uintptr_t)addr;
	char buf[2 + 2 * sizeof(v) + 1];
	int i = (int)sizeof(buf) - 1;

	buf[i] = '\0';
	do {
		buf[--i] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v && i > 2);
	buf[--i] = 'x';
	buf[--i] = '0';
	say(buf + i);
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
	int k = sig_slot(sig);
	const struct sigaction *prev = &prev_actions[k][atomic_load(&prev_idx[k])];
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

static int view_state(uint8_t state)
{
	return state == UKSM_PTE_KSM || state == UKSM_PTE_SWAPPED ||
	       state == UKSM_PTE_ZERO;
}

/*
 * Make page @vpn writable.  mprotect of one page may need a split; near
 * the map limit, or if it fails, a wider range is made writable instead,
 * one whose ends are mapping boundaries already, so that it needs no new
 * VMA: first the run of pages in the same state (signal mode; in kernel
 * mode every page but NONE is read-write at rest, so the run of pages not
 * NONE), then the run of pages not NONE around it, which is the buffer or
 * buffers there, fenced by PROT_NONE.  A wide grant is counted: in signal
 * mode the other views it opened are then COWed by the kernel, unseen, and
 * reconcile finds them later, as in kernel mode.
 */
static int make_writable(struct uksm_pool *pool, size_t vpn)
{
	uint8_t state = pool->ptes[vpn].state;
	int64_t cut = uksm_split_cost(pool, vpn, 1);
	size_t a = vpn, b = vpn + 1;

	if (pool->vma_estimate + cut <= pool->vma_soft_limit &&
	    !uksm_mprotect(page_addr(pool, vpn), PG, PROT_READ | PROT_WRITE)) {
		pool->vma_estimate += cut;
		return 0;
	}
	pool->st.cow_wide++;
	if (pool->cow_mode == UKSM_COW_SIGNAL) {
		while (a > 0 && pool->ptes[a - 1].state == state)
			a--;
		while (b < pool->va_pages && pool->ptes[b].state == state)
			b++;
		if (!uksm_mprotect(page_addr(pool, a), (b - a) * PG, PROT_READ | PROT_WRITE))
			return 0;
	}
	while (a > 0 && pool->ptes[a - 1].state != UKSM_PTE_NONE)
		a--;
	while (b < pool->va_pages && pool->ptes[b].state != UKSM_PTE_NONE)
		b++;
	return uksm_mprotect(page_addr(pool, a), (b - a) * PG, PROT_READ | PROT_WRITE);
}

/*
 * The kernel's copy of a private view, now: a write that changes nothing.
 * volatile and atomic, so that no compiler turns it into a fence or drops
 * it: the store itself is the point.
 */
static void force_cow(struct uksm_pool *pool, size_t vpn)
{
	__atomic_fetch_add((volatile uint64_t *)page_addr(pool, vpn), 0, __ATOMIC_SEQ_CST);
}

/*
 * The same pool address faulting again and again, with nothing changing:
 * not a write mprotect can fix (an instruction fetch into a buffer, a
 * protection key).  Such a fault goes on to the previous handler, to crash
 * as it would without us, instead of spinning here for ever.
 */
#define LOOP_SLOTS 64
static struct {
	_Atomic pid_t tid;
	void *_Atomic addr;
	_Atomic unsigned count;
	_Atomic uint64_t since_ns;
} loops[LOOP_SLOTS];

static int fault_loops(void *addr)
{
	pid_t tid = my_tid();
	unsigned slot = (unsigned)tid % LOOP_SLOTS;
	uint64_t now = mono_ns();

	if (atomic_load(&loops[slot].tid) != tid || atomic_load(&loops[slot].addr) != addr ||
	    now - atomic_load(&loops[slot].since_ns) > 1000000000ull) {
		atomic_store(&loops[slot].tid, tid);
		atomic_store(&loops[slot].addr, addr);
		atomic_store(&loops[slot].since_ns, now);
		atomic_store(&loops[slot].count, 0);
	}
	return atomic_fetch_add(&loops[slot].count, 1) >= LOOP_FAULTS;
}

/*
 * A fault we only report goes on to the previous handler, which may return
 * and let it happen again (a Python-level handler does, until chain()
 * catches the loop): one message per address, not a thousand.
 */
static void *_Atomic last_said;

static int first_word(void *addr)
{
	return atomic_exchange(&last_said, addr) != addr;
}

static void uksm_sigsegv(int sig, siginfo_t *si, void *uc)
{
	int saved_errno = errno;
	struct uksm_pool *pool = NULL;
	struct uksm_pte *pte;
	size_t vpn;

	if (si->si_code > 0)
		pool = pool_of(si->si_addr);
	if (!pool) {
		chain(sig, si, uc);
		errno = saved_errno;
		return;
	}
	vpn = (size_t)((char *)si->si_addr - pool->va) >> UKSM_PAGE_SHIFT;
	pte = &pool->ptes[vpn];
	if (sig == SIGBUS) {
		/*
		 * A view reads its frame (or slot) through the page cache; a
		 * page past the file's end is a bus error.  We never shrink
		 * the store under a live view, so someone else cut it: nothing
		 * here can bring the contents back.  Say so, and let the
		 * signal take its course.
		 */
		if (si->si_code == BUS_ADRERR && first_word(si->si_addr)) {
			say("uksm: SIGBUS at ");
			say_addr(si->si_addr);
			say(" in a uksm pool");
			say(pte->state == UKSM_PTE_SWAPPED ?
			    ": the pool's swap file was truncated by someone else; "
			    "the swapped pages it held are gone\n" :
			    ": the pool's frame store (its memfd) was truncated by "
			    "someone else; the merged pages it held are gone\n");
		}
		chain(sig, si, uc);
		errno = saved_errno;
		return;
	}
	if (!uksm_trylock(pool)) {
		/*
		 * Announce ourselves before looking: the parent hook clears
		 * the flag and then waits for us before it drops the locks,
		 * so no merge can start under a page we are mending.
		 */
		atomic_fetch_add(&uksm_fork_menders, 1);
		if (atomic_load(&uksm_fork_frozen)) {
			/*
			 * A fork's prepare holds every pool->lock, and may be
			 * waiting for this very thread (another library's prepare
			 * handler joining its workers): nothing is in transit, so
			 * mend the page without the lock.  In signal mode the
			 * copy is forced here and reconcile counts it later.
			 */
			uint8_t state = pte->state;

			if (state != UKSM_PTE_NONE &&
			    !uksm_mprotect(page_addr(pool, vpn), PG, PROT_READ | PROT_WRITE)) {
				if (pool->cow_mode == UKSM_COW_SIGNAL &&
				    (state == UKSM_PTE_KSM || state == UKSM_PTE_SWAPPED))
					force_cow(pool, vpn);
				atomic_fetch_sub(&uksm_fork_menders, 1);
				errno = saved_errno;
				return;
			}
		}
		atomic_fetch_sub(&uksm_fork_menders, 1);
		uksm_lock(pool);
		pool->st.fault_waits++;
	}
	if (pte->state == UKSM_PTE_NONE) {
		uksm_futex_unlock(&pool->lock);
		/*
		 * PROT_NONE inside the pool: no buffer lives here.  The usual
		 * way to get here is a view (a slice, a memoryview) that
		 * outlived pool.free() of its array.  The crash is the right
		 * outcome; a crash that does not say why is not.
		 */
		if (first_word(si->si_addr)) {
			say("uksm: SIGSEGV at ");
			say_addr(si->si_addr);
			say(" in a uksm pool, on a page with no live buffer: a buffer "
			    "released by pool.free() while a view of it was still "
			    "alive, or memory outside any live buffer\n");
		}
		chain(sig, si, uc);
		errno = saved_errno;
		return;
	}
	if (pool->cow_mode == UKSM_COW_SIGNAL && view_state(pte->state)) {
		uint8_t state = pte->state;

		if (make_writable(pool, vpn))
			uksm_fatal("copy-on-write: cannot make a page writable, not even "
				   "its whole buffer (mprotect failed: the commit limit "
				   "or RLIMIT_DATA reached?); the write cannot be kept");
		if (state != UKSM_PTE_ZERO)
			force_cow(pool, vpn);
		/* a swapped page written counts as a swap-in, not a COW */
		pool->st.cow_signal += state == UKSM_PTE_KSM;
		uksm_page_cowed(pool, vpn);
		uksm_frames_flush(pool);
	} else {
		/*
		 * Transit is over; a failed restore is mended here.  Only here
		 * can a fault repeat with nothing changing (a COW changes the
		 * state, and its repeat lands here): counted on this path
		 * alone, so that the COW path takes no extra syscall.
		 */
		if (fault_loops(si->si_addr)) {
			uksm_unlock(pool);
			chain(sig, si, uc);
			errno = saved_errno;
			return;
		}
		pool->st.transit_faults++;
		if (make_writable(pool, vpn))
			uksm_fatal("cannot make a page writable again (mprotect failed: "
				   "vm.max_map_count reached?)");
	}
	uksm_unlock(pool);
	errno = saved_errno;
}

/*
 * uksm_install_handler - make uksm_sigsegv the SIGSEGV and SIGBUS handler,
 * remembering the ones it replaces for chaining.  Idempotent: returns 0 if
 * ours was already in place for both, 1 if it was (re)installed for either.
 * The Python layer calls this whenever someone (faulthandler.enable/disable,
 * signal.signal, pytest) may have replaced it: a COW fault that reaches
 * another handler first is a "Fatal Python error", or spins for ever.
 */
int uksm_install_handler(void)
{
	int ret = 0;

	for (int k = 0; k < NR_OUR_SIGS; k++) {
		struct sigaction cur, sa;
		int next;

		if (sigaction(our_sigs[k], NULL, &cur))
			return -errno;
		if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == uksm_sigsegv)
			continue;
		memset(&sa, 0, sizeof(sa));
		sa.sa_sigaction = uksm_sigsegv;
		sigemptyset(&sa.sa_mask);
		sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
		next = !atomic_load(&prev_idx[k]);
		prev_actions[k][next] = cur;
		atomic_store(&prev_idx[k], next);
		if (sigaction(our_sigs[k], &sa, NULL))
			return -errno;
		ret = 1;
	}
	return ret;
}

/*
 * faulthandler.disable() put our handler back itself (it was faulthandler's
 * own predecessor, for SIGSEGV and SIGBUS alike): the handler we chain to is
 * then the one we had before faulthandler came, kept in the other slot.
 */
void uksm_handler_pop_prev(void)
{
	for (int k = 0; k < NR_OUR_SIGS; k++)
		atomic_store(&prev_idx[k], !atomic_load(&prev_idx[k]));
}

int uksm_handler_installed(void)
{
	for (int k = 0; k < NR_OUR_SIGS; k++) {
		struct sigaction cur;

		if (sigaction(our_sigs[k], NULL, &cur))
			return 0;
		if (!(cur.sa_flags & SA_SIGINFO) || cur.sa_sigaction != uksm_sigsegv)
			return 0;
	}
	return 1;
}
