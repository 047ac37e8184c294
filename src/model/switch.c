/* The Switch layer (model spec §2): each step's forward beside its backward, in the order the
 * forward runs them (route, dispatch, experts, combine); the steps and their contracts are in
 * switch.h. */
#include "model/switch.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "switch_internal.h"

#define ALLOC(ptr, n)                                                        \
    do {                                                                     \
        (ptr) = be->alloc(be, (size_t)(n) * sizeof(*(ptr)));                 \
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
    ALLOC(sw->counts, E);
    ALLOC(sw->kept, E);
    ALLOC(sw->offsets, E + 1);
    ALLOC(sw->order, G);
    ALLOC(sw->gk, G);
    ALLOC(sw->f, E);
    ALLOC(sw->xe, (size_t)G * D);
    ALLOC(sw->ye, (size_t)G * D);
    ALLOC(sw->dye, (size_t)G * D);
    ALLOC(sw->dxe, (size_t)G * D);
    ALLOC(sw->he, (size_t)G * F);
    ALLOC(sw->ge, (size_t)G * F);
    ALLOC(sw->mask, (size_t)G * F);
    ALLOC(sw->dge, (size_t)G * F);
    ALLOC(sw->dhe, (size_t)G * F);
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
    void *bufs[] = {sw->logits, sw->probs, sw->dlogits, sw->gate, sw->lse, sw->gamma, sw->expert,
                    sw->u, sw->xr, sw->dxr, sw->counts, sw->kept, sw->offsets, sw->order, sw->gk,
                    sw->f, sw->xe, sw->ye, sw->dye, sw->dxe, sw->he, sw->ge, sw->mask, sw->dge,
                    sw->dhe};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->free(be, bufs[i]);
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

/* The router GEMMs stay fp32 whatever the precision (spec §4): switch rounding off around them. */
static void router_matmul_fwd(sy_backend_t *be, float *y, const float *x, const float *W, int N,
                              int in, int out) {
    bool b = be->bf16;
    be->bf16 = false;
    be->matmul_fwd(be, y, x, W, N, in, out);
    be->bf16 = b;
}

static void router_matmul_bwd(sy_backend_t *be, float *dx, float *dW, const float *dy,
                              const float *x, const float *W, int N, int in, int out) {
    bool b = be->bf16;
    be->bf16 = false;
    be->matmul_bwd(be, dx, dW, dy, x, W, N, in, out, false);
    be->bf16 = b;
}

void sy_switch_route(sy_switch_t *sw, const float *h, const float *Wr, double capacity_factor,
                     double jitter_eps, sy_switch_key key) {
    sy_backend_t *be = sw->be;
    const int G = sw->G, D = sw->D, E = sw->E;
    const float *x = h;
    sw->jitter = jitter_eps > 0.0;
    if (sw->jitter) {
        float eps = (float)jitter_eps;
        for (int t = 0; t < G; t++) {
            sy_rng_t r = sy_rng_key(key.seed, "router.jitter", (uint64_t)key.step,
                                    (uint64_t)key.micro, ((uint64_t)key.layer << 32) | (uint64_t)t);
            float *u = sw->u + (size_t)t * D;
            float *xr = sw->xr + (size_t)t * D;
            const float *hr = h + (size_t)t * D;
            for (int i = 0; i < D; i++) {
                u[i] = 1.0f - eps + 2.0f * eps * sy_rng_uniform(&r);
                xr[i] = hr[i] * u[i];
            }
        }
        x = sw->xr;
    }
    router_matmul_fwd(be, sw->logits, x, Wr, G, D, E);
    be->router_fwd(be, sw->probs, sw->expert, sw->gate, sw->lse, sw->logits, G, E);

    /* Capacity and in-order drops: earlier tokens of the group win a slot. */
    sw->C = sy_switch_capacity(G, E, capacity_factor);
    memset(sw->counts, 0, sizeof(int32_t) * E);
    memset(sw->kept, 0, sizeof(int32_t) * E);
    for (int t = 0; t < G; t++) {
        int e = sw->expert[t];
        if (sw->counts[e] < sw->C) sw->kept[e]++;
        sw->counts[e]++;
    }
    sw->offsets[0] = 0;
    for (int e = 0; e < E; e++) sw->offsets[e + 1] = sw->offsets[e] + sw->kept[e];
    sw->n_kept = sw->offsets[E];
    /* fill order: expert-major, token order within an expert */
    int32_t fill[E];
    for (int e = 0; e < E; e++) fill[e] = sw->offsets[e];
    for (int t = 0; t < G; t++) {
        int e = sw->expert[t];
        if (fill[e] < sw->offsets[e + 1]) {
            sw->order[fill[e]] = t;
            sw->gk[fill[e]] = sw->gate[t];
            fill[e]++;
        }
    }

    /* Aux loss E·Σ f_i P_i with f counted before capacity; z-loss mean lse². fp64 sums. */
    double aux = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int t = 0; t < G; t++) P += sw->probs[(size_t)t * E + e];
        sw->f[e] = (float)((double)sw->counts[e] / G);
        aux += ((double)sw->counts[e] / G) * (P / G);
    }
    for (int t = 0; t < G; t++) z += (double)sw->lse[t] * sw->lse[t];
    sw->aux_group = E * aux;
    sw->z_group = z / G;
}

