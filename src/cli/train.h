/* The single-process trainer (`switchyard train`) and evaluator (`switchyard eval`): all
 * experts local, global batch run as M micro-batches with accumulated gradients, AdamW,
 * checkpoints, metrics. The step is written so that its pieces (sy_train_step) are reused by
 * the distributed worker. Thread: the calling thread. */
#ifndef SY_TRAIN_H
#define SY_TRAIN_H

#include <stdbool.h>
#include <stdint.h>

#include "base/config.h"
#include "base/status.h"

typedef struct {
    bool resume;        /* continue from the latest committed checkpoint, if any */
    bool overwrite;     /* move a run of the same name aside first (else a fresh run into a store
                         * holding committed checkpoints of that run is refused) */
    bool quiet;         /* no progress line */
    int64_t stop_after; /* stop (without the final checkpoint) after this step; 0 = run all */
} sy_train_opts;

sy_status sy_train_run(const sy_config_t *cfg, const sy_train_opts *opts);

/* `switchyard train` and `switchyard eval` command lines (argv[0] is the command name).
 * Return a process exit code. */
int sy_train_cli(int argc, char **argv);
int sy_eval_cli(int argc, char **argv);

/* Splits a --checkpoint DIR (STORE/RUN/ckpt/step-NNNNNNNNN, or STORE/RUN: its latest committed
 * checkpoint) into store (a buffer of 4096 bytes), run (256) and step (-1: the latest). */
sy_status sy_cli_ckpt_dir_parse(const char *dir, char *store, char *run, int64_t *step);

#endif
