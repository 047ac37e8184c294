/* Token shards and the sample order (model spec §6).
 *
 * A shard is llm.c's format: 256 int32 header ([0] = 20240520 magic, [1] = 1 version,
 * [2] = token count), then uint16 tokens. A sample is a window of T+1 tokens starting at k·T in
 * a shard (k = 0 .. floor((count-1)/T)-1); the window index space is the concatenation of the
 * shards in the given order, N windows in all. Epoch ep visits windows in the Fisher–Yates
 * permutation drawn from (seed, ep) with the PRNG of rng.h. Sequence j of micro-batch m of step
 * s is window perm[(s·M·b + m·b + j) mod N] in epoch floor((s·M·b + m·b + j)/N).
 * The permutation of epoch ep, PINNED: r = sy_rng_key(seed, "data.perm", ep, 0, 0);
 * perm = [0, 1, ..., N-1]; for i = N-1 down to 1: k = sy_rng_below(&r, i+1), swap perm[i], perm[k].
 *
 * Local shards are read with pread (not memory-mapped: a shard truncated under a mapping would
 * kill the process with SIGBUS); s3:// entries (data_s3.h) are listed and read whole into
 * memory. Opening validates every shard (header, size, every token < vocab) and fails with a
 * message naming the file or URL. A local shard that is truncated, rewritten or replaced while
 * in use makes the next batch an error naming the file (SY_EIO), never a crash or other tokens.
 *
 * Ownership: sy_data_t owns its buffers and descriptors; sy_data_destroy() frees them. Thread: one thread at a time
 * per sy_data_t (the permutation cache is mutable). */
#ifndef SY_DATA_H
#define SY_DATA_H

#include <stdint.h>

#include "base/status.h"

#define SY_SHARD_MAGIC 20240520
#define SY_SHARD_VERSION 1
#define SY_SHARD_HEADER_INTS 256

typedef struct sy_data sy_data_t;

/* Expands globs in `patterns` (in order; each glob's matches sorted; s3:// patterns as in
 * data_s3.h), maps or reads and validates every shard. Fails if no shard matches or if the shards hold no full window. */
sy_status sy_data_open(const char *const *patterns, int n_patterns, int vocab_size, int seq_len,
                       sy_data_t **out);
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

/* Window id (into 0..N-1) of the sample with global index `idx` for this seed. */
uint64_t sy_data_window_of(sy_data_t *d, uint64_t seed, uint64_t idx);

/* Training batch: writes b rows of T+1 tokens (int32) for micro-batch m of step s, row j =
 * window of sample index sy_data_sample_index(s, M, b, m, j). */
sy_status sy_data_train_batch(sy_data_t *d, uint64_t seed, int64_t step, int M, int b, int m,
                              int32_t *tokens /* [b, T+1] */);

/* Evaluation batch: windows first_window .. first_window+b-1 in order, no shuffle (wrapping
 * modulo N). */
sy_status sy_data_eval_batch(sy_data_t *d, uint64_t first_window, int b,
                             int32_t *tokens /* [b, T+1] */);

/* Writes one shard file (header + tokens) atomically (temp file, fsync, rename). */
sy_status sy_data_write_shard(const char *path, const uint16_t *tokens, uint64_t count);

/* One shard opened and validated like a training shard (header, size, every token < vocab_size),
 * then closed: its token count. */
sy_status sy_data_shard_count(const char *path, int vocab_size, uint64_t *count);

/* One whole shard read into memory and validated: *mem (malloc'ed; the caller frees it) holds the
 * file, *tokens points at its *count tokens inside *mem. */
sy_status sy_data_read_shard(const char *path, int vocab_size, void **mem,
                             const uint16_t **tokens, uint64_t *count);

#endif
