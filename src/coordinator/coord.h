/* The coordinator: one run's control plane (system spec §2-3, §6; docs/protocol.md).
 *
 * A single-threaded reactor: zmq_poll on one ROUTER socket plus a cron every
 * SY_COORD_CRON_MS. It registers workers (Hello/Welcome), tracks liveness (any message
 * refreshes it; silence for cluster.failure_timeout_ms is death), opens generations (ranks by
 * join order, balanced expert placement, peers' data-plane endpoints, restore point from the
 * latest committed checkpoint), aggregates StepDone into metrics.jsonl, commits checkpoints
 * when the parts of every rank cover dense + all experts (sy_ckpt_commit, then retention),
 * recovers from a lost worker (Abort, new generation over the survivors), adds newcomers and
 * removes drained workers at checkpoint boundaries, and sends Stop at the end. It writes
 * events.jsonl, and publishes /v1/status and /metrics through the HTTP server (http.h).
 *
 * Every malformed or unexpected message is counted by reason (sy_proto_drop) and dropped;
 * nothing a peer sends can crash it.
 *
 * Ownership: the coordinator keeps a copy of the config. Thread: one thread (the reactor);
 * the stop flag may be set from a signal handler. */
#ifndef SY_COORD_H
#define SY_COORD_H

#include <signal.h>

#include "base/config.h"
#include "base/status.h"

/* Cron period (ms): liveness checks, scheduling, snapshot publishing. */
#define SY_COORD_CRON_MS 50

typedef struct sy_coord sy_coord_t;

#define SY_COORD_EXPECT_TIMEOUT_MS 60000

typedef struct {
    const char *bind;        /* overrides cluster.bind (NULL: keep); a port of 0 picks a free one */
    const char *status_addr; /* overrides status.addr (NULL: keep); port 0 picks a free one */
    int expect_workers;      /* > 0: the first generation waits for this many workers (at most
                              * SY_COORD_EXPECT_TIMEOUT_MS), so workers started together start
                              * together */
} sy_coord_opts;

typedef enum {
    SY_COORD_FINISHED = 0, /* every step run and its final checkpoint committed */
    SY_COORD_STOPPED = 1,  /* stopped early: signal or POST /v1/stop */
    SY_COORD_FAILED = 2    /* diverged, or recovery kept failing without progress */
} sy_coord_outcome;

/* Validates nothing (the caller validated cfg); opens the store, creates run.state_dir, binds
 * the ROUTER socket and starts the HTTP server. Errors name the address or path. */
sy_status sy_coord_new(const sy_config_t *cfg, const sy_coord_opts *opts, sy_coord_t **out);
/* The control-plane endpoint actually bound ("tcp://127.0.0.1:41234"). */
const char *sy_coord_endpoint(const sy_coord_t *self);
/* The status server's base URL ("http://127.0.0.1:8080"). */
const char *sy_coord_status_url(const sy_coord_t *self);
/* Runs the reactor until the run finishes, fails or is stopped (*stop_flag set non-zero, or
 * POST /v1/stop). Returns SY_OK with *outcome set; an error only for a local failure that
 * leaves the coordinator unable to go on (socket or file errors). */
sy_status sy_coord_run(sy_coord_t *self, volatile sig_atomic_t *stop_flag, sy_coord_outcome *outcome);
void sy_coord_destroy(sy_coord_t **self_p);

#endif
