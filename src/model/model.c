/* The Switch Transformer LM (model spec §1-4): parameter table, initialisation, and the
 * forward/backward of one micro-batch through the backend ops, one block at a time (each
 * block's forward beside its backward; sy_model_fwd_bwd at the end strings them together). */
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/rng.h"
#include "model/switch.h"
#include "model/switch_ep.h"

/* Indices into the parameter table for one block. */
typedef struct {
    int ln1, qkv, proj, ln2;
    int fc, fproj;       /* dense MLP, -1 in Switch layers */
    int router;          /* Switch layers, -1 in dense */
    int *ex_fc, *ex_proj;/* [E] expert tensors, Switch layers */
    int sw_index;        /* index among Switch layers, -1 in dense */
} block_ids;

/* Saved activations of one block for one micro-batch. */
typedef struct {
    float *x_in;        /* [N,D] residual input */
    float *ln1, *ln1_mean, *ln1_rstd;
    float *qkv;         /* [N,3D] */
    float *att;         /* [B,H,T,T] */
    float *atty;        /* [N,D] */
    float *x_mid;       /* [N,D] residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd;
    float *fc_pre, *fc_act; /* [N,F] dense MLP */
    sy_switch_t *sw;    /* Switch layer state */
} block_acts;

struct sy_model {
    sy_model_dims d;
    sy_backend_t *be;
    int n_params, n_switch;
    sy_param_t *params_tab;
    size_t numel, dense_numel;
    float *params, *grads;
    float **work;       /* [n_params] bf16 mode: each GEMM weight's bf16 working copy (model
                         * spec §4 1.), an activation buffer of its own (NULL for the others,
                         * which read params: wt()); NULL in fp32 mode */
    block_ids *blk;
    block_acts *act;
    int wte, wpe, lnf;
    sy_expert_weights *ex; /* [E] scratch for the current Switch layer */
    int32_t *inp, *tgt;    /* [N] each, one backend buffer [2N]: tgt = inp + N */
    int32_t *tok_host;     /* [2N] host staging of inp, tgt (one upload per micro-batch) */
    float *init_host;      /* [INIT_CHUNK] host staging of sy_model_init */
    float *x_out, *lnf_y, *lnf_mean, *lnf_rstd, *logits; /* x_out [N,D], logits [N,V] */
    float *dx, *dln, *dqkv, *datty, *dfc_act, *dfc_pre, *tmp; /* backward scratch */
    int32_t *counts;       /* [n_switch, E] host: downloaded from each Switch layer's route */
    double *gstats;        /* [1+E] backend: dense Σg², then each expert's (sy_model_grad_sqnorms) */
    double *acc;           /* fp64 gradient accumulator (micro-batch contributions are added) */
    bool acc_dirty;        /* acc holds contributions not yet rounded into grads */
    bool *gdirect;         /* [n_params] dense GEMM weight whose gradient goes straight into
                            * acc (matmul_bwd_acc64), not through the fp32 grads buffer */
    sy_ep_t *ep;           /* expert parallelism (NULL: every expert local) */
    int ep_rank;
};

static int add_param(sy_model_t *m, int cap, const char *name, int ndim, int64_t d0, int64_t d1,
                     int layer, int expert, bool router) {
    if (m->n_params >= cap) return -1;
    sy_param_t *p = &m->params_tab[m->n_params];
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->m_name, sizeof p->m_name, "m.%s", name);
    snprintf(p->v_name, sizeof p->v_name, "v.%s", name);
    p->ndim = ndim;
    p->shape[0] = d0;
    p->shape[1] = ndim > 1 ? d1 : 1;
    p->numel = (size_t)d0 * (ndim > 1 ? (size_t)d1 : 1);
    p->offset = m->numel;
    p->layer = layer;
    p->expert = expert;
    p->decay = ndim == 2;
    p->router = router;
    p->lowp = ndim == 2 && !router;
    m->numel += p->numel;
    return m->n_params++;
}

sy_model_dims sy_model_dims_from_config(const sy_config_t *c) {
    return (sy_model_dims){
        .V = c->model.vocab_size, .T = c->model.seq_len, .D = c->model.d_model,
        .L = c->model.n_layers, .H = c->model.n_heads, .F = c->model.d_ff,
        .E = c->model.n_experts, .S = c->model.switch_every, .B = c->train.micro_batch_seqs,
        .capacity_factor = c->model.capacity_factor,
        .eval_capacity_factor = c->model.eval_capacity_factor,
        .aux_coef = c->model.aux_loss_coef, .z_coef = c->model.z_loss_coef,
        .jitter = c->model.router_jitter, .expert_dropout = c->model.expert_dropout,
        .init_scale = c->model.init_scale,
        .router_bf16 = c->model.router_precision == SY_PREC_BF16};
}

bool sy_model_is_switch(const sy_model_t *m, int l) {
    return m->d.S > 0 && m->d.E >= 1 && (l % m->d.S) == m->d.S - 1;
}

#define INIT_CHUNK ((size_t)1 << 16) /* floats generated on the host per upload in init */

