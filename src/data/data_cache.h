/* A bounded on-disk cache of byte ranges of remote token shards (data.cache_dir, data.cache_gb).
 *
 * An entry is one range [off, off + len) of one object version: the key is (URL, ETag, off,
 * len), so a changed object (new ETag) never hits an entry of the old one. Layout under DIR:
 *
 *     DIR/sy-data-v1/<16 hex: hash(URL, ETag)>/<off >> 24, hex>/<off hex>.<len hex>
 *     DIR/sy-data-v1/tmp/<pid>.<counter>          entries being written
 *
 * An entry file is a 32-byte header (magic "SYDC", version, hash of the key, payload length,
 * FNV-1a-64 of the payload) then the payload. It is written to tmp/ and renamed into place, so
 * readers (other processes on the host sharing DIR) see a whole entry or none; a reader checks
 * header, length and checksum, so a torn file (a crash before the data reached the disk) is a
 * miss, deleted, never served. A writer killed mid-entry leaves only a tmp file, which no read
 * trusts and which a later open or eviction removes (its pid is gone).
 *
 * Bound: the bytes of entry files, kept at about max_bytes: a hit sets the entry's mtime (LRU
 * clock); when this process's estimate of the total passes max_bytes its eviction thread takes
 * the folder's eviction lock (flock, non-blocking: another process evicting is enough), walks
 * the tree and deletes the least recently used entries down to 90 % of max_bytes (a walk of a
 * big cache never delays a read). Several processes sharing
 * the folder may overshoot between their walks by the bytes they wrote since.
 *
 * Test hook: with SY_DATA_CACHE_TEST_CRASH=N in the environment, the process sends itself SIGKILL
 * half-way through writing its N-th entry (tests of a writer killed mid-entry).
 *
 * Errors of the cache (a full disk, a read-only folder) never fail a read: a put that fails is
 * counted and dropped (logged once), a get that fails is a miss.
 *
 * Ownership: the cache owns its strings. Thread: any; get and put may run on several threads. */
#ifndef SY_DATA_CACHE_H
#define SY_DATA_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct sy_data_cache sy_data_cache_t;

typedef struct {
    uint64_t hits, misses;  /* get calls */
    uint64_t bytes_read;    /* payload bytes served from the cache */
    uint64_t bytes_written; /* payload bytes put */
    uint64_t put_failures;  /* puts dropped (I/O errors) */
    uint64_t rejected;      /* entries found torn or corrupt (deleted, then a miss) */
    uint64_t evicted;       /* entry files deleted to stay under the bound */
} sy_data_cache_stats;

/* Creates DIR/sy-data-v1 if needed, removes tmp files of dead writers, sums the entries. */
sy_status sy_data_cache_open(const char *dir, uint64_t max_bytes, sy_data_cache_t **out);
void sy_data_cache_destroy(sy_data_cache_t **self_p);

/* 1 and buf filled with the entry's len bytes on a hit; 0 on a miss (never an error). */
int sy_data_cache_get(sy_data_cache_t *c, const char *url, const char *etag, uint64_t off, size_t len, void *buf);
/* Stores an entry (replacing an equal one); may evict. Failures are counted, not returned. */
void sy_data_cache_put(sy_data_cache_t *c, const char *url, const char *etag, uint64_t off, size_t len,
                       const void *buf);

/* Trims now, on the caller's thread, if the estimate is past the bound (tests; the eviction
 * thread does this by itself). */
void sy_data_cache_trim(sy_data_cache_t *c);

void sy_data_cache_get_stats(sy_data_cache_t *c, sy_data_cache_stats *out);
/* The estimate of the bytes the folder's entries take (for tests and logs). */
uint64_t sy_data_cache_bytes(sy_data_cache_t *c);

#endif