void sy_switch_route_bwd(sy_switch_t *sw, const float *h, const float *Wr, float *dWr, float *dh,
                         float aux_scale, float z_scale) {
    sy_backend_t *be = sw->be;
    const int G = sw->G, D = sw->D, E = sw->E;
    be->router_bwd(be, sw->dlogits, sw->probs, sw->expert, sw->gamma, sw->lse, sw->f, aux_scale,
                   z_scale, G, E);
    const float *x = sw->jitter ? sw->xr : h;
    router_matmul_bwd(be, sw->dxr, dWr, sw->dlogits, x, Wr, G, D, E);
    /* dh += u ⊙ dxr (fp32 router path; the sum lands in the activation-gradient precision) */
    for (int t = 0; t < G; t++) {
        float *d = dh + (size_t)t * D;
        const float *g = sw->dxr + (size_t)t * D;
        const float *u = sw->u + (size_t)t * D;
        if (sw->jitter)
            for (int i = 0; i < D; i++) d[i] += u[i] * g[i];
        else
            for (int i = 0; i < D; i++) d[i] += g[i];
    }
    be->round_bf16(be, dh, (size_t)G * D);
}

/* ---- dispatch: gather kept tokens into expert-major rows ---- */

void sy_switch_dispatch(sy_switch_t *sw, const float *h) {
    sw->be->gather_rows(sw->be, sw->xe, h, sw->order, sw->n_kept, sw->D);
}

void sy_switch_dispatch_bwd(sy_switch_t *sw, float *dh) {
    memset(dh, 0, sizeof(float) * (size_t)sw->G * sw->D);
    sw->be->scatter_add_rows(sw->be, dh, sw->dxe, sw->order, sw->n_kept, sw->D);
}

/* ---- experts: each expert's MLP over its rows ---- */

/* Chunks per grouped call (bounded stack arrays; a larger nc runs in slices, same numbers). */
#define SY_EXPERT_GROUP 64

static void expert_dropout_mask(const sy_expert_rows *c, int F, double dropout, sy_switch_key key) {
    float keep = 1.0f - (float)dropout, inv = 1.0f / keep;
    for (int i = 0; i < c->n; i++) {
        sy_rng_t r = sy_rng_key(key.seed, "expert.dropout", (uint64_t)key.step,
                                (uint64_t)(c->micro ? c->micro[i] : key.micro),
                                ((uint64_t)key.layer << 32) | (uint64_t)c->tok[i]);
        float *mk = c->mask + (size_t)i * F;
        for (int j = 0; j < F; j++) mk[j] = sy_rng_uniform(&r) < keep ? inv : 0.0f;
    }
}

void sy_experts_fwd(sy_backend_t *be, const sy_expert_rows *c, int nc, int D, int F,
                    double dropout, sy_switch_key key) {
    for (int s0 = 0; s0 < nc; s0 += SY_EXPERT_GROUP) {
        const int k = nc - s0 < SY_EXPERT_GROUP ? nc - s0 : SY_EXPERT_GROUP;
        const sy_expert_rows *ck = c + s0;
        float *out[SY_EXPERT_GROUP];
        const float *in[SY_EXPERT_GROUP], *W[SY_EXPERT_GROUP];
        int N[SY_EXPERT_GROUP];
        for (int i = 0; i < k; i++) out[i] = ck[i].he, in[i] = ck[i].xe, W[i] = ck[i].w->W1, N[i] = ck[i].n;
        be->matmul_fwd_group(be, out, in, W, N, k, D, F); /* he[n,F] = xe·W1ᵀ */
        for (int i = 0; i < k; i++) {
            if (ck[i].n == 0) continue;
            be->gelu_fwd(be, ck[i].ge, ck[i].he, (size_t)ck[i].n * F);
            if (dropout > 0.0) {
                expert_dropout_mask(&ck[i], F, dropout, key);
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
        be->matmul_bwd_group(be, dx, dW, dW64, dy, x, W, N, k, F, D);
        for (int i = 0; i < k; i++) {
            if (ck[i].n == 0) continue;
            if (ck[i].mask) be->mul_inplace(be, ck[i].dge, ck[i].mask, (size_t)ck[i].n * F);
            be->gelu_bwd(be, ck[i].dhe, ck[i].dge, ck[i].he, (size_t)ck[i].n * F);
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
        const int r0 = sw->offsets[e];
        c[e - e0] = (sy_expert_rows){.w = &ex[e], .n = sw->offsets[e + 1] - r0,
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
        const int r0 = sw->offsets[e];
        c[e - e0] = (sy_expert_grad_rows){
            .w = &ex[e], .n = sw->offsets[e + 1] - r0, .dye = sw->dye + (size_t)r0 * D,
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
    memset(out, 0, sizeof(float) * (size_t)sw->G * sw->D);
    sw->be->scatter_rows_scaled(sw->be, out, sw->ye, sw->order, sw->gk, sw->n_kept, sw->D);
}

void sy_switch_combine_bwd(sy_switch_t *sw, const float *dout) {
    /* γ_t = ⟨dy_t, Expert(h_t)⟩ per kept token; expert-output grad = g_t · dy_t */
    float *dot = sw->dlogits; /* [n_kept] scratch; dlogits is recomputed in route_bwd */
    sw->be->gather_dot_scale(sw->be, dot, sw->dye, dout, sw->ye, sw->order, sw->gk, sw->n_kept,
                             sw->D);
    memset(sw->gamma, 0, sizeof(float) * sw->G);
    for (int i = 0; i < sw->n_kept; i++) sw->gamma[sw->order[i]] = dot[i];
}

sy_switch_info sy_switch_get_info(const sy_switch_t *sw) {
    return (sy_switch_info){.G = sw->G, .E = sw->E, .C = sw->C, .n_kept = sw->n_kept,
                            .aux_group = sw->aux_group, .z_group = sw->z_group,
                            .counts = sw->counts, .kept = sw->kept, .expert = sw->expert,
                            .gate = sw->gate, .probs = sw->probs, .order = sw->order,
                            .offsets = sw->offsets};
}
