/* The Switch layer (model spec §2): each step's forward beside its backward, in the order the
 * forward runs them (route, dispatch, experts, combine); the steps and their contracts are in
 * switch.h. */
#include "model/switch.h"

#include <math.h>
#include <stdlib.h>

#include "switch_internal.h"

#define ALLOC(ptr, n)                                                        \
    do {                                                                     \
        (ptr) = be->alloc(be, (size_t)(n) * sizeof(*(ptr)));                 \
        if (!(ptr)) goto oom;                                                \
    } while (0)
/* an activation buffer: bf16 storage in bf16 mode (backend.h "Precision") */
#define LP_ALLOC(ptr, n)                                                     \
    do {                                                                     \
        (ptr) = sy_alloc_act(be, (size_t)(n));                               \
        if (!(ptr)) goto oom;                                                \
    } while (0)

sy_status sy_switch_new(sy_backend_t *be, int G, int D, int F, int E, sy_switch_t **out) {
    sy_switch_t *sw = calloc(1, sizeof *sw);
    if (!sw) return sy_err_set(SY_ENOMEM, "switch layer: out of memory");
    sw->be = be;
    sw->G = G, sw->D = D, sw->F = F, sw->E = E;
    ALLOC(sw->logits, (size_t)G * E);
    ALLOC(sw->probs, (size_t)G * E);
    ALLOC(sw->dlogits, (size_t)G * E);
    ALLOC(sw->gate, G);
    ALLOC(sw->lse, G);
    ALLOC(sw->gamma, G);
    ALLOC(sw->expert, G);
    ALLOC(sw->u, (size_t)G * D);
    ALLOC(sw->xr, (size_t)G * D);
    ALLOC(sw->dxr, (size_t)G * D);
    /* the plan block: stats [2] doubles first (8-aligned), then counts, kept, offsets */
    sw->plan_bytes = 2 * sizeof(double) + sizeof(int32_t) * (3 * (size_t)E + 1);
    sw->plan = be->alloc(be, sw->plan_bytes);
    sw->plan_host = calloc(1, sw->plan_bytes);
    if (!sw->plan || !sw->plan_host) goto oom;
    sw->stats = sw->plan;
    sw->counts = (int32_t *)(void *)(sw->stats + 2);
    sw->kept = sw->counts + E;
    sw->offsets = sw->kept + E;
    sw->h_counts = (const int32_t *)(const void *)((const double *)sw->plan_host + 2);
    sw->h_kept = sw->h_counts + E;
    sw->h_offsets = sw->h_kept + E;
    ALLOC(sw->order, G);
    ALLOC(sw->slot, G);
    ALLOC(sw->gk, G);
    ALLOC(sw->f, E);
    LP_ALLOC(sw->xe, (size_t)G * D);
    LP_ALLOC(sw->ye, (size_t)G * D);
    LP_ALLOC(sw->dye, (size_t)G * D);
    LP_ALLOC(sw->dxe, (size_t)G * D);
    LP_ALLOC(sw->he, (size_t)G * F);
    LP_ALLOC(sw->ge, (size_t)G * F);
    ALLOC(sw->mask, (size_t)G * F);
    LP_ALLOC(sw->dge, (size_t)G * F);
    LP_ALLOC(sw->dhe, (size_t)G * F);
    *out = sw;
    return SY_OK;
oom:
    sy_switch_destroy(&sw);
    return sy_err_set(SY_ENOMEM, "switch layer: out of memory (G=%d D=%d F=%d E=%d)", G, D, F, E);
}

void sy_switch_destroy(sy_switch_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_switch_t *sw = *self_p;
    sy_backend_t *be = sw->be;
    void *bufs[] = {sw->wr, sw->logits, sw->probs, sw->dlogits, sw->gate, sw->lse, sw->gamma, sw->expert,
                    sw->u, sw->xr, sw->dxr, sw->plan, sw->order, sw->slot, sw->gk, sw->f,
                    sw->xe, sw->ye, sw->dye, sw->dxe, sw->he, sw->ge, sw->mask, sw->dge, sw->dhe};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->free(be, bufs[i]);
    free(sw->plan_host);
    free(sw);
    *self_p = NULL;
}

int sy_switch_capacity(int G, int E, double capacity_factor) {
    double c = ceil(capacity_factor * (double)G / (double)E);
    if (c < 4.0) c = 4.0;
    if (c > (double)G) c = (double)G;
    return (int)c;
}

/* ---- route: router logits, top-1, capacity, aux and z losses, dispatch plan ---- */

