/* The Switch layer (model spec §2) for one routing group, split into the steps between which
 * expert parallelism puts its all-to-all:
 *
 *   route    : fp32 router, top-1, capacity, in-order drops, aux and z losses, dispatch plan
 *   dispatch : gather kept tokens into expert-major rows          ── all-to-all goes here
 *   experts  : each expert's MLP over its rows (any subset of experts, e.g. the owned ones)
 *                                                                  ── and back here
 *   combine  : y_t = g_t · Expert(h_t), dropped tokens 0
 *
 * and the backward in reverse (combine_bwd, experts_bwd, dispatch_bwd, route_bwd).
 * One sy_switch_t holds one layer's saved state for one micro-batch; all buffers are allocated
 * by sy_switch_new() for a group of G tokens. Thread: one thread at a time. */
#ifndef SY_SWITCH_H
#define SY_SWITCH_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "base/status.h"

typedef struct {
    float *W1; /* [F, D] */
    float *W2; /* [D, F] */
    float *dW1, *dW2;
    /* fp64 gradient accumulators [F, D] / [D, F], or NULL. When set, each backward call computes
     * its contribution in fp32 (dW1/dW2 are then scratch, contents unspecified) and adds it to these, so
     * the sum over micro-batches does not depend on how they were grouped (model spec §5:
     * W-invariance). */
    double *acc1, *acc2;
} sy_expert_weights;

typedef struct sy_switch sy_switch_t;

sy_status sy_switch_new(sy_backend_t *be, int G, int D, int F, int E, sy_switch_t **out);
void sy_switch_destroy(sy_switch_t **self_p);

/* The ablation of the paper's Table 2 (model.router_precision: bf16), not the pinned math: in a
 * bf16 backend the router then reads bf16-rounded weights and writes bf16 logits,
 * probabilities, gates and logit gradients; lse stays fp32. Off (the default): spec §4's fp32
 * router. */
sy_status sy_switch_set_router_bf16(sy_switch_t *sw, bool on);

/* C = min(G, max(4, ceil(capacity_factor · G / E))) (spec §2 step 3, PINNED). */
int sy_switch_capacity(int G, int E, double capacity_factor);

/* Route the group. h [G,D] is the layer input (kept by the caller until backward); Wr [E,D]
 * fp32. jitter_eps > 0 multiplies the router input by u ~ U[1-ε, 1+ε] drawn from key
 * (seed, step, micro, layer, token). Fills aux_group and z_group (uncoefficiented). */
typedef struct {
    uint64_t seed;
    int64_t step;
    int micro;
    int layer;
} sy_switch_key;

void sy_switch_route(sy_switch_t *sw, const float *h, const float *Wr, double capacity_factor,
                     double jitter_eps, sy_switch_key key);
/* Expert-major gather of kept tokens: rows[order[i]] for i < n_kept. */
void sy_switch_dispatch(sy_switch_t *sw, const float *h);
/* Runs experts e0..e1-1 on their rows of the dispatch buffer. dropout p > 0: inverted dropout
 * on the hidden activation, mask drawn from (key, token index). */
void sy_switch_experts(sy_switch_t *sw, const sy_expert_weights *ex, int e0, int e1,
                       double dropout, sy_switch_key key);
/* out [G,D] = gated expert outputs (0 for dropped tokens). */
void sy_switch_combine(sy_switch_t *sw, float *out);

/* Backward. dout [G,D]. Weight gradients accumulate into ex[e].dW* and dWr; dh [G,D] is
 * overwritten with the gradient w.r.t. the layer input. aux_scale = coef_aux·E/(G·n_groups),
 * z_scale = coef_z·2/(G·n_groups). */
void sy_switch_combine_bwd(sy_switch_t *sw, const float *dout);
void sy_switch_experts_bwd(sy_switch_t *sw, const sy_expert_weights *ex, int e0, int e1);
void sy_switch_dispatch_bwd(sy_switch_t *sw, float *dh);
void sy_switch_route_bwd(sy_switch_t *sw, const float *h, const float *Wr, float *dWr, float *dh,
                         float aux_scale, float z_scale);

/* Experts' MLPs over chunks of rows, shared by the local path and the expert-parallel owner
 * side. A chunk is n rows of one expert: he = xe·W1ᵀ, ge = gelu(he) (⊙ an inverted-dropout mask
 * drawn per row from (key.seed, key.step, micro[i] or key.micro, key.layer, tok[i]) when
 * dropout > 0), ye = ge·W2ᵀ. Chunks run as grouped GEMMs (one parallel loop over every chunk's
 * tiles); each chunk's numbers are those of running it alone. */
typedef struct {
    const sy_expert_weights *w;
    int n;
    const float *xe;
    float *he, *ge, *mask, *ye;
    const int32_t *tok, *micro; /* micro NULL: key.micro for every row */
} sy_expert_rows;
void sy_experts_fwd(sy_backend_t *be, const sy_expert_rows *c, int nc, int D, int F,
                    double dropout, sy_switch_key key);

/* The backward of chunks: writes dge, dhe, dxe; weight gradients as sy_expert_weights says
 * (fp64 accumulators when set, else += into dW1/dW2). No two chunks of one call may be the same
 * expert (their gradients would race); call again per source for that, in source order. */
typedef struct {
    const sy_expert_weights *w;
    int n;
    const float *dye, *xe, *he, *ge;
    const float *mask; /* NULL: no dropout */
    float *dge, *dhe, *dxe;
} sy_expert_grad_rows;
void sy_experts_bwd(sy_backend_t *be, const sy_expert_grad_rows *c, int nc, int D, int F);

/* Results of the last route. counts, kept and offsets are HOST memory (downloaded once per
 * route, valid until the next route of this layer); expert, gate, probs and order are BACKEND
 * buffers (backend.h: read them through download). */
typedef struct {
    int G, E, C;
    int n_kept;
    double aux_group; /* E · Σ f_i P_i */
    double z_group;   /* (1/G) Σ lse² */
    const int32_t *counts;   /* host [E] tokens routed to each expert, before capacity */
    const int32_t *kept;     /* host [E] tokens kept per expert */
    const int32_t *expert;   /* backend [G] chosen expert per token */
    const float *gate;       /* backend [G] */
    const float *probs;      /* backend [G,E] */
    const int32_t *order;    /* backend [n_kept] token index of each dispatch row, expert-major */
    const int32_t *offsets;  /* host [E+1] first dispatch row of each expert */
} sy_switch_info;

sy_switch_info sy_switch_get_info(const sy_switch_t *sw);

#endif