/* a plain backend buffer of n elements */
#define BE_ALLOC(ptr, n)                                                   \
    do {                                                                     \
        (ptr) = be->alloc(be, (size_t)(n) * sizeof(*(ptr)));                 \
        if (!(ptr)) goto oom;                                                \
    } while (0)
/* an activation buffer of n elements: bf16 storage in bf16 mode (backend.h "Precision") */
#define LP_ALLOC(ptr, n)                                                     \
    do {                                                                     \
        (ptr) = sy_alloc_act(be, (size_t)(n));                               \
        if (!(ptr)) goto oom;                                                \
    } while (0)

sy_status sy_model_new(const sy_model_dims *dims, sy_backend_t *be, sy_model_t **out) {
    sy_model_t *m = calloc(1, sizeof *m);
    if (!m) return sy_err_set(SY_ENOMEM, "model: out of memory");
    m->d = *dims;
    m->be = be;
    const int V = dims->V, T = dims->T, D = dims->D, L = dims->L, H = dims->H, F = dims->F,
              E = dims->E, B = dims->B;
    const size_t N = (size_t)B * T;
    char name[SY_NAME_MAX];

    int cap = 3 + L * (6 + 2 * E);
    m->params_tab = calloc((size_t)cap, sizeof(sy_param_t));
    m->blk = calloc((size_t)L, sizeof(block_ids));
    m->act = calloc((size_t)L, sizeof(block_acts));
    m->ex = calloc((size_t)E, sizeof(sy_expert_weights));
    if (!m->params_tab || !m->blk || !m->act || !m->ex) goto oom;

    /* dense tensors, spec §7 order */
    m->wte = add_param(m, cap, "wte", 2, V, D, -1, -1, false);
    m->wpe = add_param(m, cap, "wpe", 2, T, D, -1, -1, false);
    for (int l = 0; l < L; l++) {
        block_ids *b = &m->blk[l];
        snprintf(name, sizeof name, "blocks.%d.ln1.weight", l);
        b->ln1 = add_param(m, cap, name, 1, D, 1, l, -1, false);
        snprintf(name, sizeof name, "blocks.%d.attn.qkv.weight", l);
        b->qkv = add_param(m, cap, name, 2, 3 * D, D, l, -1, false);
        snprintf(name, sizeof name, "blocks.%d.attn.proj.weight", l);
        b->proj = add_param(m, cap, name, 2, D, D, l, -1, false);
        snprintf(name, sizeof name, "blocks.%d.ln2.weight", l);
        b->ln2 = add_param(m, cap, name, 1, D, 1, l, -1, false);
        b->fc = b->fproj = b->router = b->sw_index = -1;
        if (sy_model_is_switch(m, l)) {
            snprintf(name, sizeof name, "blocks.%d.moe.router.weight", l);
            b->router = add_param(m, cap, name, 2, E, D, l, -1, true);
            b->sw_index = m->n_switch++;
            b->ex_fc = calloc((size_t)E, sizeof(int));
            b->ex_proj = calloc((size_t)E, sizeof(int));
            if (!b->ex_fc || !b->ex_proj) goto oom;
        } else {
            snprintf(name, sizeof name, "blocks.%d.mlp.fc.weight", l);
            b->fc = add_param(m, cap, name, 2, F, D, l, -1, false);
            snprintf(name, sizeof name, "blocks.%d.mlp.proj.weight", l);
            b->fproj = add_param(m, cap, name, 2, D, F, l, -1, false);
        }
    }
    m->lnf = add_param(m, cap, "ln_f.weight", 1, D, 1, -1, -1, false);
    m->dense_numel = m->numel;
    /* qkv, proj, fc, fproj: one GEMM each writes their gradient (wte also gets the embedding's,
     * the router and LayerNorms are not GEMM weights of matmul_bwd) */
    m->gdirect = calloc((size_t)cap, sizeof(bool));
    if (!m->gdirect) goto oom;
    for (int l = 0; l < L; l++) {
        const block_ids *b = &m->blk[l];
        m->gdirect[b->qkv] = m->gdirect[b->proj] = true;
        if (b->fc >= 0) m->gdirect[b->fc] = m->gdirect[b->fproj] = true;
    }
    /* expert tensors, grouped by expert so each expert file is one contiguous range */
    for (int e = 0; e < E; e++) {
        for (int l = 0; l < L; l++) {
            block_ids *b = &m->blk[l];
            if (b->sw_index < 0) continue;
            snprintf(name, sizeof name, "blocks.%d.moe.experts.%d.fc.weight", l, e);
            b->ex_fc[e] = add_param(m, cap, name, 2, F, D, l, e, false);
            snprintf(name, sizeof name, "blocks.%d.moe.experts.%d.proj.weight", l, e);
            b->ex_proj[e] = add_param(m, cap, name, 2, D, F, l, e, false);
        }
    }

    BE_ALLOC(m->params, m->numel);
    BE_ALLOC(m->grads, m->numel);
    BE_ALLOC(m->acc, m->numel);
    if (be->bf16) {
        m->work = calloc((size_t)m->n_params, sizeof *m->work);
        if (!m->work) goto oom;
        for (int i = 0; i < m->n_params; i++)
            if (m->params_tab[i].lowp) LP_ALLOC(m->work[i], m->params_tab[i].numel);
    }

    for (int l = 0; l < L; l++) {
        block_acts *a = &m->act[l];
        LP_ALLOC(a->x_in, N * D);
        LP_ALLOC(a->ln1, N * D);
        BE_ALLOC(a->ln1_mean, N);
        BE_ALLOC(a->ln1_rstd, N);
        LP_ALLOC(a->qkv, N * 3 * D);
        BE_ALLOC(a->att, (size_t)B * H * T * T);
        LP_ALLOC(a->atty, N * D);
        LP_ALLOC(a->x_mid, N * D);
        LP_ALLOC(a->ln2, N * D);
        BE_ALLOC(a->ln2_mean, N);
        BE_ALLOC(a->ln2_rstd, N);
        if (m->blk[l].sw_index >= 0) {
            if (sy_switch_new(be, (int)N, D, F, E, &a->sw) != SY_OK) goto oom;
            if (sy_switch_set_router_bf16(a->sw, dims->router_bf16) != SY_OK) goto oom;
        } else {
            LP_ALLOC(a->fc_pre, N * F);
            LP_ALLOC(a->fc_act, N * F);
        }
    }
    BE_ALLOC(m->inp, 2 * N);
    m->tgt = m->inp + N;
    LP_ALLOC(m->x_out, N * D);
    LP_ALLOC(m->lnf_y, N * D);
    BE_ALLOC(m->lnf_mean, N);
    BE_ALLOC(m->lnf_rstd, N);
    BE_ALLOC(m->logits, N * V);
    LP_ALLOC(m->dx, N * D);
    LP_ALLOC(m->dln, N * D);
    LP_ALLOC(m->tmp, N * D);
    LP_ALLOC(m->dqkv, N * 3 * D);
    LP_ALLOC(m->datty, N * D);
    LP_ALLOC(m->dfc_act, N * F);
    LP_ALLOC(m->dfc_pre, N * F);
    BE_ALLOC(m->gstats, (size_t)E + 1);
    m->counts = calloc((size_t)(m->n_switch ? m->n_switch : 1) * E, sizeof(int32_t));
    m->tok_host = malloc(2 * N * sizeof(int32_t));
    m->init_host = malloc(INIT_CHUNK * sizeof(float));
    if (!m->counts || !m->tok_host || !m->init_host) goto oom;
    *out = m;
    return SY_OK;
oom:
    sy_model_destroy(&m);
    return sy_err_set(SY_ENOMEM, "model: out of memory allocating parameters and activations");
}

