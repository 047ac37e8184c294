/* The Switch Transformer language model of model spec §1-4 on one process.
 *
 * Parameters live in one fp32 buffer (the master weights), laid out dense tensors first (in the
 * order of spec §7), then expert tensors grouped by expert index (expert e of every Switch layer
 * together), so a checkpoint's dense file and each expert file are contiguous ranges. Gradients
 * have the same layout. All activations for one micro-batch (micro_batch_seqs × seq_len tokens
 * = one routing group) are allocated once, in sy_model_new(); the training step allocates
 * nothing.
 *
 * Loss scaling: sy_model_fwd_bwd() runs one micro-batch of a global batch of n_micro
 * micro-batches and ACCUMULATES gradients of L = L_ce + aux + z as defined in spec §2 (CE mean
 * over all target tokens of the global batch, aux/z mean over groups).
 *
 * Memory: parameters, gradients, the fp64 accumulator and activations are BACKEND buffers
 * (backend.h): the pointers sy_model_params/grads/grad_acc return may be device memory, never to
 * be read or written on the host; host copies go through the backend's upload/download (with
 * sy_model_backend). Tokens come in from the host and are uploaded here; per-step statistics
 * (losses, expert counts, gradient norms) come back as host values.
 *
 * Thread: one thread drives a model. Ownership: the model owns its buffers and borrows the
 * backend (which must outlive it). */
#ifndef SY_MODEL_H
#define SY_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"
#include "base/config.h"
#include "base/status.h"
#include "base/tensor.h"

#define SY_NAME_MAX 64

typedef struct {
    char name[SY_NAME_MAX];       /* spec §7 name */
    char m_name[SY_NAME_MAX + 2]; /* "m.<name>": its first AdamW moment in checkpoints */
    char v_name[SY_NAME_MAX + 2]; /* "v.<name>" */
    int ndim;
    int64_t shape[2];
    size_t offset; /* in floats, into params / grads / moments */
    size_t numel;
    int layer;     /* block index, -1 for wte, wpe, ln_f */
    int expert;    /* expert index, -1 for dense (non-expert) tensors */
    bool decay;    /* weight decay applies (2-D tensors) */
    bool lowp;     /* used as a bf16 GEMM input in bf16 mode (2-D, not the router) */
    bool router;
} sy_param_t;

/* The model's dimensions, read from a config. */
typedef struct {
    int V, T, D, L, H, F, E, S;
    int B;             /* sequences per micro-batch */
    double capacity_factor, eval_capacity_factor;
    double aux_coef, z_coef, jitter, expert_dropout, init_scale;
    bool router_bf16;  /* the bf16-router ablation (model.router_precision: bf16; switch.h) */
} sy_model_dims;

/* Per-micro-batch results. ce, aux, z are this micro-batch's contributions to the global loss
 * terms already divided by n_micro (so summing over micro-batches gives the global value);
 * aux and z include their coefficients (spec §2 total loss). */
typedef struct {
    double ce, aux, z;
    int64_t tokens;     /* target tokens */
    int64_t routed;     /* tokens routed (per Switch layer, summed over layers) */
    int64_t dropped;    /* of which dropped by capacity */
} sy_losses;

typedef struct sy_model sy_model_t;

sy_model_dims sy_model_dims_from_config(const sy_config_t *cfg);
sy_status sy_model_new(const sy_model_dims *dims, sy_backend_t *be, sy_model_t **out);
void sy_model_destroy(sy_model_t **self_p);

const sy_model_dims *sy_model_get_dims(const sy_model_t *m);
int sy_model_n_params(const sy_model_t *m);
const sy_param_t *sy_model_param(const sy_model_t *m, int i);
/* Index of a parameter by spec name, -1 if none. */
int sy_model_find(const sy_model_t *m, const char *name);
size_t sy_model_numel(const sy_model_t *m);     /* all parameters */
size_t sy_model_dense_numel(const sy_model_t *m);
sy_backend_t *sy_model_backend(const sy_model_t *m);
/* The fp32 master weights (backend buffer). */
float *sy_model_params(sy_model_t *m);
/* The accumulated gradients (fp32, backend buffer). Micro-batch contributions are summed in an fp64
 * accumulator (sy_model_grad_acc) and rounded into this buffer on the first call after they
 * change; the caller may then modify it (clipping) until the next fwd_bwd. */
