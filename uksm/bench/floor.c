/* SPDX-License-Identifier: MIT */
/*
 * floor.c - the bare cost of a userspace COW break on this machine.
 *
 * The benchmark suite compiles this at run time and sets its figures beside
 * uksm's measured COW break, taken in the same run: absolute times on these
 * VMs wander, the ratio to the floor does not.  Two floors, per 4 KiB page,
 * as the project measured them when it began (docs/architecture.md):
 *
 *   sigsegv_mprotect   a write to a read-only page, a SIGSEGV handler that
 *                      mprotects the page writable, the write retried: the
 *                      least any fault-driven write barrier can cost;
 *   cow_scattered      the whole COW break a userspace KSM must do: n user
 *                      pages all map frame 0 of a memfd read-only, one VMA
 *                      each; the handler copies frame 0 into a fresh frame
 *                      (a hole, so the copy also allocates it) through a
 *                      linear read-write alias of the memfd, maps the fresh
 *                      frame writable over the faulting page with MAP_FIXED
 *                      and returns, so the write retries;
 *   cow_run            the same break on the layout uksm's run merges
 *                      leave behind: n user pages mapping n distinct frames
 *                      read-only as one VMA, each copied out of its own
 *                      frame.
 *
 * Output is one "name value" pair a line, value in microseconds per page:
 *
 *   cc -O2 -o floor floor.c && ./floor [pages=16384]
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static int fd_cow;
static char *user, *direct;
static size_t next_fresh;
static int scattered;

/* the write barrier alone: make the page writable, retry */
static void on_segv_mprotect(int sig, siginfo_t *si, void *uc)
{
	char *page = (char *)((uintptr_t)si->si_addr & ~(uintptr_t)(PG - 1));

	(void)sig;
	(void)uc;
	mprotect(page, PG, PROT_READ | PROT_WRITE);
}

/*
 * break_cow in userspace: copy the shared frame through the direct map into
 * a fresh frame, map the fresh frame writable over the faulting page.
 */
static void on_segv_cow(int sig, siginfo_t *si, void *uc)
{
	char *page = (char *)((uintptr_t)si->si_addr & ~(uintptr_t)(PG - 1));
	size_t vpn = (size_t)(page - user) / PG;
	size_t src = scattered ? 0 : vpn;
	size_t fresh = next_fresh++;

	(void)sig;
	(void)uc;
	memcpy(direct + fresh * PG, direct + src * PG, PG);
	if (mmap(page, PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
		 fd_cow, (off_t)(fresh * PG)) == MAP_FAILED)
		_exit(3);
}

static void handle(void (*fn)(int, siginfo_t *, void *))
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = fn;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGSEGV, &sa, NULL);
}

static double sigsegv_mprotect(size_t n)
{
	int fd = memfd_create("floor-wp", 0);
	char *base;
	double t;
	size_t i;

	if (fd < 0 || ftruncate(fd, (off_t)(n * PG)))
		return -1;
	base = mmap(NULL, n * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (base == MAP_FAILED)
		return -1;
	memset(base, 0x5a, n * PG);		/* no first-touch faults in the timing */
	mprotect(base, n * PG, PROT_READ);
	handle(on_segv_mprotect);
	t = now();
	for (i = 0; i < n; i++)
		((volatile char *)base)[i * PG] = 1;
	t = now() - t;
	munmap(base, n * PG);
	close(fd);
	return t / n * 1e6;
}

/* frames 0..n-1 are the shared ones, n..2n-1 the fresh (holes) */
static double cow_break(size_t n, int scatter)
{
	volatile uint8_t sink = 0;
	double t;
	size_t i;

	fd_cow = memfd_create("floor-cow", 0);
	if (fd_cow < 0 || ftruncate(fd_cow, (off_t)(2 * n * PG)))
		return -1;
	direct = mmap(NULL, 2 * n * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd_cow, 0);
	if (direct == MAP_FAILED)
		return -1;
	memset(direct, 0x5a, n * PG);
	user = mmap(NULL, n * PG, PROT_READ, MAP_SHARED, fd_cow, 0);
	if (user == MAP_FAILED)
		return -1;
	if (scatter)
		for (i = 0; i < n; i++)
			if (mmap(user + i * PG, PG, PROT_READ, MAP_SHARED | MAP_FIXED,
				 fd_cow, 0) == MAP_FAILED)
				return -1;
	for (i = 0; i < n; i++)		/* fault the read mappings in first */
		sink += (uint8_t)user[i * PG];
	scattered = scatter;
	next_fresh = n;
	handle(on_segv_cow);
	t = now();
	for (i = 0; i < n; i++)
		((volatile char *)user)[i * PG] = 1;
	t = now() - t;
	munmap(user, n * PG);
	munmap(direct, 2 * n * PG);
	close(fd_cow);
	(void)sink;
	return t / n * 1e6;
}

int main(int argc, char **argv)
{
	size_t n = argc > 1 ? strtoul(argv[1], NULL, 0) : 16384;

	/* n isolated VMAs must stay well under vm.max_map_count */
	if (n < 1 || n > 30000)
		return fprintf(stderr, "floor: pages must be 1..30000\n"), 2;
	printf("pages %zu\n", n);
	printf("sigsegv_mprotect %.4f\n", sigsegv_mprotect(n));
	printf("cow_scattered %.4f\n", cow_break(n, 1));
	printf("cow_run %.4f\n", cow_break(n, 0));
	return 0;
}
