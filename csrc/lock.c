// SPDX-License-Identifier: MIT
/*
 * The policy lock: the lock the Python side of a pool (its scanner, its
 * buffer records, its stats) is run under.
 *
 * It is not pool->lock.  pool->lock is held only inside the C core, which
 * never runs Python, so nothing can re-enter it.  The policy lock is held
 * across Python code, and Python code can be interrupted in the very thread
 * that holds it: the garbage collector runs finalizers at any allocation,
 * and signal handlers run between any two bytecodes of the main thread.  A
 * finalizer or handler that calls the pool would wait for itself.
 *
 * So the lock must tell "held by someone else: wait" from "held by this
 * very thread, further up the stack: do not wait", and it must tell it
 * atomically.  threading.Lock plus an owner attribute cannot: a handler
 * that runs between the acquire and the store of the owner sees a lock held
 * by nobody and waits forever.  Here the word itself is the owner's tid,
 * as in a PI futex: taking the lock and naming the owner are one
 * compare-and-exchange, and a caller that finds its own tid there gets
 * -EDEADLK back instead of a wait.  What the Python side does then (queue
 * the work, or refuse it) is uksm/policy.py's business.
 *
 * The word is a PI futex's: 0 free, else the owner's tid, with FUTEX_WAITERS
 * set by the kernel while others wait.  The kernel's FUTEX_LOCK_PI queues
 * a waiter and FUTEX_UNLOCK_PI hands the lock straight to it, so a thread
 * that releases and at once wants the lock again (the scanner thread, at
 * sleep_millisecs=0, does nothing else) cannot starve the program's own
 * calls, as it could with a plain futex, where the releaser wins the race
 * back.  Priority inheritance itself is a side effect we do not need.
 * Waiting happens with the GIL released (cffi drops it around every call),
 * so the holder, which may need the GIL to finish its Python section,
 * always gets it.  A signal does not end the wait; the interpreter runs its
 * Python handler once we return, holding the lock, where the handler's pool
 * calls see the lock as their own.
 *
 * Signals.  A Python signal handler may raise (KeyboardInterrupt is one),
 * and an exception in the middle of a section would leave the scanner's
 * trees half updated.  So a thread blocks the asynchronous signals for as
 * long as it holds any policy lock (a depth count per thread: the fork hooks
 * hold every pool's at once), from before it takes the lock until after it
 * gives it back: a signal that arrives meanwhile stays pending and is taken,
 * and its Python handler run, once the section is over.  The synchronous
 * signals (SIGSEGV, SIGBUS: the fault handler's; SIGILL, SIGFPE, SIGTRAP,
 * SIGSYS) stay open.  Python runs handlers in its main thread whichever
 * thread took the signal, so a program with threads of its own can still
 * see a handler run inside a section, nested; uksm's scanner thread keeps
 * the asynchronous signals blocked for its whole life, so as not to be the
 * thread they are delivered to.
 *
 * fork: the child inherits the word as the forking thread left it: the
 * Python fork hooks take every pool's policy lock before fork (but one this
 * thread holds already, further up the stack) and give them back in both
 * processes; in the child, uksm_plock_adopt first renames the child's
 * thread as the owner of every word the forking thread held.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uksm.h"

static __thread unsigned int plock_depth;
static __thread sigset_t plock_saved;

/*
 * The caller's tid, cached per thread: a pool call takes and drops the lock
 * at least once, and gettid is a syscall.  A forked child's thread starts
 * with its parent's copy of the cache, so the fork hook clears it.
 */
static __thread uint32_t plock_cached_tid;

static void plock_atfork_child(void)
{
	plock_cached_tid = 0;
}

__attribute__((constructor)) static void plock_init(void)
{
	pthread_atfork(NULL, NULL, plock_atfork_child);
}

static inline uint32_t plock_tid(void)
{
	if (!plock_cached_tid)
		plock_cached_tid = (uint32_t)syscall(SYS_gettid);
	return plock_cached_tid;
}

