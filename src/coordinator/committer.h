/* The coordinator's checkpoint committer: a background thread that writes MANIFEST.json
 * (sy_ckpt_commit) and then applies retention (sy_ckpt_retain), so that the reactor never waits
 * on object storage. A commit on S3 is a HEAD per object plus a conditional PUT, each retried with
 * backoff (AWS standard mode): seconds under faults. Done on the reactor, that silence made every
 * worker think the coordinator was gone and register again, and left /v1/status seconds behind.
 *
 * Jobs run one at a time in submission order (a checkpoint's retention never races the commit
 * of a newer one). Results come back by message, not shared state (STYLE habit 6): the reactor
 * polls sy_committer_fd() and takes them with sy_committer_next().
 *
 * Ownership: submit takes the file list and the manifest's extra fields (json_t **, set to NULL).
 * The store must outlive the committer and must not be used by other threads meanwhile.
 * Thread: every function is for the reactor thread only; the committer's own thread is internal. */
#ifndef SY_COMMITTER_H
#define SY_COMMITTER_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"
#include "storage/store.h"

typedef struct sy_committer sy_committer_t;

typedef struct {
    int64_t step;
    uint64_t generation; /* as submitted */
    int64_t since_ms;    /* as submitted (the coordinator: when the first part arrived) */
    int n_files;         /* objects listed in the manifest */
    sy_status status;    /* of the commit: SY_OK, SY_EEXIST (already committed), or an error */
    char error[512];     /* its message when status is an error */
    double commit_ms;    /* commit alone, from the thread's start on the job */
    bool retain_failed;  /* retention after a good commit failed (the commit stands) */
    char retain_error[256];
} sy_commit_result;

/* Starts the thread. keep_last as checkpoint.keep_last. */
sy_status sy_committer_new(sy_store_t *store, const char *run, int keep_last, sy_committer_t **out);
/* Finishes every submitted job (committed data is never abandoned), then joins the thread.
 * Results not yet taken are dropped. Safe on NULL and twice. */
void sy_committer_destroy(sy_committer_t **self_p);

/* Queues the commit of checkpoint `step` (generation and since_ms are only handed back in the
 * result). Fails only for lack of memory. */
sy_status sy_committer_submit(sy_committer_t *self, int64_t step, uint64_t generation, int64_t since_ms,
                              json_t **files, json_t **extra);
/* A file descriptor that is readable while results wait (for zmq_poll / poll). */
int sy_committer_fd(const sy_committer_t *self);
/* Takes the oldest finished result (true) or returns false at once when none is ready. */
bool sy_committer_next(sy_committer_t *self, sy_commit_result *out);
/* Submitted jobs whose result has not been taken yet. */
int sy_committer_in_flight(const sy_committer_t *self);
/* Blocks until every submitted job has a result (bounded: each store request is). */
void sy_committer_wait(sy_committer_t *self);

#endif
