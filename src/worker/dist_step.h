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
    int32_t *counts;           /* [n_switch, E] routed tokens of this rank's micro-batches (caller's buffer) */
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

#endif