void sy_model_destroy(sy_model_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_model_t *m = *self_p;
    sy_backend_t *be = m->be;
#define FREE(p) do { if (p) be->free(be, (p)); } while (0)
    if (m->act) {
        for (int l = 0; l < m->d.L; l++) {
            block_acts *a = &m->act[l];
            FREE(a->x_in); FREE(a->ln1); FREE(a->ln1_mean); FREE(a->ln1_rstd); FREE(a->qkv);
            FREE(a->att); FREE(a->atty); FREE(a->x_mid); FREE(a->ln2); FREE(a->ln2_mean);
            FREE(a->ln2_rstd); FREE(a->fc_pre); FREE(a->fc_act);
            sy_switch_destroy(&a->sw);
        }
    }
    if (m->blk)
        for (int l = 0; l < m->d.L; l++) {
            free(m->blk[l].ex_fc);
            free(m->blk[l].ex_proj);
        }
    if (m->work) {
        for (int i = 0; i < m->n_params; i++) FREE(m->work[i]);
        free(m->work);
    }
    FREE(m->params); FREE(m->grads); FREE(m->acc); FREE(m->inp); FREE(m->x_out); FREE(m->lnf_y);
    FREE(m->lnf_mean); FREE(m->lnf_rstd); FREE(m->logits); FREE(m->dx);
    FREE(m->dln); FREE(m->tmp); FREE(m->dqkv); FREE(m->datty); FREE(m->dfc_act);
    FREE(m->dfc_pre); FREE(m->gstats);
#undef FREE
    free(m->counts);
    free(m->tok_host);
    free(m->init_host);
    free(m->params_tab);
    free(m->gdirect);
    free(m->blk);
    free(m->act);
    free(m->ex);
    free(m);
    *self_p = NULL;
}

const sy_model_dims *sy_model_get_dims(const sy_model_t *m) { return &m->d; }
int sy_model_n_params(const sy_model_t *m) { return m->n_params; }
const sy_param_t *sy_model_param(const sy_model_t *m, int i) { return &m->params_tab[i]; }
size_t sy_model_numel(const sy_model_t *m) { return m->numel; }
size_t sy_model_dense_numel(const sy_model_t *m) { return m->dense_numel; }
float *sy_model_params(sy_model_t *m) { return m->params; }
sy_backend_t *sy_model_backend(const sy_model_t *m) { return m->be; }
float *sy_model_grads(sy_model_t *m) {
    if (m->acc_dirty) {
        m->be->acc_to_f32(m->be, m->grads, m->acc, m->numel);
        m->acc_dirty = false;
    }
    return m->grads;
}