float *sy_model_grads(sy_model_t *m);
/* The fp64 accumulator (same layout, backend buffer), for the all-reduce of dense gradients
 * before rounding. */
double *sy_model_grad_acc(sy_model_t *m);
/* Σ g² (fp64) of the rounded gradients (sy_model_grads), downloaded in one piece into the host
 * array sq [1+E]: sq[0] over the dense parameters, sq[1+e] over expert e when owned[e] (owned
 * NULL: every expert; others 0), each summed in the fixed order of backend sumsq_add (expert e's
 * tensors in parameter-table order). */
void sy_model_grad_sqnorms(sy_model_t *m, const bool *owned, double *sq);
/* A tensor view of parameter i in `base`: a HOST buffer laid out like the parameters (a
 * download of params, grads or an optimizer moment buffer). */
sy_tensor_ref sy_model_ref(const sy_model_t *m, int i, float *base, const char *name);
/* Number of Switch layers and whether block l is one. */
int sy_model_n_switch(const sy_model_t *m);
bool sy_model_is_switch(const sy_model_t *m, int l);

/* Initialisation, spec §3: a pure function of (seed, parameter name). */
void sy_model_init(sy_model_t *m, uint64_t seed);
/* Call after the master weights change (init, optimizer step, load): refreshes the bf16
 * working copy in bf16 mode; a no-op in fp32 mode. */
void sy_model_weights_changed(sy_model_t *m);
void sy_model_zero_grads(sy_model_t *m);

/* The randomness key of a micro-batch (spec §3): jitter and expert dropout draws are pure
 * functions of (seed, step, micro-batch index, layer, token index in the group). */
typedef struct {
    uint64_t seed;
    int64_t step;
    int micro;
} sy_draw_key;

/* Training forward + backward of one micro-batch. tokens: [B, T+1] int32 (inputs are columns
 * 0..T-1, targets 1..T). Accumulates gradients; fills *out. */
sy_status sy_model_fwd_bwd(sy_model_t *m, const int32_t *tokens, int n_micro, sy_draw_key key,
                           sy_losses *out);
/* Evaluation forward (eval capacity factor, no jitter, no dropout). n_micro scales as above.
 * Under expert parallelism every rank of the generation calls it (or sy_model_serve_idle_eval)
 * in the same rounds, as in training. */
sy_status sy_model_forward_eval(sy_model_t *m, const int32_t *tokens, int n_micro,
                                sy_losses *out);

/* Downloads rows [row0, row0 + n) of the logits [B*T, V] of the last forward (row = sequence ·
 * T + position; the logit of token v for the NEXT token after that position) into the host
 * array out [n, V]. Valid after sy_model_forward_eval, until the next forward or fwd_bwd (which
 * overwrites them with their gradient). For sampling (`switchyard sample`). */
sy_status sy_model_logits(sy_model_t *m, int row0, int n, float *out);

/* Expert parallelism: with an ep context (switch_ep.h) the Switch layers exchange tokens with
 * the experts' owners; this rank computes only the experts it owns (the others' gradients stay
 * 0 here). rank = this rank in the ep's communicator. NULL: all experts local. */
struct sy_ep;
void sy_model_set_ep(sy_model_t *m, struct sy_ep *ep, int rank);
/* The expert parallelism set by sy_model_set_ep (NULL: every expert local). */
struct sy_ep *sy_model_ep(const sy_model_t *m);
/* A rank without a micro-batch in a round: serves its experts in every Switch layer's exchange
 * (forward then backward), in the order the active ranks run them. key.micro = the round's
 * first micro-batch index (round·world). */
sy_status sy_model_serve_idle(sy_model_t *m, sy_draw_key key);
/* The same in an evaluation round (sy_model_forward_eval on the active ranks): forward only. */
sy_status sy_model_serve_idle_eval(sy_model_t *m);

/* Per-expert routed-token counts of the last forward (before capacity): [n_switch, E], host. */
const int32_t *sy_model_expert_counts(const sy_model_t *m);

#endif
