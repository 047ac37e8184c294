/* One optimizer step of the distributed worker (model spec §5): micro-batch m of the step runs
 * on rank m % W, in rounds of W (a rank without a micro-batch in a round still serves its
 * experts); dense gradients are all-reduced; the global gradient norm is the dense norm² plus
 * the owners' expert norm², all-reduced as a scalar; clipping and AdamW apply to the dense
 * parameters and the owned experts. With W = 1 it is the single-process step.
 * Thread: the training thread. */
#ifndef SY_DIST_STEP_H
#define SY_DIST_STEP_H

#include <stdbool.h>
#include <stdint.h>

#include "comm/comm.h"
#include "base/config.h"
#include "data/data.h"
#include "model/model.h"
#include "model/optim.h"
#include "base/status.h"

typedef struct {
    double ce, aux, z;         /* this rank's contributions (already / M) */
    double grad_norm, lr;      /* global */
    int64_t tokens, routed, dropped;
    int micro_batches;         /* run by this rank */
    int32_t *counts;           /* [n_switch, E] (caller's buffer): per Switch layer, tokens routed to each
                                * expert before capacity. counts_owned false (one process, or no expert
                                * parallelism): all E experts, this rank's micro-batches; true: only the
                                * experts this rank owns (ascending; [n_switch, n_owned]), the whole
                                * step's tokens (every rank's micro-batches) */
    bool counts_owned;
    double *terms;             /* [3 * M] or NULL (caller's buffer): ce, aux, z of each micro-batch this rank
                                * ran, in order, so that the coordinator sums them in micro-batch order */
} sy_step_result;

typedef struct {
    const sy_config_t *cfg;
    sy_model_t *model;
    sy_adamw_t *opt;
    sy_data_t *data;
    sy_comm_t *comm;           /* NULL: single process */
    const bool *owned;         /* [E] experts this rank owns (NULL: all) */
    int32_t *tokens;           /* [b, T+1] scratch */
    /* Called (when set) after the last collective and before the update writes the parameters
     * and moments: until then the step only reads them (the overlapped replica exchange copies
     * the previous step's state meanwhile and is waited for here). */
    void (*before_update)(void *arg);
    void *before_arg;
} sy_dist_ctx;

/* Runs step `step` (1-based). */
sy_status sy_dist_step(sy_dist_ctx *c, int64_t step, sy_step_result *out);

/* Validation (train.eval_every): the number of micro-batches one validation reads from val,
 * train.eval_batches capped at the full micro-batches val holds (0 = all of them); 0 when val
 * holds less than one micro-batch. */
int sy_dist_eval_batches(const sy_config_t *cfg, const sy_data_t *val);
/* Opens data.val for validation: *val NULL and *n 0 when there is none to do
 * (train.eval_every 0, data.val empty, or fewer windows than one micro-batch: warned). An
 * unreadable data.val is an error naming it. */
sy_status sy_dist_open_val(const sy_config_t *cfg, sy_data_t **val, int *n);
/* Whether step is a validation step: every train.eval_every steps and the last (run.steps). */
bool sy_dist_eval_due(const sy_config_t *cfg, int64_t step);
/* The validation loss of the current weights: the mean cross-entropy of the first n
 * micro-batches of val (windows in order, eval capacity factor, no jitter or dropout).
 * Micro-batch i runs on rank i % W in rounds of W (idle ranks serve their experts); each
 * micro-batch's term comes from one rank, the terms are all-reduced as a vector (every other
 * entry 0, so the sum is exact) and summed in micro-batch order: the same value for every W. */
sy_status sy_dist_eval(sy_dist_ctx *c, sy_data_t *val, int n, double *val_loss);

#endif
