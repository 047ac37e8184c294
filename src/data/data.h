/* Token shards and the sample order (model spec §6).
 *
 * A shard is llm.c's format: 256 int32 header ([0] = 20240520 magic, [1] = 1 version,
 * [2] = token count), then uint16 tokens. A sample is a window of T+1 tokens starting at k·T in
 * a shard (k = 0 .. floor((count-1)/T)-1); the window index space is the concatenation of the
 * shards in the given order, N windows in all. Epoch ep visits windows in a permutation perm of
 * [0, N) keyed by (seed, ep) (data.order). Sequence j of micro-batch m of step s is window
 * perm[(s·M·b + m·b + j) mod N] in epoch floor((s·M·b + m·b + j)/N).
 * The permutations, PINNED (model spec §6):
 *   feistel (the default): h = the smallest integer >= 1 with 4^h >= N, mask = 2^h - 1;
 *     r = sy_rng_key(seed, "data.order", ep, 0, 0); k_j = sy_rng_next(&r) for j = 0..5 in order;
 *     F(x): L = x >> h, R = x & mask; for j = 0..5: (L, R) = (R, L ^ (sy_mix64(R ^ k_j) & mask));
 *     F(x) = L << h | R (a bijection of [0, 4^h)); perm[i] = F(i), then F again while >= N
 *     (cycle walking: a bijection of [0, N); fewer than 4 rounds of F per sample on average).
 *     Computed per sample: no memory, no start-up cost, whatever N.
 *   fisher-yates (runs whose config predates data.order): r = sy_rng_key(seed, "data.perm", ep,
 *     0, 0); perm = [0, 1, ..., N-1]; for i = N-1 down to 1: k = sy_rng_below(&r, i+1), swap
 *     perm[i], perm[k]. Two epochs' tables are kept (4 bytes a window each while N < 2^32).
 *
 * Local shards are read with pread (not memory-mapped: a shard truncated under a mapping would
 * kill the process with SIGBUS); open checks each one's header and size only, so opening (and
 * re-opening at every new generation) costs a few reads per shard whatever the corpus size, and
 * every window's tokens are checked (< vocab) as it is read: a bad token is an error naming the
 * shard and the token's index at the batch that reads it (SY_EFORMAT). sy_data_validate checks
 * everything up front (`switchyard data check`). s3:// shards (data_s3.h) are streamed by default: open reads each header only (one ranged GET
 * per shard, in parallel, pinning the object's size and ETag), and a batch reads just its windows
 * by ranged GETs, coalesced per shard (windows that touch share one read; gaps are never read),
 * through the optional on-disk cache (data_cache.h; only objects served with an ETag), checking every token < vocab as it
 * arrives. With data.stream = false they are read whole into memory and validated at open.
 * Opening fails with a message naming the file or URL. A shard that is truncated, rewritten,
 * replaced or removed while in use makes the next batch that reads it an error naming it
 * (SY_EIO), never a crash or other tokens.
 *
 * Reading ahead: sy_data_plan tells the reader which micro-batches this process will ask for
 * (the step, M, b, rank and world fix them, model spec §6); a prefetch thread then reads up to
 * `prefetch_steps` steps ahead (data_prefetch.h), so a step finds its windows in memory. A batch
 * outside the plan is read on the caller's thread. The tokens of a batch never depend on how
 * they were read.
 *
 * Ownership: sy_data_t owns its buffers, descriptors, stores and threads; sy_data_destroy() stops
 * and frees them (and logs the read counters when remote shards were read). Thread: one caller
 * thread at a time per sy_data_t; its own threads (prefetch, fetch crew) are internal. */
#ifndef SY_DATA_H
#define SY_DATA_H

#include <stdint.h>

#include "base/config.h"
#include "base/status.h"

#define SY_SHARD_MAGIC 20240520
#define SY_SHARD_VERSION 1
#define SY_SHARD_HEADER_INTS 256

typedef struct sy_data sy_data_t;

/* How shards are read (the data.* config fields; equal defaults). */
#define SY_DATA_DEFAULT_PREFETCH 2
#define SY_DATA_DEFAULT_FETCH_THREADS 8
typedef struct {
    int stream;           /* s3:// shards: read by ranges (1) or whole at open (0) */
    int prefetch_steps;   /* steps read ahead on the prefetch thread (0: none) */
    int fetch_threads;    /* reads in flight at once (>= 1) */
    const char *cache_dir;/* on-disk cache of remote ranges (NULL: none); copied at open */
    uint64_t cache_bytes; /* its bound */
    int order;            /* sy_data_order (config.h); default SY_ORDER_FEISTEL */
} sy_data_options;

void sy_data_options_default(sy_data_options *o);
void sy_data_options_from_config(const sy_config_t *cfg, sy_data_options *o);

/* What the reader did (counters since open). used_bytes: bytes of the windows handed out in
 * batches; fetched_bytes: bytes read from object storage by ranges (headers apart). */
