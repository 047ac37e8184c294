/* Model + optimizer state <-> checkpoint files (system spec §5 layout): dense.safetensors and
 * dense.optim.safetensors hold the non-expert tensors and their AdamW moments; expert-NNNN
 * files hold expert NNNN of every Switch layer. A load can take dense + any subset of experts
 * (what a rank owns after re-placement). Thread: the training thread. */
#ifndef SY_MODEL_CKPT_H
#define SY_MODEL_CKPT_H

#include <jansson.h>
#include <stdbool.h>

#include "ckpt.h"
#include "model.h"
#include "optim.h"
#include "store.h"

/* Saves the whole model (and optimizer moments when opt != NULL) as checkpoint `step`, with
 * the optimizer step count and `extra` (may be NULL) in the manifest. */
sy_status sy_model_ckpt_save(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const json_t *extra);

/* Loads dense tensors and the experts e with experts[e] true (all when experts == NULL), and
 * their moments when opt != NULL (then also the optimizer step count). */
sy_status sy_model_ckpt_load(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const bool *experts);

#endif