void sy_model_grad_sqnorms(sy_model_t *m, const bool *owned, double *sq) {
    sy_backend_t *be = m->be;
    const float *g = sy_model_grads(m);
    const int E = m->d.E;
    be->zero(be, m->gstats, sizeof(double) * ((size_t)E + 1));
    be->sumsq_add(be, m->gstats, g, m->dense_numel);
    for (int i = 0; i < m->n_params; i++) {
        const sy_param_t *p = &m->params_tab[i];
        if (p->expert < 0 || (owned && !owned[p->expert])) continue;
        be->sumsq_add(be, m->gstats + 1 + p->expert, g + p->offset, p->numel);
    }
    be->download(be, sq, m->gstats, sizeof(double) * ((size_t)E + 1));
}

double *sy_model_grad_acc(sy_model_t *m) { return m->acc; }
int sy_model_n_switch(const sy_model_t *m) { return m->n_switch; }
const int32_t *sy_model_expert_counts(const sy_model_t *m) { return m->counts; }

int sy_model_find(const sy_model_t *m, const char *name) {
    for (int i = 0; i < m->n_params; i++)
        if (!strcmp(m->params_tab[i].name, name)) return i;
    return -1;
}

sy_tensor_ref sy_model_ref(const sy_model_t *m, int i, float *base, const char *name) {
    const sy_param_t *p = &m->params_tab[i];
    sy_tensor_ref r = {.name = name ? name : p->name, .ndim = p->ndim, .data = base + p->offset};
    r.shape[0] = p->shape[0];
    if (p->ndim > 1) r.shape[1] = p->shape[1];
    return r;
}

/* Generated on the host, INIT_CHUNK floats at a time, each chunk uploaded into the masters. */
void sy_model_init(sy_model_t *m, uint64_t seed) {
    float *w = m->init_host;
    for (int i = 0; i < m->n_params; i++) {
        const sy_param_t *p = &m->params_tab[i];
        double sigma = (i == m->wte || i == m->wpe) ? 0.02
                                                    : sqrt(m->d.init_scale / (double)p->shape[1]);
        sy_rng_t r = sy_rng_key(seed, p->name, 0, 0, 0);
        for (size_t k0 = 0; k0 < p->numel; k0 += INIT_CHUNK) {
            size_t n = p->numel - k0 < INIT_CHUNK ? p->numel - k0 : INIT_CHUNK;
            for (size_t k = 0; k < n; k++) {
                if (p->ndim == 1) { /* LayerNorm weights */
                    w[k] = 1.0f;
                    continue;
                }
                double x;
                do {
                    x = sy_rng_normal(&r);
                } while (fabs(x) > 2.0); /* truncated at 2σ: redraw */
                w[k] = (float)(sigma * x);
            }
            m->be->upload(m->be, m->params + p->offset + k0, w, n * sizeof(float));
        }
    }
    sy_model_weights_changed(m);
}

void sy_model_weights_changed(sy_model_t *m) {
    if (!m->work) return;
    for (int i = 0; i < m->n_params; i++) {
        const sy_param_t *p = &m->params_tab[i];
        if (!p->lowp) continue;
        /* into bf16 storage: the copy rounds (RNE) */
        m->be->copy(m->be, m->work[i], m->params + p->offset, p->numel * sizeof(float));
    }
}

/* Only the fp64 accumulator is cleared: the fp32 grads are rounded from it on the next
 * sy_model_grads (zeros if no micro-batch runs), and the backward clears the few fp32 grads it
 * adds into (dense_grads_clear); one pass over 4 bytes a parameter fewer per step. */
void sy_model_zero_grads(sy_model_t *m) {
    m->be->zero(m->be, m->acc, m->numel * sizeof(double));
    m->acc_dirty = true;
}

/* The weights an op reads: a GEMM weight's bf16 working copy in bf16 mode, else (fp32 mode; a
 * 1-D weight or the router in bf16 mode) the fp32 master. */
static float *wt(const sy_model_t *m, int i) {
    const sy_param_t *p = &m->params_tab[i];
    return m->work && p->lowp ? m->work[i] : m->params + p->offset;
}
#define W(i) wt(m, (i))
#define G(i) (m->grads + m->params_tab[(i)].offset)
#define A(i) (m->acc + m->params_tab[(i)].offset)
/* fp32 master weights: the router reads these in every precision (spec §4) */
#define P(i) (m->params + m->params_tab[(i)].offset)

static void set_experts(sy_model_t *m, const block_ids *b) {
    for (int e = 0; e < m->d.E; e++) {
        m->ex[e].W1 = W(b->ex_fc[e]);
        m->ex[e].W2 = W(b->ex_proj[e]);
        m->ex[e].dW1 = G(b->ex_fc[e]);
        m->ex[e].dW2 = G(b->ex_proj[e]);
        m->ex[e].acc1 = A(b->ex_fc[e]);
        m->ex[e].acc2 = A(b->ex_proj[e]);
    }
}

/* Routing results of one forward, summed over the Switch layers. */
typedef struct {
    double aux, z;           /* Σ aux_group, Σ z_group (uncoefficiented) */
    int64_t routed, dropped; /* tokens routed, of which dropped by capacity */
} route_sums;

