// SPDX-License-Identifier: MIT
/*
 * swaphelper.c - the C half of uksm.bench.swapbench, built by cffi as
 * uksm.bench._swaphelper (csrc/build_bench.py).
 *
 * The swap benchmark sets uksm's swap path beside two yardsticks: the raw
 * I/O of the same file system (the floor), and the kernel's own swap.  Both
 * must be timed without an interpreter in the loop: a Python loop over
 * 65536 page reads costs as much as the reads themselves once the pages are
 * in the page cache.  So every timed loop lives here, and the same loop
 * reads uksm's array and the kernel side's anonymous memory.
 *
 *   swapbench_floor()      the floor on one directory's file system: a file
 *                          of the array's size written with pwritev (256
 *                          pages a call, as csrc/swap.c's writeback), then
 *                          fsync'ed and dropped from the page cache with
 *                          POSIX_FADV_DONTNEED; read back with plain pread,
 *                          1 MiB a call, in order (the disk's sequential
 *                          floor); random 4 KiB preads, cold and warm; and
 *                          the punch of one written-back slot.
 *   swapbench_read_seq()   read every word of a mapping in address order
 *                          (a sequential read of a swapped array).
 *   swapbench_read_pages() read one word of each listed page, in the
 *                          order given (random 4 KiB access).
 *   swapbench_child()      the kernel side's workload, run in a forked
 *                          child put into a memory cgroup and driven over
 *                          a pipe: fill, read, rand K, dirty, quit.  It never
 *                          returns to Python: the caller _exit()s with its
 *                          result.
 *
 * Nothing here writes to stdout or exits on error: a failure comes back as
 * -errno with the failing call's name, so the benchmark can say what broke.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "swaphelper.h"

#define PG		4096
#define IOV_BATCH	256		/* csrc/swap.c: pages per pwritev */
#define SEQ_CHUNK	(1 << 20)	/* the floor's sequential pread size */

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static void shuffle(size_t *a, size_t n, uint64_t *s)
{
	for (size_t i = n; i > 1; i--) {
		size_t j = xorshift(s) % i, t = a[i - 1];

		a[i - 1] = a[j];
		a[j] = t;
	}
}

long swapbench_majflt(void)
{
	struct rusage r;

	getrusage(RUSAGE_SELF, &r);
	return r.ru_majflt;
}

static int open_tmp(const char *dir)
{
	char path[4096];
	int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);

	if (fd >= 0)
		return fd;
	snprintf(path, sizeof(path), "%s/uksm-floor-XXXXXX", dir);
	fd = mkstemp(path);
	if (fd >= 0)
		unlink(path);
	return fd;
}

#define FAIL(name) do { *what = (name); ret = -errno; goto out; } while (0)

int swapbench_floor(const char *dir, size_t pages, size_t samples, uint64_t seed,
		    double *out, double *lat_cold, double *lat_warm, double *punch,
		    size_t *nsamples, const char **what)
{
	struct iovec iov[IOV_BATCH];
	uint64_t s = 0x9E3779B97F4A7C15ull ^ (seed * 0x2545F4914F6CDD1Dull);
	size_t *sample = malloc(pages * sizeof(size_t)), m = 0;
	char *buf = aligned_alloc(PG, SEQ_CHUNK);
	int fd = -1, ret = 0;
	double t;

	*what = "";
	*nsamples = 0;
	if (!sample || !buf) {
		errno = ENOMEM;
		FAIL("malloc");
	}
	fd = open_tmp(dir);
	if (fd < 0)
		FAIL("open");
	for (size_t i = 0; i < SEQ_CHUNK / 8; i++)
		((uint64_t *)buf)[i] = xorshift(&s);
	t = now();
	for (size_t i = 0; i < pages; i += IOV_BATCH) {
		size_t k = pages - i < IOV_BATCH ? pages - i : IOV_BATCH;

		for (size_t j = 0; j < k; j++) {
			iov[j].iov_base = buf + j * PG;
			iov[j].iov_len = PG;
		}
		if (pwritev(fd, iov, (int)k, (off_t)(i * PG)) != (ssize_t)(k * PG))
			FAIL("pwritev");
	}
	out[SWAPBENCH_WRITE_S] = now() - t;
	t = now();
	if (fsync(fd))
		FAIL("fsync");
	out[SWAPBENCH_SYNC_S] = now() - t;

	/* the file's pages written back: drop them, and read from the disk */
	if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED))
		FAIL("posix_fadvise");
	t = now();
	for (size_t off = 0; off < pages * PG; off += SEQ_CHUNK) {
		size_t len = pages * PG - off < SEQ_CHUNK ? pages * PG - off : SEQ_CHUNK;

		if (pread(fd, buf, len, (off_t)off) != (ssize_t)len)
			FAIL("pread");
	}
	out[SWAPBENCH_READ_SEQ_COLD_S] = now() - t;
	t = now();
	for (size_t off = 0; off < pages * PG; off += SEQ_CHUNK) {
		size_t len = pages * PG - off < SEQ_CHUNK ? pages * PG - off : SEQ_CHUNK;

		if (pread(fd, buf, len, (off_t)off) != (ssize_t)len)
			FAIL("pread");
	}
	out[SWAPBENCH_READ_SEQ_WARM_S] = now() - t;

	/* random 4 KiB preads over the whole file, cold then warm */
	for (size_t i = 0; i < pages; i++)
		sample[m++] = i;
	shuffle(sample, m, &s);
	if (m > samples)
		m = samples;
	if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED))
		FAIL("posix_fadvise");
	for (int pass = 0; pass < 2; pass++) {
		double *lat = pass ? lat_warm : lat_cold, t0 = now();

		for (size_t j = 0; j < m; j++) {
			t = now();
			if (pread(fd, buf, PG, (off_t)(sample[j] * PG)) != PG)
				FAIL("pread");
			lat[j] = now() - t;
		}
		out[pass ? SWAPBENCH_RAND_WARM_S : SWAPBENCH_RAND_COLD_S] = now() - t0;
	}
	/* what csrc/swap.c does to a slot it frees, once written back */
	for (size_t j = 0; j < m; j++) {
		t = now();
		if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			      (off_t)(sample[j] * PG), PG))
			FAIL("fallocate");
		punch[j] = now() - t;
	}
	*nsamples = m;