typedef struct {
    uint64_t header_bytes, fetched_bytes, requests, used_bytes;
    uint64_t cache_hits, cache_misses, cache_bytes_read, cache_bytes_written, cache_rejected, cache_evicted;
    uint64_t prefetched, prefetch_waits; /* micro-batches served by the prefetcher; of them, waited for */
} sy_data_stats;

/* Expands globs in `patterns` (in order; each glob's matches sorted; s3:// patterns as in
 * data_s3.h) and opens every shard: local ones by their header and size, streamed s3:// ones by
 * their headers (read in parallel), others read whole and validated. Fails if no shard matches or if
 * the shards hold no full window. */
sy_status sy_data_open(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                       sy_data_t **out);
/* The same with options (sy_data_open: the defaults without prefetching). */
sy_status sy_data_open_with(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                            const sy_data_options *opts, sy_data_t **out);
void sy_data_destroy(sy_data_t **self_p);

/* Expands `patterns` as sy_data_open does (globs; s3:// listings) without reading any shard:
 * SY_OK if every pattern names at least one file or object, else the error naming the first
 * that does not (a cheap check before starting processes that will read the data). */
sy_status sy_data_check_patterns(const char *const *patterns, int n_patterns);

uint64_t sy_data_windows(const sy_data_t *d);        /* N */
int sy_data_shards(const sy_data_t *d);
const char *sy_data_shard_path(const sy_data_t *d, int i);
int sy_data_seq_len(const sy_data_t *d);            /* T */

/* Global index of sequence j of micro-batch m of step s (before the permutation):
 * s·M·b + m·b + j. Exposed for tests and for the data position in manifests. */
uint64_t sy_data_sample_index(int64_t step, int M, int b, int m, int j);

/* Window id (into 0..N-1) of the sample with global index `idx` for this seed. Thread: any (the
 * permutation cache is locked; the prefetch thread uses it too). */
uint64_t sy_data_window_of(sy_data_t *d, uint64_t seed, uint64_t idx);

/* The feistel permutation of [0, N) for (seed, epoch) (the PINNED recipe above), for tests and
 * tools: sy_data_feistel_key once per epoch, then sy_data_feistel(&f, i) = perm[i]. */
#define SY_FEISTEL_ROUNDS 6
typedef struct {
    uint64_t N, key[SY_FEISTEL_ROUNDS];
    int half; /* h */
} sy_feistel_t;
void sy_data_feistel_key(sy_feistel_t *f, uint64_t N, uint64_t seed, uint64_t epoch);
uint64_t sy_data_feistel(const sy_feistel_t *f, uint64_t i);

/* Training batch: writes b rows of T+1 tokens (int32) for micro-batch m of step s, row j =
 * window of sample index sy_data_sample_index(s, M, b, m, j). */
sy_status sy_data_train_batch(sy_data_t *d, uint64_t seed, int64_t step, int M, int b, int m,
                              int32_t *tokens /* [b, T+1] */);

/* The caller is about to train `step` as rank `rank` of `world` (micro-batches m with
 * m % world == rank, M per step, b sequences each) and will stop before end_step: the prefetcher
 * (if any) reads ahead from here. Call it before every step; an unchanged plan costs a lock. */
sy_status sy_data_plan(sy_data_t *d, uint64_t seed, int64_t step, int64_t end_step, int M, int b, int rank,
                       int world);

void sy_data_get_stats(sy_data_t *d, sy_data_stats *out);

/* Evaluation batch: windows first_window .. first_window+b-1 in order, no shuffle (wrapping
 * modulo N). */
sy_status sy_data_eval_batch(sy_data_t *d, uint64_t first_window, int b,
                             int32_t *tokens /* [b, T+1] */);

/* Writes one shard file (header + tokens) atomically (temp file, fsync, rename). */
sy_status sy_data_write_shard(const char *path, const uint16_t *tokens, uint64_t count);

/* One shard opened and validated whole (header, size, every token < vocab_size), then closed:
 * its token count. */
sy_status sy_data_shard_count(const char *path, int vocab_size, uint64_t *count);

/* Every shard of `patterns` (expanded as sy_data_open does) validated whole, one at a time
 * (s3:// objects are read whole, one at a time): header, size, every token < vocab_size. Counts
 * the shards, tokens and windows of seq_len + 1 tokens; `each` (or NULL) is called after each
 * shard that passes. Stops at the first bad shard with the error naming it. */
typedef struct {
    uint64_t shards, tokens, windows;
} sy_data_check_counts;
sy_status sy_data_validate(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                           void (*each)(const char *path, uint64_t tokens, void *arg), void *arg,
                           sy_data_check_counts *counts);

/* One whole shard read into memory and validated: *mem (malloc'ed; the caller frees it) holds the
 * file, *tokens points at its *count tokens inside *mem. */
sy_status sy_data_read_shard(const char *path, int vocab_size, void **mem,
                             const uint16_t **tokens, uint64_t *count);

#endif