/* The blocks of the model, each a forward and its backward side by side (spec §1-2), for the
 * N = B·T tokens of one micro-batch. A forward saves what its backward reads (in m->act[l] or
 * the model) and writes its output; a backward reads the gradient of its output from m->dx
 * [N,D] and leaves there the gradient of its input. Weight gradients of the GEMM weights and
 * experts go straight into the fp64 accumulator A() (matmul_bwd_acc64); those of the
 * LayerNorms, router and embeddings into the fp32 grads G(), which fwd_bwd zeroes before the
 * backward and adds into A() after it. Scratch: m->tmp [N,D] a sublayer's branch output,
 * m->dln [N,D] the gradient of a LayerNorm output. */

/* residual: out [N,D] = x + y. Its backward is the identity: dx passes through, and each
 * sublayer's LayerNorm backward adds the branch's gradient into it (layernorm_bwd: dx +=). */
static void residual_forward(sy_backend_t *be, float *out, const float *x, const float *y,
                             size_t n) {
    be->copy(be, out, x, sizeof(float) * n);
    be->add_inplace(be, out, y, n);
}

/* ---- embedding ---- */

/* tokens [B,T+1] windows (host) → inp [N] (positions 0..T-1), tgt [N] (positions 1..T), split
 * on the host and uploaded in one piece (inp and tgt are one backend buffer) */
static void split_tokens(sy_model_t *m, const int32_t *tokens) {
    const int T = m->d.T, B = m->d.B, N = B * T;
    int32_t *inp = m->tok_host, *tgt = m->tok_host + N;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            inp[b * T + t] = tokens[(size_t)b * (T + 1) + t];
            tgt[b * T + t] = tokens[(size_t)b * (T + 1) + t + 1];
        }
    m->be->upload(m->be, m->inp, m->tok_host, 2 * (size_t)N * sizeof(int32_t));
}

/* x [N,D] = wte[inp] + wpe[t] */
static void embed_forward(sy_model_t *m, float *x) {
    const int T = m->d.T, D = m->d.D, N = m->d.B * T;
    m->be->embed_fwd(m->be, x, m->inp, W(m->wte), W(m->wpe), N, T, D);
}

/* dx [N,D] → dwte [V,D] += (on top of the LM head's share), dwpe [T,D] += (grads) */
static void embed_backward(sy_model_t *m) {
    const int T = m->d.T, D = m->d.D, N = m->d.B * T;
    m->be->embed_bwd(m->be, G(m->wte), G(m->wpe), m->dx, m->inp, N, T, D);
}

/* ---- attention sublayer of block l: x_mid = x_in + proj(attention(qkv(ln1(x_in)))) ---- */

/* x_in [N,D] → x_mid [N,D]; saves ln1 [N,D] (+ mean, rstd [N]), qkv [N,3D], att [B,H,T,T],
 * atty [N,D] */
static void attn_forward(sy_model_t *m, int l) {
    sy_backend_t *be = m->be;
    const int T = m->d.T, D = m->d.D, B = m->d.B, H = m->d.H, N = B * T;
    block_acts *a = &m->act[l];
    const block_ids *bi = &m->blk[l];
    be->layernorm_fwd(be, a->ln1, a->ln1_mean, a->ln1_rstd, a->x_in, W(bi->ln1), N, D);
    be->matmul_fwd(be, a->qkv, a->ln1, W(bi->qkv), N, D, 3 * D);
    be->attention_fwd(be, a->atty, a->att, a->qkv, B, T, D, H);
    be->matmul_fwd(be, m->tmp, a->atty, W(bi->proj), N, D, D);
    residual_forward(be, a->x_mid, a->x_in, m->tmp, (size_t)N * D);
}

/* dx [N,D]: d x_mid in, d x_in out. dWproj [D,D] and dWqkv [3D,D] into the accumulator,
 * dln1 [D] into grads. */
static void attn_backward(sy_model_t *m, int l) {
    sy_backend_t *be = m->be;
    const int T = m->d.T, D = m->d.D, B = m->d.B, H = m->d.H, N = B * T;
    block_acts *a = &m->act[l];
    const block_ids *bi = &m->blk[l];
    be->matmul_bwd_acc64(be, m->datty, G(bi->proj), A(bi->proj), m->dx, a->atty, W(bi->proj),
                         N, D, D);                                      /* datty [N,D] */
    be->attention_bwd(be, m->dqkv, m->datty, a->att, a->qkv, B, T, D, H); /* dqkv [N,3D] */
    be->matmul_bwd_acc64(be, m->dln, G(bi->qkv), A(bi->qkv), m->dqkv, a->ln1, W(bi->qkv), N, D,
                         3 * D);                                        /* dln [N,D] */
    be->layernorm_bwd(be, m->dx, G(bi->ln1), m->dln, a->x_in, W(bi->ln1), a->ln1_mean,
                      a->ln1_rstd, N, D);
}

/* ---- dense FFN sublayer of block l: out = x_mid + fproj(gelu(fc(ln2(x_mid)))) ---- */

