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

static struct sigaction prev_action;
static _Atomic int chained;
static void *_Atomic chained_addr;

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

/*
 * Pass a fault that is not ours to the previous handler.  The previous one
 * may itself hand back to us (faulthandler restores its predecessor, which
 * may be us, and raises again): the second time round for the same fault we
 * stop the ping-pong and die by SIG_DFL, as the fault deserves.
 */
static void chain(int sig, siginfo_t *si, void *uc)
{
	int again = atomic_exchange(&chained, 1);
	void *last = atomic_exchange(&chained_addr, si->si_addr);

	if (again && (si->si_code <= 0 || last == si->si_addr)) {
		die_by_default(sig, si);
		return;
	}
	if (prev_action.sa_flags & SA_SIGINFO) {
		if (prev_action.sa_sigaction) {
			prev_action.sa_sigaction(sig, si, uc);
			return;
		}
	} else if (prev_action.sa_handler != SIG_DFL &&
		   prev_action.sa_handler != SIG_IGN) {
		prev_action.sa_handler(sig);
		return;
	}
	die_by_default(sig, si);
}

static struct uksm_pool *pool_of(void *addr)
{
	for (size_t slot = 0; slot < UKSM_MAX_POOLS; slot++) {
		struct uksm_pool *pool = atomic_load(&uksm_pools[slot]);

		if (pool && (char *)addr >= pool->va &&
		    (char *)addr < pool->va + pool->va_pages * PG)
			return pool;
	}
	return NULL;
}

static void uksm_sigsegv(int sig, siginfo_t *si, void *uc)
{
	int saved_errno = errno;
	struct uksm_pool *pool = si->si_code > 0 ? pool_of(si->si_addr) : NULL;
	struct uksm_pte *pte;
	size_t vpn;
	int r;

	if (!pool) {
		chain(sig, si, uc);
		errno = saved_errno;
		return;
	}
	vpn = (size_t)((char *)si->si_addr - pool->va) >> UKSM_PAGE_SHIFT;
	if (!uksm_trylock(pool)) {
		uksm_lock(pool);
		pool->st.fault_waits++;
	}
	pte = &pool->ptes[vpn];
	switch (pte->state) {
	case UKSM_PTE_NORMAL:
		if (mprotect(page_addr(pool, vpn), PG, PROT_READ | PROT_WRITE))
			uksm_fatal("cannot make a page writable again (mprotect failed: "
				   "vm.max_map_count reached?)");
		break;
	case UKSM_PTE_KSM:
	case UKSM_PTE_ZERO:
		r = uksm_break_cow(pool, vpn, 1, pool->nr_frames);
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
	prev_action = cur;
	atomic_store(&chained, 0);
	if (sigaction(SIGSEGV, &sa, NULL))
		return -errno;
	return 1;
}

int uksm_handler_installed(void)
{
	struct sigaction cur;

	if (sigaction(SIGSEGV, NULL, &cur))
		return 0;
	return (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == uksm_sigsegv;
}
