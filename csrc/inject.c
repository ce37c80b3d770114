// SPDX-License-Identifier: MIT
/*
 * inject.c - make the core's own syscalls fail on purpose, for the tests:
 * every failure path (VMA limit, full tmpfs, I/O errors) must degrade or
 * raise cleanly and lose nothing, and waiting for the real conditions is
 * slow or impossible on a test machine.  See uksm_injected().
 */
#include "uksm_internal.h"

struct uksm_inject_op uksm_injects[UKSM_OP_NR];

/* Arm @op: after @skip good calls, fail @fail calls (< 0: forever) with @err;
 * @fail == 0 disarms. */
int uksm_inject(int op, long skip, long fail, int err)
{
	if (op < 0 || op >= UKSM_OP_NR || err <= 0)
		return -EINVAL;
	atomic_store(&uksm_injects[op].fail, 0);
	atomic_store(&uksm_injects[op].skip, skip);
	atomic_store(&uksm_injects[op].err, err);
	atomic_store(&uksm_injects[op].fail, fail);
	return 0;
}

long uksm_inject_hits(int op)
{
	if (op < 0 || op >= UKSM_OP_NR)
		return -EINVAL;
	return atomic_load(&uksm_injects[op].hits);
}
