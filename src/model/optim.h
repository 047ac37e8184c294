/* AdamW with fp32 master weights (model spec §5), global-norm gradient clipping, and the
 * learning-rate schedule.
 *
 * Update, PINNED to torch.optim.AdamW (decoupled decay, bias-corrected):
 *   p ← p·(1 − lr·wd)            (wd only on tensors with decay: 2-D)
 *   m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
 *   p ← p − (lr / (1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
 * Clipping, PINNED to torch.nn.utils.clip_grad_norm_: g ← g · min(1, max_norm/(‖g‖ + 1e-6)).
 * Schedule, PINNED: for 0-based step s, lr(s) = lr·(s+1)/warmup while s < warmup, then
 * lr_min + ½(lr − lr_min)(1 + cos(π·(s − warmup)/max(1, steps − warmup))).
 *
 * The optimizer works on ranges of the model's parameter table, so a worker that owns a subset
 * of the experts updates only what it owns. The moments live in the model's backend (backend
 * buffers, like the parameters); every per-element step is a backend op. Thread: the training
 * thread. */
#ifndef SY_OPTIM_H
#define SY_OPTIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/config.h"
#include "model/model.h"
#include "base/status.h"

typedef struct sy_adamw sy_adamw_t;

sy_status sy_adamw_new(sy_model_t *model, const sy_config_t *cfg, sy_adamw_t **out);
void sy_adamw_destroy(sy_adamw_t **self_p);
/* Takes the hyperparameters (betas, eps, weight decay) of cfg; keeps the moments and the step
 * count (a worker's next generation of the same model: its state may be a restore source). */
void sy_adamw_configure(sy_adamw_t *o, const sy_config_t *cfg);
/* Zero moments, step count 0: the state of a fresh initialisation. */
void sy_adamw_reset(sy_adamw_t *o);

/* First / second moments, same layout as the parameters: backend buffers of the model's backend
 * (host copies by its upload/download). */
float *sy_adamw_m(sy_adamw_t *o);
float *sy_adamw_v(sy_adamw_t *o);
int64_t sy_adamw_t_count(const sy_adamw_t *o); /* steps taken so far (t) */
void sy_adamw_set_t_count(sy_adamw_t *o, int64_t t);

double sy_lr_at(const sy_config_t *cfg, int64_t step0);

/* Σ g² over the backend buffer g [n], in fp64 (backend sumsq_add's fixed order), downloaded.
 * For tools and tests; the training step uses sy_model_grad_sqnorms. */
double sy_grad_sqnorm(sy_backend_t *be, const float *g, size_t n);
/* Scales the gradient (backend buffer) in place; returns the clip coefficient applied (1 if
 * none). */
double sy_clip_grads(sy_backend_t *be, float *g, size_t n, double norm, double max_norm);

/* One AdamW step over every parameter of the model at learning rate lr. */
void sy_adamw_step(sy_adamw_t *o, double lr);
/* The same over the dense parameters and the experts e with experts[e] (NULL: all): a rank
 * updates only the experts it owns. The step count advances once per call. */
void sy_adamw_step_owned(sy_adamw_t *o, double lr, const bool *experts);
/* The learning rate of the last sy_adamw_step_owned (0 before the first). */
double sy_adamw_last_lr(const sy_adamw_t *o);
/* The update of one tensor of step count t at learning rate lr on host arrays, from p0, m0, v0
 * into p, m, v (each output its own input, or overlapping no operand): the same per-element
 * operations as the backend's adamw op (backend/kernels/k_elementwise.h, no FMA contraction),
 * so the same bits. `decay`: the tensor's sy_param_t.decay. For a peer replica that applies its
 * owner's gradients to its replica of the step before, from one slot into the other
 * (worker/replica.h). Any thread. */
void sy_adamw_apply_host(const sy_adamw_t *o, double lr, int64_t t, bool decay, float *p, float *m, float *v,
                         const float *p0, const float *m0, const float *v0, const float *g, size_t n);

#endif
