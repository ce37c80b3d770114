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
 * the work, or refuse it) is uksm/pool.py's business.
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
 * fork: the child inherits the word as the forking thread left it; the
 * Python fork hooks take every pool's policy lock before fork and give it
 * back in both processes (uksm_plock_unlock does not check the owner, since
 * the child's forking thread has a new tid).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "uksm.h"

static inline uint32_t plock_tid(void)
{
	return (uint32_t)syscall(SYS_gettid);
}

/*
 * uksm_plock_lock - take the policy lock at @word.  Returns 1 when taken,
 * 0 when @blocking is 0 and another thread holds it, -EDEADLK when the
 * calling thread holds it already.
 */
int uksm_plock_lock(uint32_t *word, int blocking)
{
	_Atomic uint32_t *w = (_Atomic uint32_t *)word;
	uint32_t me = plock_tid();
	uint32_t c = 0;

	if (atomic_compare_exchange_strong(w, &c, me))
		return 1;
	if ((c & FUTEX_TID_MASK) == me)
		return -EDEADLK;
	if (!blocking)
		return 0;
	for (;;) {
		if (!syscall(SYS_futex, word, FUTEX_LOCK_PI_PRIVATE, 0, NULL, NULL, 0))
			return 1;
		if (errno == EDEADLK)
			return -EDEADLK;
		if (errno != EINTR && errno != EAGAIN)
			return -errno;
	}
}

/*
 * uksm_plock_unlock - drop the policy lock.  In a forked child the word
 * still names the parent's thread (the fork hooks held it across fork), and
 * the kernel refuses FUTEX_UNLOCK_PI to a non-owner: only this thread lives
 * on there, so the word is simply cleared.
 */
void uksm_plock_unlock(uint32_t *word)
{
	_Atomic uint32_t *w = (_Atomic uint32_t *)word;
	uint32_t me = plock_tid();

	if (atomic_compare_exchange_strong(w, &me, 0))
		return;
	if (syscall(SYS_futex, word, FUTEX_UNLOCK_PI_PRIVATE, 0, NULL, NULL, 0))
		atomic_store(w, 0);
}

/* uksm_plock_owned - 1 if the calling thread holds the policy lock. */
int uksm_plock_owned(const uint32_t *word)
{
	uint32_t c = atomic_load((_Atomic uint32_t *)word);

	return c && (c & FUTEX_TID_MASK) == plock_tid();
}