/* Block the asynchronous signals in this thread, the first time round. */
static void plock_mask(void)
{
	sigset_t async;

	if (plock_depth++)
		return;
	sigfillset(&async);
	sigdelset(&async, SIGSEGV);
	sigdelset(&async, SIGBUS);
	sigdelset(&async, SIGILL);
	sigdelset(&async, SIGFPE);
	sigdelset(&async, SIGTRAP);
	sigdelset(&async, SIGSYS);
	pthread_sigmask(SIG_BLOCK, &async, &plock_saved);
}

static void plock_unmask(void)
{
	if (plock_depth && !--plock_depth)
		pthread_sigmask(SIG_SETMASK, &plock_saved, NULL);
}

/* uksm_block_async_signals - for a thread of uksm's own, for good. */
void uksm_block_async_signals(void)
{
	plock_mask();
}

/*
 * uksm_plock_lock - take the policy lock at @word.  Returns UKSM_PLOCK_TAKEN,
 * UKSM_PLOCK_BUSY when @blocking is 0 and another thread holds it,
 * UKSM_PLOCK_NESTED when the calling thread holds it already (further up
 * its stack), or -errno when the kernel refuses the wait: -EDEADLK there is
 * the kernel's own deadlock detection (two threads taking two pools' locks
 * in opposite orders), never the nested case.
 */
int uksm_plock_lock(uint32_t *word, int blocking)
{
	_Atomic uint32_t *w = (_Atomic uint32_t *)word;
	uint32_t me = plock_tid();
	uint32_t c = 0;

	plock_mask();
	if (atomic_compare_exchange_strong(w, &c, me))
		return UKSM_PLOCK_TAKEN;
	if ((c & FUTEX_TID_MASK) == me) {
		plock_unmask();
		return UKSM_PLOCK_NESTED;
	}
	if (!blocking) {
		plock_unmask();
		return UKSM_PLOCK_BUSY;
	}
	for (;;) {
		int err;

		if (!syscall(SYS_futex, word, FUTEX_LOCK_PI_PRIVATE, 0, NULL, NULL, 0))
			return UKSM_PLOCK_TAKEN;
		err = errno;
		if (err == EINTR || err == EAGAIN)
			continue;
		plock_unmask();
		return -err;
	}
}

/*
 * uksm_plock_unlock - drop the policy lock the calling thread holds (a
 * forked child adopts its words first).  With waiters queued, the kernel
 * hands it to one of them.
 */
void uksm_plock_unlock(uint32_t *word)
{
	_Atomic uint32_t *w = (_Atomic uint32_t *)word;
	uint32_t me = plock_tid();

	if (!atomic_compare_exchange_strong(w, &me, 0))
		syscall(SYS_futex, word, FUTEX_UNLOCK_PI_PRIVATE, 0, NULL, NULL, 0);
	plock_unmask();
}

/*
 * uksm_plock_unlock_if_owned - drop the policy lock if this thread holds
 * it: the clean-up after a Python signal handler raised as the call that
 * took it returned, before the caller could note that it had.
 */
void uksm_plock_unlock_if_owned(uint32_t *word)
{
	if (uksm_plock_owned(word))
		uksm_plock_unlock(word);
}

/* uksm_plock_owned - 1 if the calling thread holds the policy lock. */
int uksm_plock_owned(const uint32_t *word)
{
	uint32_t c = atomic_load((_Atomic uint32_t *)word);

	return c && (c & FUTEX_TID_MASK) == plock_tid();
}

/*
 * uksm_plock_adopt - in a forked child, a word the forking thread held
 * (@parent_tid: the fork hooks' own, or one further up its stack) names the
 * parent's thread: make it this thread's, so that the section goes on and
 * ends as it would have in the parent.  No other thread lives to wait on
 * it.  A word any other parent thread held would name a thread that does
 * not exist here; the fork hooks wait for those to be free.
 */
void uksm_plock_adopt(uint32_t *word, uint32_t parent_tid)
{
	_Atomic uint32_t *w = (_Atomic uint32_t *)word;

	if ((atomic_load(w) & FUTEX_TID_MASK) == parent_tid)
		atomic_store(w, plock_tid());
}