out:
	if (fd >= 0)
		close(fd);
	free(sample);
	free(buf);
	return ret;
}

uint64_t swapbench_read_seq(const void *p, size_t len, double *seconds)
{
	const volatile uint64_t *w = p;
	uint64_t sum = 0;
	double t = now();

	for (size_t i = 0; i < len / 8; i++)
		sum += w[i];
	*seconds = now() - t;
	return sum;
}

uint64_t swapbench_read_pages(const void *p, const int64_t *pages, size_t n, double *seconds)
{
	const char *base = p;
	uint64_t sum = 0;
	double t = now();

	for (size_t i = 0; i < n; i++)
		sum += *(const volatile uint64_t *)(base + pages[i] * PG);
	*seconds = now() - t;
	return sum;
}

static int reply(int fd, const char *text)
{
	size_t len = strlen(text);

	while (len) {
		ssize_t n = write(fd, text, len);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		text += n;
		len -= (size_t)n;
	}
	return 0;
}

/* One line from @fd (no stdio: the child shares nothing buffered). */
static int read_line(int fd, char *line, size_t size)
{
	size_t k = 0;

	while (k + 1 < size) {
		ssize_t n = read(fd, line + k, 1);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		if (line[k] == '\n')
			break;
		k++;
	}
	line[k] = 0;
	return 0;
}

int swapbench_child(int in_fd, int out_fd, size_t pages, uint64_t seed)
{
	uint64_t s = 0x9E3779B97F4A7C15ull ^ (seed * 0x2545F4914F6CDD1Dull), sink = 0;
	size_t *cand = malloc(pages * sizeof(size_t));
	int64_t *pick = malloc(pages * sizeof(int64_t));
	unsigned char *vec = malloc(pages);
	char line[256], msg[256];
	char *m;

	if (!cand || !pick || !vec)
		return 2;
	m = mmap(NULL, pages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 2;
	madvise(m, pages * PG, MADV_NOHUGEPAGE);	/* 4 KiB pages, as uksm's */
	snprintf(msg, sizeof(msg), "ready %d\n", (int)getpid());
	if (reply(out_fd, msg))
		return 2;
	while (!read_line(in_fd, line, sizeof(line))) {
		if (!strncmp(line, "fill", 4)) {
			double t = now();

			for (size_t i = 0; i < pages * PG / 8; i++)
				((uint64_t *)m)[i] = xorshift(&s);
			snprintf(msg, sizeof(msg), "ok %.9f\n", now() - t);
		} else if (!strncmp(line, "read", 4)) {
			size_t k = 0;
			long f;
			double t;

			if (mincore(m, pages * PG, vec))
				return 2;
			for (size_t i = 0; i < pages; i++)
				k += !(vec[i] & 1);
			f = swapbench_majflt();
			sink += swapbench_read_seq(m, pages * PG, &t);
			snprintf(msg, sizeof(msg), "ok %.9f %zu %ld\n", t, k,
				 swapbench_majflt() - f);
		} else if (!strncmp(line, "rand", 4)) {
			size_t want = strtoul(line + 4, NULL, 10), k = 0;
			long f;
			double t;

			if (mincore(m, pages * PG, vec))
				return 2;
			for (size_t i = 0; i < pages; i++)
				if (!(vec[i] & 1))
					cand[k++] = i;
			shuffle(cand, k, &s);
			if (k > want)
				k = want;
			for (size_t j = 0; j < k; j++)
				pick[j] = (int64_t)cand[j];
			f = swapbench_majflt();
			sink += swapbench_read_pages(m, pick, k, &t);
			snprintf(msg, sizeof(msg), "ok %.9f %zu %ld\n", t, k,
				 swapbench_majflt() - f);
		} else if (!strncmp(line, "dirty", 5)) {
			for (size_t i = 0; i < pages; i++)
				*(uint64_t *)(m + i * PG) = xorshift(&s);
			snprintf(msg, sizeof(msg), "ok\n");
		} else if (!strncmp(line, "quit", 4)) {
			break;
		} else {
			snprintf(msg, sizeof(msg), "error unknown command\n");
		}
		if (reply(out_fd, msg))
			return 2;
	}
	return (int)(sink & 0);
}
