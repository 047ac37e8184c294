#include "model/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend/kernels/k_elementwise.h"

struct sy_adamw {
    sy_model_t *model;
    sy_backend_t *be;
    float *m, *v; /* backend buffers */
    double beta1, beta2, eps, wd;
    int64_t t;
    double last_lr; /* the learning rate of the last step (sy_adamw_last_lr) */
};

sy_status sy_adamw_new(sy_model_t *model, const sy_config_t *cfg, sy_adamw_t **out) {
    sy_adamw_t *o = calloc(1, sizeof *o);
    if (!o) return sy_err_set(SY_ENOMEM, "optimizer: out of memory");
    size_t n = sy_model_numel(model);
    o->be = sy_model_backend(model);
    o->m = o->be->alloc(o->be, n * sizeof(float)); /* zeroed */
    o->v = o->be->alloc(o->be, n * sizeof(float));
    if (!o->m || !o->v) {
        sy_adamw_destroy(&o);
        return sy_err_set(SY_ENOMEM, "optimizer: out of memory for %zu moments", n);
    }
    o->model = model;
    sy_adamw_configure(o, cfg);
    *out = o;
    return SY_OK;
}

void sy_adamw_reset(sy_adamw_t *o) {
    size_t n = sy_model_numel(o->model);
    o->be->zero(o->be, o->m, n * sizeof(float));
    o->be->zero(o->be, o->v, n * sizeof(float));
    o->t = 0;
}

void sy_adamw_configure(sy_adamw_t *o, const sy_config_t *cfg) {
    o->beta1 = cfg->train.beta1;
    o->beta2 = cfg->train.beta2;
    o->eps = cfg->train.eps;
    o->wd = cfg->train.weight_decay;
}

void sy_adamw_destroy(sy_adamw_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_adamw_t *o = *self_p;
    if (o->m) o->be->free(o->be, o->m);
    if (o->v) o->be->free(o->be, o->v);
    free(o);
    *self_p = NULL;
}

float *sy_adamw_m(sy_adamw_t *o) { return o->m; }
float *sy_adamw_v(sy_adamw_t *o) { return o->v; }
int64_t sy_adamw_t_count(const sy_adamw_t *o) { return o->t; }
void sy_adamw_set_t_count(sy_adamw_t *o, int64_t t) { o->t = t; }

double sy_lr_at(const sy_config_t *cfg, int64_t s) {
    double lr = cfg->train.lr, lr_min = cfg->train.lr_min;
    int64_t warm = cfg->train.warmup_steps, total = cfg->run.steps;
    if (s < warm) return lr * (double)(s + 1) / (double)warm;
    int64_t span = total - warm > 1 ? total - warm : 1;
    double progress = (double)(s - warm) / (double)span;
    if (progress > 1.0) progress = 1.0;
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + cos(M_PI * progress));
}

double sy_grad_sqnorm(sy_backend_t *be, const float *g, size_t n) {
    double total = 0.0;
    double *acc = be->alloc(be, sizeof(double)); /* zeroed */
    if (!acc) { /* no backend memory for one scalar: take the gradient to the host */
        float *h = malloc(n * sizeof(float));
        if (!h) return NAN;
        be->download(be, h, g, n * sizeof(float));
        for (size_t i = 0; i < n; i++) total += (double)h[i] * h[i];
        free(h);
        return total;
    }
    be->sumsq_add(be, acc, g, n);
    be->download(be, &total, acc, sizeof(double));
    be->free(be, acc);
    return total;
}

double sy_clip_grads(sy_backend_t *be, float *g, size_t n, double norm, double max_norm) {
    if (max_norm <= 0.0) return 1.0;
    double coef = max_norm / (norm + 1e-6);
    if (coef >= 1.0) return 1.0;
    be->scale(be, g, n, (float)coef);
    return coef;
}

void sy_adamw_step(sy_adamw_t *o, double lr) { sy_adamw_step_owned(o, lr, NULL); }

/* The scalars of the update of step count t at learning rate lr (one place: the backend op and
 * sy_adamw_apply_host take the same values). */
typedef struct {
    float b1, b2, eps, step_size, inv_sqrt_bc2, decay;
} coefs;
static coefs coefs_at(const sy_adamw_t *o, double lr, int64_t t) {
    const double bc1 = 1.0 - pow(o->beta1, (double)t);
    const double bc2 = 1.0 - pow(o->beta2, (double)t);
    return (coefs){.b1 = (float)o->beta1, .b2 = (float)o->beta2, .eps = (float)o->eps,
                   .step_size = (float)(lr / bc1), .inv_sqrt_bc2 = (float)(1.0 / sqrt(bc2)),
                   .decay = (float)(1.0 - lr * o->wd)};
}

void sy_adamw_step_owned(sy_adamw_t *o, double lr, const bool *experts) {
    sy_model_t *model = o->model;
    float *p = sy_model_params(model), *g = sy_model_grads(model);
    o->t++;
    o->last_lr = lr;
    const coefs c = coefs_at(o, lr, o->t);
    for (int i = 0; i < sy_model_n_params(model); i++) {
        const sy_param_t *pi = sy_model_param(model, i);
        if (experts && pi->expert >= 0 && !experts[pi->expert]) continue;
        o->be->adamw(o->be, p + pi->offset, g + pi->offset, o->m + pi->offset, o->v + pi->offset, pi->numel,
                     pi->decay ? c.decay : 1.0f, c.b1, c.b2, c.step_size, c.inv_sqrt_bc2, c.eps);
    }
    sy_model_weights_changed(model);
}

double sy_adamw_last_lr(const sy_adamw_t *o) { return o->last_lr; }

void sy_adamw_apply_host(const sy_adamw_t *o, double lr, int64_t t, bool decay, float *p, float *m, float *v,
                         const float *p0, const float *m0, const float *v0, const float *g, size_t n) {
    const coefs c = coefs_at(o, lr, t);
    const float dc = decay ? c.decay : 1.0f;
#pragma omp simd
    for (size_t i = 0; i < n; i++)
        sy_k_adamw_to(i, p, m, v, p0, m0, v0, g, dc, c.b1, c.b2, c.step_size, c.inv_sqrt_bc2, c.eps);
}
