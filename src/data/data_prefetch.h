/* The prefetcher: a thread that reads, a configurable number of steps ahead, the windows of the
 * micro-batches this process will train on (model spec §6: which windows a micro-batch uses
 * follows from the step, so the plan is (seed, M, b, rank, world) and a first step).
 *
 * Slots: depth + 1 step buffers (the current step and `depth` ahead), filled in step order on
 * the prefetcher's own thread, which owns a slot while it fills it; the trainer's thread copies
 * out of a filled slot. A new plan (another world, rank or batch shape: a new generation) or a
 * step outside the slots drops what was read and starts again from that step; no read goes past
 * the plan's end step. Memory: (depth + 1) · ceil(M / world) · b · (T + 1) · 2 bytes.
 *
 * Waits: sy_prefetch_take waits for the prefetcher's read of its step, which is bounded by the
 * store's timeouts and retries (store_s3.h) like a read on the trainer's own thread would be.
 *
 * Thread: sy_prefetch_plan and sy_prefetch_take from one thread (the trainer's). */
#ifndef SY_DATA_PREFETCH_H
#define SY_DATA_PREFETCH_H

#include <stdint.h>

#include "data/data.h"

typedef struct sy_prefetch sy_prefetch_t;

typedef struct {
    uint64_t seed;
    int64_t end_step; /* steps >= end_step are never read */
    int M, b, rank, world;
} sy_prefetch_plan_t;

sy_status sy_prefetch_new(sy_data_t *d, int depth, sy_prefetch_t **out);
/* Stops the thread (after its current read) and frees the slots. */
void sy_prefetch_destroy(sy_prefetch_t **self_p);

/* The trainer is about to run `step` under `plan`. */
void sy_prefetch_plan(sy_prefetch_t *p, const sy_prefetch_plan_t *plan, int64_t step);

/* When micro-batch m of `step` is in the plan: waits for its step's read, copies its b rows of
 * T+1 tokens into tokens, sets *st (the read's status; its message on this thread) and returns
 * 1. Otherwise returns 0 and the caller reads the micro-batch itself. */
int sy_prefetch_take(sy_prefetch_t *p, uint64_t seed, int64_t step, int M, int b, int m, int32_t *tokens,
                     sy_status *st);

/* Micro-batches served from filled slots, and how many of them had to wait for their read. */
void sy_prefetch_counts(sy_prefetch_t *p, uint64_t *served, uint64_t *waited);

#endif