/* x_mid [N,D] → out [N,D]; saves ln2 [N,D] (+ mean, rstd [N]), fc_pre, fc_act [N,F] */
static void mlp_forward(sy_model_t *m, int l, float *out) {
    sy_backend_t *be = m->be;
    const int D = m->d.D, F = m->d.F, N = m->d.B * m->d.T;
    block_acts *a = &m->act[l];
    const block_ids *bi = &m->blk[l];
    be->layernorm_fwd(be, a->ln2, a->ln2_mean, a->ln2_rstd, a->x_mid, W(bi->ln2), N, D);
    if (be->matmul_gelu_fwd_group) { /* fc and GELU fused (a group of one: same numbers) */
        float *pre = a->fc_pre, *act = a->fc_act;
        const float *in = a->ln2, *w = W(bi->fc);
        be->matmul_gelu_fwd_group(be, &pre, &act, &in, &w, &N, 1, D, F);
    } else {
        be->matmul_fwd(be, a->fc_pre, a->ln2, W(bi->fc), N, D, F);
        be->gelu_fwd(be, a->fc_act, a->fc_pre, (size_t)N * F);
    }
    be->matmul_fwd(be, m->tmp, a->fc_act, W(bi->fproj), N, F, D);
    residual_forward(be, out, a->x_mid, m->tmp, (size_t)N * D);
}

/* dx [N,D]: d out in, d x_mid out. dWfproj [D,F] and dWfc [F,D] into the accumulator,
 * dln2 [D] into grads. */
static void mlp_backward(sy_model_t *m, int l) {
    sy_backend_t *be = m->be;
    const int D = m->d.D, F = m->d.F, N = m->d.B * m->d.T;
    block_acts *a = &m->act[l];
    const block_ids *bi = &m->blk[l];
    if (be->matmul_gelu_bwd_group) { /* fproj backward and GELU's fused (a group of one) */
        float *dx = m->dfc_act, *dw = G(bi->fproj), *dpre = m->dfc_pre;
        double *dw64 = A(bi->fproj);
        const float *dy = m->dx, *x = a->fc_act, *w = W(bi->fproj), *pre = a->fc_pre, *mask = NULL;
        be->matmul_gelu_bwd_group(be, &dx, &dw, &dw64, &dy, &x, &w, &mask, &pre, &dpre, &N, 1, F,
                                  D);
    } else {
        be->matmul_bwd_acc64(be, m->dfc_act, G(bi->fproj), A(bi->fproj), m->dx, a->fc_act,
                             W(bi->fproj), N, F, D);                        /* dfc_act [N,F] */
        be->gelu_bwd(be, m->dfc_pre, m->dfc_act, a->fc_pre, (size_t)N * F); /* dfc_pre [N,F] */
    }
    be->matmul_bwd_acc64(be, m->dln, G(bi->fc), A(bi->fc), m->dfc_pre, a->ln2, W(bi->fc), N, D,
                         F);                                            /* dln [N,D] */
    be->layernorm_bwd(be, m->dx, G(bi->ln2), m->dln, a->x_mid, W(bi->ln2), a->ln2_mean,
                      a->ln2_rstd, N, D);
}

/* ---- Switch sublayer of block l: out = x_mid + switch(ln2(x_mid)) (switch.h) ---- */

/* x_mid [N,D] → out [N,D]; one routing group of N tokens. Saves ln2 [N,D] (+ mean, rstd [N])
 * and the layer's routing and expert rows in a->sw; adds its aux/z terms and token counts to
 * sums, its per-expert counts [E] to m->counts. With expert parallelism the experts run on
 * their owners (sy_ep_forward), else all here. */
static sy_status switch_forward(sy_model_t *m, int l, float *out, bool train, sy_draw_key key,
                                route_sums *sums) {
    sy_backend_t *be = m->be;
    const sy_model_dims *d = &m->d;
    const int D = d->D, N = d->B * d->T;
    block_acts *a = &m->act[l];
    const block_ids *bi = &m->blk[l];
    be->layernorm_fwd(be, a->ln2, a->ln2_mean, a->ln2_rstd, a->x_mid, W(bi->ln2), N, D);
    sy_switch_key k = {key.seed, key.step, key.micro, l};
    double cf = train ? d->capacity_factor : d->eval_capacity_factor;
    sy_switch_route(a->sw, a->ln2, P(bi->router), cf, train ? d->jitter : 0.0, k);
    sy_switch_dispatch(a->sw, a->ln2);
    set_experts(m, bi);
    double p_drop = train ? d->expert_dropout : 0.0;
    if (m->ep) {
        sy_switch_key kr = k;
        kr.micro = key.micro - m->ep_rank; /* the round's first micro-batch */
        SY_CHECK(sy_ep_forward(m->ep, a->sw, bi->sw_index, m->ex, p_drop, kr));
    } else {
        sy_switch_experts(a->sw, m->ex, 0, d->E, p_drop, k);
    }
    sy_switch_combine(a->sw, m->tmp);
    sy_switch_info info = sy_switch_get_info(a->sw);
    sums->aux += info.aux_group;
    sums->z += info.z_group;
    sums->routed += info.G;
    sums->dropped += info.G - info.n_kept;
    memcpy(m->counts + (size_t)bi->sw_index * d->E, info.counts, sizeof(int32_t) * d->E);
    residual_forward(be, out, a->x_mid, m->tmp, (size_t)N * D);
    return SY_OK;
}

