/* A parallel loop over independent items: for i = 0..n-1, fn(ctx, i) on up to `threads`
 * threads (the calling thread among them), each taking the next index in turn. For I/O-bound
 * batches (the checkpoint writer's files, the commit's HEADs, S3 multipart parts); the items'
 * order of completion is not defined, so fn writes only its own item's results.
 *
 * fn returns SY_OK or an error with its message set (status.h). The first error in time is
 * returned, its message set again in the caller's thread; with stop_on_error no index is
 * handed out after it (items already running finish), else every item runs. A thread that
 * cannot be started is not an error: the others, the caller at least, take its share.
 * Thread: any; fn must be safe to run on several threads at once. */
#ifndef SY_PARALLEL_H
#define SY_PARALLEL_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"

#define SY_PARALLEL_MAX_THREADS 64

sy_status sy_parallel_for(int threads, size_t n, bool stop_on_error, sy_status (*fn)(void *ctx, size_t i),
                          void *ctx);

#endif