/* The router GEMMs stay fp32 whatever the precision (spec §4): every operand but the bf16
 * input h (widened exactly) is a plain fp32 buffer, so nothing is rounded. The bf16-router
 * ablation reads the rounded weights sw->wr and rounds the GEMM's output (a plain buffer,
 * rounded in place: round_bf16). */
static void router_matmul_fwd(sy_switch_t *sw, float *y, const float *x, const float *W, int N,
                              int in, int out) {
    sy_backend_t *be = sw->be;
    const bool r16 = sw->router_bf16 && be->bf16;
    be->matmul_fwd(be, y, x, r16 ? sw->wr : W, N, in, out);
    if (r16) be->round_bf16(be, y, (size_t)N * out);
}

static void router_matmul_bwd(sy_switch_t *sw, float *dx, float *dW, const float *dy,
                              const float *x, const float *W, int N, int in, int out) {
    sy_backend_t *be = sw->be;
    const bool r16 = sw->router_bf16 && be->bf16;
    be->matmul_bwd(be, dx, dW, dy, x, r16 ? sw->wr : W, N, in, out, false);
    if (r16) be->round_bf16(be, dx, (size_t)N * in);
}

sy_status sy_switch_set_router_bf16(sy_switch_t *sw, bool on) {
    if (on && !sw->wr) {
        sw->wr = sw->be->alloc(sw->be, sizeof(float) * (size_t)sw->E * sw->D);
        if (!sw->wr) return sy_err_set(SY_ENOMEM, "switch layer: out of memory (bf16 router)");
    }
    sw->router_bf16 = on;
    return SY_OK;
}

void sy_switch_route(sy_switch_t *sw, const float *h, const float *Wr, double capacity_factor,
                     double jitter_eps, sy_switch_key key) {
    sy_backend_t *be = sw->be;
    const int G = sw->G, D = sw->D, E = sw->E;
    const float *x = h;
    const bool r16 = sw->router_bf16 && be->bf16;
    sw->jitter = jitter_eps > 0.0;
    if (sw->jitter) {
        be->jitter_fwd(be, sw->u, sw->xr, h, G, D, (float)jitter_eps, key.seed, key.step,
                       key.micro, key.layer);
        x = sw->xr;
    }
    if (r16) { /* the ablation's bf16 router weights */
        be->copy(be, sw->wr, Wr, sizeof(float) * (size_t)E * D);
        be->round_bf16(be, sw->wr, (size_t)E * D);
    }
    router_matmul_fwd(sw, sw->logits, x, Wr, G, D, E);
    be->router_fwd(be, sw->probs, sw->expert, sw->gate, sw->lse, sw->logits, G, E);
    if (r16) {
        be->round_bf16(be, sw->probs, (size_t)G * E);
        be->round_bf16(be, sw->gate, (size_t)G);
    }

    /* Capacity and in-order drops (earlier tokens of the group win a slot), the dispatch plan,
     * and the aux loss E·Σ f_i P_i (f counted before capacity) and z-loss mean lse², fp64. */
    sw->C = sy_switch_capacity(G, E, capacity_factor);
    be->route_plan(be, sw->counts, sw->kept, sw->offsets, sw->order, sw->slot, sw->gk, sw->expert,
                   sw->gate, G, E, sw->C);
    be->route_stats(be, sw->stats, sw->f, sw->probs, sw->lse, sw->counts, G, E);
    /* The per-layer results the host needs (sizes, metrics): one download. */
    be->download(be, sw->plan_host, sw->plan, sw->plan_bytes);
    const double *st = sw->plan_host;
    sw->aux_group = st[0];
    sw->z_group = st[1];
    sw->n_kept = sw->h_offsets[E];
}

void sy_switch_route_bwd(sy_switch_t *sw, const float *h, const float *Wr, float *dWr, float *dh,
                         float aux_scale, float z_scale) {
    sy_backend_t *be = sw->be;
    const int G = sw->G, D = sw->D, E = sw->E;
    be->router_bwd(be, sw->dlogits, sw->probs, sw->expert, sw->gamma, sw->lse, sw->f, aux_scale,
                   z_scale, G, E);
    if (sw->router_bf16 && be->bf16) be->round_bf16(be, sw->dlogits, (size_t)G * E);
    const float *x = sw->jitter ? sw->xr : h;
    router_matmul_bwd(sw, sw->dxr, dWr, sw->dlogits, x, Wr, G, D, E);
    /* dh += u ⊙ dxr (fp32 router path; the sum lands in the activation-gradient precision) */
    be->jitter_bwd(be, dh, sw->dxr, sw->jitter ? sw->u : NULL, (size_t)G * D);
    be->round_bf16(be, dh, (size_t)G * D);
}