/* dx [N,D]: d out in, d x_mid out. Expert gradients [F,D], [D,F] into the accumulator (on
 * their owners under expert parallelism), dWrouter [E,D] and dln2 [D] into grads. The router's aux and z
 * losses enter here with this micro-batch's share of their coefficients. */
static sy_status switch_backward(sy_model_t *m, int l, int n_micro) {
    sy_backend_t *be = m->be;
    const sy_model_dims *d = &m->d;
    const int D = d->D, E = d->E, N = d->B * d->T;
    block_acts *a = &m->act[l];
    const block_ids *bi = &m->blk[l];
    float aux_scale = (float)(d->aux_coef * E / ((double)N * n_micro));
    float z_scale = (float)(d->z_coef * 2.0 / ((double)N * n_micro));
    set_experts(m, bi);
    sy_switch_combine_bwd(a->sw, m->dx);
    if (m->ep)
        SY_CHECK(sy_ep_backward(m->ep, a->sw, bi->sw_index, m->ex));
    else
        sy_switch_experts_bwd(a->sw, m->ex, 0, E);
    sy_switch_dispatch_bwd(a->sw, m->dln);                              /* dln [N,D] */
    sy_switch_route_bwd(a->sw, a->ln2, P(bi->router), G(bi->router), m->dln, aux_scale,
                        z_scale);                                       /* dln += router's */
    be->layernorm_bwd(be, m->dx, G(bi->ln2), m->dln, a->x_mid, W(bi->ln2), a->ln2_mean,
                      a->ln2_rstd, N, D);
    return SY_OK;
}

/* ---- final LayerNorm and LM head (tied to wte): logits = ln_f(x_out) · wteᵀ ---- */

/* x_out [N,D] → logits [N,V]; saves lnf_y [N,D] (+ mean, rstd [N]). The logits stay fp32 for
 * the cross-entropy (spec §4). */
static void head_forward(sy_model_t *m) {
    sy_backend_t *be = m->be;
    const int D = m->d.D, V = m->d.V, N = m->d.B * m->d.T;
    be->layernorm_fwd(be, m->lnf_y, m->lnf_mean, m->lnf_rstd, m->x_out, W(m->lnf), N, D);
    be->matmul_fwd(be, m->logits, m->lnf_y, W(m->wte), N, D, V); /* logits: a plain buffer */
}

/* dlogits [N,V] (in m->logits, from the cross-entropy) → dx [N,D] = d x_out (overwritten);
 * dwte [V,D] +=, dln_f [D] (grads). */
static void head_backward(sy_model_t *m) {
    sy_backend_t *be = m->be;
    const int D = m->d.D, V = m->d.V, N = m->d.B * m->d.T;
    be->matmul_bwd(be, m->dln, G(m->wte), m->logits, m->lnf_y, W(m->wte), N, D, V, false);
    be->zero(be, m->dx, sizeof(float) * (size_t)N * D);
    be->layernorm_bwd(be, m->dx, G(m->lnf), m->dln, m->x_out, W(m->lnf), m->lnf_mean,
                      m->lnf_rstd, N, D);
}

/* ---- the whole model ---- */

/* tokens [B,T+1] → logits [N,V] in m->logits, every block's activations saved; sums over the
 * Switch layers in *sums. */
static sy_status forward(sy_model_t *m, const int32_t *tokens, bool train, sy_draw_key key,
                         route_sums *sums) {
    const int L = m->d.L;
    split_tokens(m, tokens);
    *sums = (route_sums){0.0, 0.0, 0, 0};
    embed_forward(m, m->act[0].x_in);
    for (int l = 0; l < L; l++) {
        float *x_next = l + 1 < L ? m->act[l + 1].x_in : m->x_out;
        attn_forward(m, l);
        if (m->blk[l].sw_index < 0)
            mlp_forward(m, l, x_next);
        else
            SY_CHECK(switch_forward(m, l, x_next, train, key, sums));
    }
    head_forward(m);
    return SY_OK;
}

/* dlogits [N,V] in m->logits → every weight's gradient of this micro-batch; the blocks in
 * reverse, m->dx carrying the gradient of the residual stream. */
static sy_status backward(sy_model_t *m, int n_micro) {
    head_backward(m);
    for (int l = m->d.L - 1; l >= 0; l--) {
        if (m->blk[l].sw_index < 0)
            mlp_backward(m, l);
        else
            SY_CHECK(switch_backward(m, l, n_micro));
        attn_backward(m, l);
    }
    embed_backward(m);
    return SY_OK;
}

/* This micro-batch's dense gradients are computed in fp32 and added to the fp64 accumulator:
 * the GEMM weights' straight from the GEMM (matmul_bwd_acc64), the others through the fp32
 * grads buffer, zeroed before the backward (dense_grads_clear) and added after it
 * (dense_grads_accumulate); expert gradients take the first route inside the Switch layer. So
 * the sum over micro-batches is the same however they are spread over workers. */
static void dense_grads_clear(sy_model_t *m) {
    for (int i = 0; i < m->n_params && m->params_tab[i].offset < m->dense_numel; i++)
        if (!m->gdirect[i]) m->be->zero(m->be, G(i), m->params_tab[i].numel * sizeof(float));
}

