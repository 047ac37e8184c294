/* Model + optimizer state <-> checkpoint files (system spec §5 layout): dense.safetensors and
 * dense.optim.safetensors hold the non-expert tensors and their AdamW moments; expert-NNNN
 * files hold expert NNNN of every Switch layer. A load can take dense + any subset of experts
 * (what a rank owns after re-placement). Thread: the training thread. */
#ifndef SY_MODEL_CKPT_H
#define SY_MODEL_CKPT_H

#include <jansson.h>
#include <stdbool.h>

#include "storage/ckpt.h"
#include "model/model.h"
#include "model/optim.h"
#include "storage/store.h"

/* Saves the whole model (and optimizer moments when opt != NULL) as checkpoint `step`, with
 * the optimizer step count and `extra` (may be NULL) in the manifest. The state is downloaded
 * into host buffers allocated for the call. */
sy_status sy_model_ckpt_save(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const json_t *extra);

/* The checkpoint files of a model as sy_ckpt_group views over ANY HOST buffers laid out like
 * the model's parameter buffer (a host snapshot; never the live model's backend buffers): dense.safetensors,
 * dense.optim.safetensors, then per expert expert-NNNN(.optim).safetensors. The plan owns copies
 * of the file and tensor names (valid after the model is gone); the buffers stay the caller's. */
#define SY_MODEL_CKPT_FILE_MAX 64
#define SY_MODEL_CKPT_NAME_MAX (SY_NAME_MAX + 4)
typedef struct {
    sy_ckpt_group *groups;
    int n;
    /* private */
    sy_tensor_ref *refs_;
    char *files_, *names_;
    int n_refs_;
} sy_model_ckpt_plan;

/* params: fp32 master weights; mom1/mom2: AdamW moments (both NULL: no .optim files);
 * experts: which experts to include (NULL: all). */
sy_status sy_model_ckpt_plan_new(const sy_model_t *m, float *params, float *mom1, float *mom2,
                                 const bool *experts, sy_model_ckpt_plan *out);
void sy_model_ckpt_plan_free(sy_model_ckpt_plan *p);

/* A copy of `extra` (NULL: {}) with "optimizer_step": t_count added; NULL if out of memory. */
json_t *sy_model_ckpt_extra(const json_t *extra, int64_t t_count);

/* sy_model_ckpt_save() from host buffers laid out like the model's (e.g. a snapshot). */
sy_status sy_model_ckpt_save_from(sy_store_t *st, const char *run, int64_t step, const sy_model_t *m,
                                  float *params, float *mom1, float *mom2, int64_t t_count,
                                  const json_t *extra);

/* Loads dense tensors and the experts e with experts[e] true (all when experts == NULL), and
 * their moments when opt != NULL (then also the optimizer step count). The files are read into
 * host buffers allocated for the call, then uploaded; on an error the model is unchanged. */
sy_status sy_model_ckpt_load(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const bool *experts);
/* The same without the dense files: only the experts e with experts[e] (a survivor fetches
 * what it newly owns; the rest it has in memory). */
sy_status sy_model_ckpt_load_experts(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                                     sy_adamw_t *opt, const bool *experts);

#endif
