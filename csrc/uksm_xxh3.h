/* SPDX-License-Identifier: MIT */
/*
 * uksm_xxh3.h - our own XXH3 64-bit hash, so that building needs no
 * system xxhash.h.
 *
 * uksm_xxh3_64() returns exactly what the reference XXH3_64bits() returns
 * (seed 0, default secret) for every input length; checksums computed by
 * either one can be compared.  It reads only @data and a constant table:
 * no allocation, no writable state, so the SIGSEGV handler may call it.
 */
#ifndef UKSM_XXH3_H
#define UKSM_XXH3_H

#include <stddef.h>
#include <stdint.h>

uint64_t uksm_xxh3_64(const void *data, size_t len);

#endif /* UKSM_XXH3_H */