/* ---- dispatch: gather kept tokens into expert-major rows ---- */

void sy_switch_dispatch(sy_switch_t *sw, const float *h) {
    sw->be->gather_rows(sw->be, sw->xe, h, sw->order, sw->n_kept, sw->D);
}

void sy_switch_dispatch_bwd(sy_switch_t *sw, float *dh) {
    sw->be->zero(sw->be, dh, sizeof(float) * (size_t)sw->G * sw->D);
    sw->be->scatter_add_rows(sw->be, dh, sw->dxe, sw->order, sw->n_kept, sw->D);
}

/* ---- experts: each expert's MLP over its rows ---- */

/* Chunks per grouped call (bounded stack arrays; a larger nc runs in slices, same numbers). */
#define SY_EXPERT_GROUP 64

void sy_experts_fwd(sy_backend_t *be, const sy_expert_rows *c, int nc, int D, int F,
                    double dropout, sy_switch_key key) {
    for (int s0 = 0; s0 < nc; s0 += SY_EXPERT_GROUP) {
        const int k = nc - s0 < SY_EXPERT_GROUP ? nc - s0 : SY_EXPERT_GROUP;
        const sy_expert_rows *ck = c + s0;
        float *out[SY_EXPERT_GROUP];
        const float *in[SY_EXPERT_GROUP], *W[SY_EXPERT_GROUP];
        int N[SY_EXPERT_GROUP];
        float *act[SY_EXPERT_GROUP];
        for (int i = 0; i < k; i++) {
            out[i] = ck[i].he, act[i] = ck[i].ge, in[i] = ck[i].xe, W[i] = ck[i].w->W1;
            N[i] = ck[i].n;
        }
        /* he[n,F] = xe·W1ᵀ, ge = gelu(he): fused into the GEMM where the backend can */
        if (be->matmul_gelu_fwd_group)
            be->matmul_gelu_fwd_group(be, out, act, in, W, N, k, D, F);
        else
            be->matmul_fwd_group(be, out, in, W, N, k, D, F);
        for (int i = 0; i < k; i++) {
            if (ck[i].n == 0) continue;
            if (!be->matmul_gelu_fwd_group) be->gelu_fwd(be, ck[i].ge, ck[i].he, (size_t)ck[i].n * F);
            if (dropout > 0.0) {
                float keep = 1.0f - (float)dropout, inv = 1.0f / keep;
                be->dropout_mask(be, ck[i].mask, ck[i].tok, ck[i].micro, ck[i].n, F, keep, inv,
                                 key.seed, key.step, key.micro, key.layer);
                be->mul_inplace(be, ck[i].ge, ck[i].mask, (size_t)ck[i].n * F);
            }
        }
        for (int i = 0; i < k; i++) out[i] = ck[i].ye, in[i] = ck[i].ge, W[i] = ck[i].w->W2;
        be->matmul_fwd_group(be, out, in, W, N, k, F, D); /* ye[n,D] = ge·W2ᵀ */
    }
}

void sy_experts_bwd(sy_backend_t *be, const sy_expert_grad_rows *c, int nc, int D, int F) {
    for (int s0 = 0; s0 < nc; s0 += SY_EXPERT_GROUP) {
        const int k = nc - s0 < SY_EXPERT_GROUP ? nc - s0 : SY_EXPERT_GROUP;
        const sy_expert_grad_rows *ck = c + s0;
        float *dx[SY_EXPERT_GROUP], *dW[SY_EXPERT_GROUP];
        double *dW64[SY_EXPERT_GROUP];
        const float *dy[SY_EXPERT_GROUP], *x[SY_EXPERT_GROUP], *W[SY_EXPERT_GROUP];
        int N[SY_EXPERT_GROUP];
        /* dge = dye·W2, dW2 += dyeᵀ·ge */
        for (int i = 0; i < k; i++) {
            dx[i] = ck[i].dge, dW[i] = ck[i].w->dW2, dW64[i] = ck[i].w->acc2;
            dy[i] = ck[i].dye, x[i] = ck[i].ge, W[i] = ck[i].w->W2, N[i] = ck[i].n;
        }
        /* then dge ⊙= mask, dhe = dge·gelu'(he): fused into the GEMM where the backend can */
        if (be->matmul_gelu_bwd_group) {
            const float *mask[SY_EXPERT_GROUP], *pre[SY_EXPERT_GROUP];
            float *dpre[SY_EXPERT_GROUP];
            for (int i = 0; i < k; i++) mask[i] = ck[i].mask, pre[i] = ck[i].he, dpre[i] = ck[i].dhe;
            be->matmul_gelu_bwd_group(be, dx, dW, dW64, dy, x, W, mask, pre, dpre, N, k, F, D);
        } else {
            be->matmul_bwd_group(be, dx, dW, dW64, dy, x, W, N, k, F, D);
            for (int i = 0; i < k; i++) {
                if (ck[i].n == 0) continue;
                if (ck[i].mask) be->mul_inplace(be, ck[i].dge, ck[i].mask, (size_t)ck[i].n * F);
                be->gelu_bwd(be, ck[i].dhe, ck[i].dge, ck[i].he, (size_t)ck[i].n * F);
            }
        }
        /* dxe = dhe·W1, dW1 += dheᵀ·xe */
        for (int i = 0; i < k; i++) {
            dx[i] = ck[i].dxe, dW[i] = ck[i].w->dW1, dW64[i] = ck[i].w->acc1;
            dy[i] = ck[i].dhe, x[i] = ck[i].xe, W[i] = ck[i].w->W1;
        }
        be->matmul_bwd_group(be, dx, dW, dW64, dy, x, W, N, k, D, F);
    }
}

