/* Run ownership in a checkpoint store: which writer may commit checkpoints of a run, so that
 * runs never overwrite or silently lose each other (system spec §5; docs/fault-tolerance.md
 * "Hostile input").
 *
 * Every writer of a run (a `switchyard train` process, a coordinator) claims the run when it
 * starts: it draws a random writer id and writes `<run>/RUN.json`
 *   {"format": "switchyard-run", "version": 1, "run": ..., "writer": "<32 hex>", "host": ...,
 *    "pid": ..., "mode": "fresh" | "resume" | "overwrite", "claimed": "<UTC time>"}
 * and records its id as the manifest field "writer" of every checkpoint it commits. The newest
 * claim wins: sy_ckpt_commit (given an extra "writer") checks RUN.json just before it writes the
 * manifest, so a writer whose claim was taken over (a second trainer on the same run, a run moved
 * aside by --overwrite) fails with SY_ECONFLICT instead of committing over the new owner.
 * The check and the manifest put are two requests, not one atomic one: a writer fenced off
 * within that window can still commit a step; the owner retires such a step (its manifest is
 * kept as MANIFEST.retired.json) and writes its own when it gets there (ckpt.h,
 * sy_ckpt_prepare_step).
 *
 * A fresh claim refuses a run that already holds a committed checkpoint (SY_EEXIST, naming
 * --resume and --overwrite); --overwrite first moves the old run aside to
 * "<run>.replaced-<UTC time>" (manifests rewritten to the new name, so it stays loadable).
 *
 * Ownership: writer ids are written into caller buffers. Thread: any. */
#ifndef SY_CKPT_RUN_H
#define SY_CKPT_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "storage/store.h"

#define SY_RUN_OBJECT "RUN.json"
#define SY_RUN_FORMAT "switchyard-run"
#define SY_RUN_WRITER_HEX 32

typedef enum {
    SY_RUN_FRESH = 0,     /* a new run: refused if the run has a committed checkpoint */
    SY_RUN_RESUME = 1,    /* continue the run (broken steps newer than the latest usable one are
                           * retired, so the run rewrites them) */
    SY_RUN_OVERWRITE = 2  /* move the old run aside, then as FRESH */
} sy_run_mode;

/* Claims `run` for a new writer (see above); writer receives its id (NUL-terminated hex).
 * For SY_RUN_OVERWRITE, moved_to (may be NULL) receives the name the old run was moved to
 * ("" if there was nothing to move). */
sy_status sy_run_claim(sy_store_t *st, const char *run, sy_run_mode mode, char writer[SY_RUN_WRITER_HEX + 1],
                       char *moved_to, size_t moved_cap);

/* SY_OK if RUN.json names `writer`; SY_ECONFLICT (naming both writers) if another writer
 * claimed the run since, or RUN.json is gone; SY_ECORRUPT if it does not parse. */
sy_status sy_run_check_writer(sy_store_t *st, const char *run, const char *writer);

/* Reads the manifest of checkpoint `step` back and checks that it is usable (parses, every file
 * present with its size) and was committed by `writer` (NULL: any). For "done" messages: the
 * run's final checkpoint is verified this way before a run reports success. */
sy_status sy_run_verify_checkpoint(sy_store_t *st, const char *run, int64_t step, const char *writer);

/* Copies every object of `run` to "<run>.replaced-<UTC time>" (manifests rewritten to that
 * run name), then deletes the originals (manifests first). *moved_to gets the new name ("" if
 * the run had no objects). */
sy_status sy_run_move_aside(sy_store_t *st, const char *run, char *moved_to, size_t cap);

#endif
