/* SPDX-License-Identifier: MIT */
/*
 * swaphelper.h - declarations of csrc/bench/swaphelper.c, and the cdef of
 * uksm.bench._swaphelper: no preprocessor lines but the constants below,
 * which cffi's parser accepts as plain integer #defines.
 */
#define SWAPBENCH_WRITE_S 0
#define SWAPBENCH_SYNC_S 1
#define SWAPBENCH_READ_SEQ_COLD_S 2
#define SWAPBENCH_READ_SEQ_WARM_S 3
#define SWAPBENCH_RAND_COLD_S 4
#define SWAPBENCH_RAND_WARM_S 5
#define SWAPBENCH_NOUT 6

int swapbench_floor(const char *dir, size_t pages, size_t samples, uint64_t seed,
		    double *out, double *lat_cold, double *lat_warm, double *punch,
		    size_t *nsamples, const char **what);
uint64_t swapbench_read_seq(const void *p, size_t len, double *seconds);
uint64_t swapbench_read_pages(const void *p, const int64_t *pages, size_t n, double *seconds);
int swapbench_child(int in_fd, int out_fd, size_t pages, uint64_t seed);
long swapbench_majflt(void);
