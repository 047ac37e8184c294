/* What data.c shares with the other files of src/data/ (the prefetcher): private to the layer.
 * Thread: as noted per function. */
#ifndef SY_DATA_INTERNAL_H
#define SY_DATA_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "data/data.h"

/* Reads windows wins[0..n) into out[n][T+1] (uint16 tokens, checked < vocab): heap shards from
 * memory, local shards with pread, remote ones from the cache or by ranged GETs, coalesced per
 * shard and run on the fetch crew. Thread: any (one crew run at a time). */
sy_status sy_data_read_windows(sy_data_t *d, const uint64_t *wins, size_t n, uint16_t *out);

#endif
