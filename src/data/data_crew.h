/* A fixed crew of threads that runs the items of one job in parallel: the reads of a batch's
 * coalesced ranges (S3 GETs wait on the network, so a few in flight hide its latency).
 *
 * sy_crew_run(c, fn, arg, n) calls fn(arg, i) once for every i in [0, n), on the crew's threads
 * and the caller's, and returns when every call has returned. Runs are serialised: a second
 * caller waits for the first run to finish. fn must not call sy_crew_run on the same crew.
 * Thread: any; sy_crew_destroy after the last run. */
#ifndef SY_DATA_CREW_H
#define SY_DATA_CREW_H

#include <stddef.h>

#include "base/status.h"

typedef struct sy_crew sy_crew_t;
typedef void (*sy_crew_fn)(void *arg, size_t i);

/* `threads` in all, the caller's included (1: runs everything on the caller). */
sy_status sy_crew_new(int threads, sy_crew_t **out);
void sy_crew_destroy(sy_crew_t **self_p);
void sy_crew_run(sy_crew_t *c, sy_crew_fn fn, void *arg, size_t n);

#endif
