/* Asynchronous checkpoint saving (system spec §5): at the step boundary the model parameters
 * and AdamW moments are copied into a host snapshot (allocated once, reused by every save);
 * training goes on while a background thread serialises and uploads the snapshot's files
 * (sy_ckpt_write_part, one file at a time), commits MANIFEST.json once every part is durable
 * (sy_ckpt_commit), then applies retention (sy_ckpt_retain). At most one save is in flight: a
 * second submit either waits for it (SY_ONBUSY_WAIT) or is skipped and counted (SY_ONBUSY_SKIP).
 *
 * Errors of a background save are logged once when they happen, remembered, and returned by the
 * next sy_ckpt_saver_submit() or sy_ckpt_saver_wait() (each background error is returned once);
 * a failed save never commits a manifest (its uploaded files stay as debris that retention
 * removes later) and never stops the caller.
 *
 * The snapshot also holds the last submitted step's state in memory (for restoring survivors
 * without a store round trip): sy_ckpt_saver_snapshot().
 *
 * Test hook: the environment variable SY_CKPT_TEST_DELAY_MS (read when the saver is created)
 * makes the background thread sleep that many milliseconds before each file upload, so tests can
 * kill a process while a save is in flight. Not for production use.
 *
 * Ownership: the saver borrows the store (which must outlive it and be usable from another
 * thread; both backends are); it copies run and extra. Thread: submit / wait / stats / snapshot
 * are called from one thread (the training thread); the saver runs one background thread. */
#ifndef SY_CKPT_ASYNC_H
#define SY_CKPT_ASYNC_H

#include <jansson.h>
#include <stdint.h>

#include "base/config.h"
#include "model/model.h"
#include "model/optim.h"
#include "base/status.h"
#include "storage/store.h"

typedef struct sy_ckpt_saver sy_ckpt_saver_t;

typedef struct {
    int64_t saves_done;     /* committed by the background thread (EEXIST counts as done) */
    int64_t skipped;        /* submits skipped because a save was in flight (SY_ONBUSY_SKIP) */
    int64_t failed;         /* background saves that failed */
    int64_t last_step;      /* step of the last finished save (committed or failed); -1 if none */
    double last_upload_ms;  /* serialise + upload + commit + retention time of that save */
    double last_stall_ms;   /* the caller's stall in the last submit (copy + wait) */
} sy_ckpt_saver_stats;

/* keep_last < 1: no retention. on_busy: SY_ONBUSY_WAIT or SY_ONBUSY_SKIP. */
sy_status sy_ckpt_saver_new(sy_store_t *store, const char *run, int keep_last, sy_ckpt_onbusy on_busy,
                            sy_ckpt_saver_t **out);
/* Waits for the save in flight (its error, if any, is logged and dropped), stops the thread,
 * frees everything. NULL-safe; sets *self_p to NULL. */
void sy_ckpt_saver_destroy(sy_ckpt_saver_t **self_p);

/* Allocates (and touches) the snapshot buffers for this model and optimizer (opt may be NULL:
 * parameters only), so the first submit does not pay for it. Optional; submit calls it. */
sy_status sy_ckpt_saver_prepare(sy_ckpt_saver_t *self, const sy_model_t *model, const sy_adamw_t *opt);

/* Snapshots the model (and opt's moments and step count when opt != NULL) as checkpoint `step`
 * with `extra` (a JSON object or NULL; copied) in the manifest, and hands it to the background
 * thread. *stall_ms (may be NULL) gets the time the caller was held (waiting for a save in
 * flight + copying). If a save is in flight and on_busy is SY_ONBUSY_SKIP, nothing is copied,
 * the skip is counted and logged, and SY_OK is returned. The model and optimizer must keep the
 * same sizes between submits (SY_EINVAL otherwise).
 * Returns the error of an earlier background save not yet returned (the new save is submitted
 * all the same), else this call's own error (bad arguments, memory; then nothing is submitted),
 * else SY_OK. */
sy_status sy_ckpt_saver_submit(sy_ckpt_saver_t *self, int64_t step, sy_model_t *model, sy_adamw_t *opt,
                               const json_t *extra, double *stall_ms);

/* Waits until no save is in flight; returns the background error not yet returned (SY_OK if
 * none) with its message. */
sy_status sy_ckpt_saver_wait(sy_ckpt_saver_t *self);

/* The last background error (SY_OK if none ever), whether or not it was returned already; its
 * message is copied into msg (cap bytes; msg may be NULL). */
sy_status sy_ckpt_saver_last_error(sy_ckpt_saver_t *self, char *msg, size_t cap);

void sy_ckpt_saver_get_stats(sy_ckpt_saver_t *self, sy_ckpt_saver_stats *out);

/* The state of the last submitted (not skipped) step, in the snapshot buffers: parameters and,
 * when the submit had an optimizer, moments m, v and step count t (else NULL / 0). Valid until
 * the next submit; read-only (the background thread may be reading it too). SY_ENOTFOUND if
 * nothing was submitted yet. Any out pointer may be NULL. */
sy_status sy_ckpt_saver_snapshot(sy_ckpt_saver_t *self, int64_t *step, const float **params, const float **m,
                                 const float **v, int64_t *t);

#endif