void sy_switch_experts(sy_switch_t *sw, const sy_expert_weights *ex, int e0, int e1,
                       double dropout, sy_switch_key key) {
    const int D = sw->D, F = sw->F;
    sw->dropout = (float)dropout;
    if (e1 <= e0) return;
    sy_expert_rows c[e1 - e0];
    for (int e = e0; e < e1; e++) {
        const int r0 = sw->h_offsets[e];
        c[e - e0] = (sy_expert_rows){.w = &ex[e], .n = sw->h_offsets[e + 1] - r0,
                                     .xe = sw->xe + (size_t)r0 * D, .he = sw->he + (size_t)r0 * F,
                                     .ge = sw->ge + (size_t)r0 * F,
                                     .mask = sw->mask + (size_t)r0 * F,
                                     .ye = sw->ye + (size_t)r0 * D, .tok = sw->order + r0};
    }
    sy_experts_fwd(sw->be, c, e1 - e0, D, F, dropout, key);
}

void sy_switch_experts_bwd(sy_switch_t *sw, const sy_expert_weights *ex, int e0, int e1) {
    const int D = sw->D, F = sw->F;
    if (e1 <= e0) return;
    sy_expert_grad_rows c[e1 - e0];
    for (int e = e0; e < e1; e++) {
        const int r0 = sw->h_offsets[e];
        c[e - e0] = (sy_expert_grad_rows){
            .w = &ex[e], .n = sw->h_offsets[e + 1] - r0, .dye = sw->dye + (size_t)r0 * D,
            .xe = sw->xe + (size_t)r0 * D, .he = sw->he + (size_t)r0 * F,
            .ge = sw->ge + (size_t)r0 * F,
            .mask = sw->dropout > 0.0f ? sw->mask + (size_t)r0 * F : NULL,
            .dge = sw->dge + (size_t)r0 * F, .dhe = sw->dhe + (size_t)r0 * F,
            .dxe = sw->dxe + (size_t)r0 * D};
    }
    sy_experts_bwd(sw->be, c, e1 - e0, D, F);
}

/* ---- combine: y_t = g_t · Expert(h_t), dropped tokens 0 ---- */

void sy_switch_combine(sy_switch_t *sw, float *out) {
    sw->be->zero(sw->be, out, sizeof(float) * (size_t)sw->G * sw->D);
    sw->be->scatter_rows_scaled(sw->be, out, sw->ye, sw->order, sw->gk, sw->n_kept, sw->D);
}

void sy_switch_combine_bwd(sy_switch_t *sw, const float *dout) {
    /* γ_t = ⟨dy_t, Expert(h_t)⟩ per kept token; expert-output grad = g_t · dy_t */
    float *dot = sw->dlogits; /* [n_kept] scratch; dlogits is recomputed in route_bwd */
    sw->be->gather_dot_scale(sw->be, dot, sw->dye, dout, sw->ye, sw->order, sw->gk, sw->n_kept,
                             sw->D);
    sw->be->route_gamma(sw->be, sw->gamma, dot, sw->slot, sw->G);
}

sy_switch_info sy_switch_get_info(const sy_switch_t *sw) {
    return (sy_switch_info){.G = sw->G, .E = sw->E, .C = sw->C, .n_kept = sw->n_kept,
                            .aux_group = sw->aux_group, .z_group = sw->z_group,
                            .counts = sw->h_counts, .kept = sw->h_kept, .expert = sw->expert,
                            .gate = sw->gate, .probs = sw->probs, .order = sw->order,
                            .offsets = sw->h_offsets};
}