static void dense_grads_accumulate(sy_model_t *m) {
    for (int i = 0; i < m->n_params && m->params_tab[i].offset < m->dense_numel; i++) {
        if (m->gdirect[i]) continue;
        m->be->acc_add_f32(m->be, A(i), G(i), m->params_tab[i].numel);
    }
    m->acc_dirty = true;
}

/* This micro-batch's shares of the global loss terms (sy_losses). */
static void set_losses(sy_losses *out, const sy_model_dims *d, int N, int n_micro, double ce_sum,
                       const route_sums *sums) {
    out->ce = ce_sum / N / n_micro;
    out->aux = d->aux_coef * sums->aux / n_micro;
    out->z = d->z_coef * sums->z / n_micro;
    out->tokens = N;
    out->routed = sums->routed;
    out->dropped = sums->dropped;
}

static sy_status check_tokens(const sy_model_t *m, const int32_t *tokens) {
    size_t n = (size_t)m->d.B * (m->d.T + 1);
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->d.V)
            return sy_err_set(SY_EINVAL, "token %d at position %zu is outside the vocabulary [0, %d)",
                              tokens[i], i, m->d.V);
    return SY_OK;
}

sy_status sy_model_fwd_bwd(sy_model_t *m, const int32_t *tokens, int n_micro, sy_draw_key key,
                           sy_losses *out) {
    SY_CHECK(check_tokens(m, tokens));
    sy_backend_t *be = m->be;
    const int N = m->d.B * m->d.T, V = m->d.V;
    route_sums sums;
    SY_CHECK(forward(m, tokens, true, key, &sums));
    dense_grads_clear(m);
    /* L_ce is the mean over all target tokens of the global batch; dlogits overwrite logits. */
    float ce_scale = 1.0f / ((float)N * (float)n_micro);
    double ce_sum = be->xent_fwd_bwd(be, m->logits, m->logits, m->tgt, N, V, ce_scale);
    set_losses(out, &m->d, N, n_micro, ce_sum, &sums);
    SY_CHECK(backward(m, n_micro));
    dense_grads_accumulate(m);
    return SY_OK;
}

sy_status sy_model_forward_eval(sy_model_t *m, const int32_t *tokens, int n_micro,
                                sy_losses *out) {
    SY_CHECK(check_tokens(m, tokens));
    const sy_model_dims *d = &m->d;
    const int N = d->B * d->T;
    route_sums sums;
    /* no draws in evaluation (no jitter, no dropout); under expert parallelism micro = rank
     * makes the round's first micro-batch 0 */
    sy_draw_key key = {0, 0, m->ep ? m->ep_rank : 0};
    SY_CHECK(forward(m, tokens, false, key, &sums));
    double ce_sum = m->be->xent_fwd(m->be, m->logits, m->tgt, N, d->V);
    set_losses(out, d, N, n_micro, ce_sum, &sums);
    return SY_OK;
}

sy_status sy_model_logits(sy_model_t *m, int row0, int n, float *out) {
    const int N = m->d.B * m->d.T, V = m->d.V;
    if (row0 < 0 || n < 0 || row0 > N - n)
        return sy_err_set(SY_EINVAL, "logits rows [%d, %d) outside [0, %d)", row0, row0 + n, N);
    m->be->download(m->be, out, m->logits + (size_t)row0 * (size_t)V, sizeof(float) * (size_t)n * (size_t)V);
    return SY_OK;
}

void sy_model_set_ep(sy_model_t *m, sy_ep_t *ep, int rank) {
    m->ep = ep;
    m->ep_rank = rank;
}

sy_ep_t *sy_model_ep(const sy_model_t *m) { return m->ep; }

sy_status sy_model_serve_idle_eval(sy_model_t *m) {
    if (!m->ep) return SY_OK;
    for (int l = 0; l < m->d.L; l++) {
        const block_ids *bi = &m->blk[l];
        if (bi->sw_index < 0) continue;
        set_experts(m, bi);
        sy_switch_key k = {0, 0, 0, l};
        SY_CHECK(sy_ep_forward(m->ep, NULL, bi->sw_index, m->ex, 0.0, k));
    }
    return SY_OK;
}

sy_status sy_model_serve_idle(sy_model_t *m, sy_draw_key key) {
    if (!m->ep) return SY_OK;
    m->acc_dirty = true;
    for (int l = 0; l < m->d.L; l++) {
        const block_ids *bi = &m->blk[l];
        if (bi->sw_index < 0) continue;
        set_experts(m, bi);
        sy_switch_key k = {key.seed, key.step, key.micro, l};
        SY_CHECK(sy_ep_forward(m->ep, NULL, bi->sw_index, m->ex, m->d.expert_dropout, k));
    }
    for (int l = m->d.L - 1; l >= 0; l--) {
        const block_ids *bi = &m->blk[l];
        if (bi->sw_index < 0) continue;
        set_experts(m, bi);
        SY_CHECK(sy_ep_backward(m->ep, NULL, bi->sw_index, m->ex));
    }
    return SY_OK;
}
