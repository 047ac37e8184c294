#include "model/model_ckpt.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Builds the tensor views of one file: dense (expert == -1) or expert e, params or moments. */
static int collect(sy_model_t *m, int expert, float *base, int which /* 0 p, 1 m, 2 v */,
                   sy_tensor_ref *out) {
    int n = 0;
    for (int i = 0; i < sy_model_n_params(m); i++) {
        const sy_param_t *p = sy_model_param(m, i);
        if (p->expert != expert) continue;
        const char *name = which == 0 ? p->name : which == 1 ? p->m_name : p->v_name;
        out[n++] = sy_model_ref(m, i, base, name);
    }
    return n;
}

/* Runs fn over the file groups selected (dense always; experts by mask), with tensor views
 * into the given buffers (mom1 == NULL: no optimizer files). */
typedef sy_status (*group_fn)(void *ctx, const sy_ckpt_group *g);

static sy_status for_groups_sel(const sy_model_t *m, float *params, float *mom1, float *mom2,
                                bool with_dense, const bool *experts, group_fn fn, void *ctx) {
    const int E = sy_model_get_dims(m)->E;
    int np = sy_model_n_params(m);
    sy_tensor_ref *refs = malloc(sizeof(sy_tensor_ref) * (size_t)np * 2);
    if (!refs) return sy_err_set(SY_ENOMEM, "checkpoint: out of memory");
    sy_status st = SY_OK;
    char file[64];
    bool any_expert = sy_model_n_switch(m) > 0;
    for (int e = with_dense ? -1 : 0; e < (any_expert ? E : 0) && st == SY_OK; e++) {
        if (e >= 0 && experts && !experts[e]) continue;
        int n = collect((sy_model_t *)m, e, params, 0, refs);
        sy_ckpt_group g = {e < 0 ? sy_ckpt_file_dense(file, sizeof file, 0)
                                 : sy_ckpt_file_expert(file, sizeof file, e, 0),
                           refs, n};
        st = fn(ctx, &g);
        if (st != SY_OK || !mom1) continue;
        n = collect((sy_model_t *)m, e, mom1, 1, refs);
        n += collect((sy_model_t *)m, e, mom2, 2, refs + n);
        g = (sy_ckpt_group){e < 0 ? sy_ckpt_file_dense(file, sizeof file, 1)
                                  : sy_ckpt_file_expert(file, sizeof file, e, 1),
                            refs, n};
        st = fn(ctx, &g);
    }
    free(refs);
    return st;
}

static sy_status for_groups(const sy_model_t *m, float *params, float *mom1, float *mom2,
                            const bool *experts, group_fn fn, void *ctx) {
    return for_groups_sel(m, params, mom1, mom2, true, experts, fn, ctx);
}

/* A plan needs every group at once (the manifest lists them): it keeps copies of the views
 * and of their names. */
static sy_status add_group(void *ctx_, const sy_ckpt_group *g) {
    sy_model_ckpt_plan *c = ctx_;
    char *fname = c->files_ + (size_t)c->n * SY_MODEL_CKPT_FILE_MAX;
    snprintf(fname, SY_MODEL_CKPT_FILE_MAX, "%s", g->file);
    for (int i = 0; i < g->n; i++) {
        sy_tensor_ref r = g->tensors[i];
        char *nm = c->names_ + (size_t)(c->n_refs_ + i) * SY_MODEL_CKPT_NAME_MAX;
        snprintf(nm, SY_MODEL_CKPT_NAME_MAX, "%s", r.name);
        r.name = nm;
        c->refs_[c->n_refs_ + i] = r;
    }
    c->groups[c->n] = (sy_ckpt_group){fname, c->refs_ + c->n_refs_, g->n};
    c->n_refs_ += g->n;
    c->n++;
    return SY_OK;
}

void sy_model_ckpt_plan_free(sy_model_ckpt_plan *p) {
    if (!p) return;
    free(p->groups);
    free(p->refs_);
    free(p->files_);
    free(p->names_);
    memset(p, 0, sizeof *p);
}

sy_status sy_model_ckpt_plan_new(const sy_model_t *m, float *params, float *mom1, float *mom2,
                                 const bool *experts, sy_model_ckpt_plan *out) {
    if (!m || !params || !out || (mom1 && !mom2) || (!mom1 && mom2))
        return sy_err_set(SY_EINVAL, "checkpoint plan: bad arguments");
    memset(out, 0, sizeof *out);
    size_t np = (size_t)sy_model_n_params(m), ng = 2 * ((size_t)sy_model_get_dims(m)->E + 1);
    out->groups = calloc(ng, sizeof(sy_ckpt_group));
    out->refs_ = calloc(np * 3, sizeof(sy_tensor_ref));
    out->files_ = calloc(ng, SY_MODEL_CKPT_FILE_MAX);
    out->names_ = calloc(np * 3, SY_MODEL_CKPT_NAME_MAX);
    if (!out->groups || !out->refs_ || !out->files_ || !out->names_) {
        sy_model_ckpt_plan_free(out);
        return sy_err_set(SY_ENOMEM, "checkpoint: out of memory");
    }
    sy_status s = for_groups(m, params, mom1, mom2, experts, add_group, out);
    if (s != SY_OK) sy_model_ckpt_plan_free(out);
    return s;
}

json_t *sy_model_ckpt_extra(const json_t *extra, int64_t t_count) {
    json_t *ex = extra ? json_deep_copy(extra) : json_object();
    if (ex && json_object_set_new(ex, "optimizer_step", json_integer(t_count))) {
        json_decref(ex);
        ex = NULL;
    }
    return ex;
}

sy_status sy_model_ckpt_save_from(sy_store_t *st, const char *run, int64_t step, const sy_model_t *m,
                                  float *params, float *mom1, float *mom2, int64_t t_count,
                                  const json_t *extra) {
    sy_model_ckpt_plan plan;
    SY_CHECK(sy_model_ckpt_plan_new(m, params, mom1, mom2, NULL, &plan));
    json_t *ex = sy_model_ckpt_extra(extra, t_count);
    sy_status s = ex ? sy_ckpt_save(st, run, step, plan.groups, plan.n, ex)
                     : sy_err_set(SY_ENOMEM, "checkpoint: out of memory");
    json_decref(ex);
    sy_model_ckpt_plan_free(&plan);
    return s;
}

/* Host staging of the model state for a save or load: params, and moments when with_optim. */
typedef struct {
    float *p, *m, *v;
} host_state;

static void host_state_free(host_state *h) {
    free(h->p), free(h->m), free(h->v);
    memset(h, 0, sizeof *h);
}

static sy_status host_state_alloc(host_state *h, size_t n, bool with_optim) {
    memset(h, 0, sizeof *h);
    h->p = malloc(n * sizeof(float) + 1);
    if (with_optim) {
        h->m = malloc(n * sizeof(float) + 1);
        h->v = malloc(n * sizeof(float) + 1);
    }
    if (!h->p || (with_optim && (!h->m || !h->v))) {
        host_state_free(h);
        return sy_err_set(SY_ENOMEM, "checkpoint: out of memory for a host copy of %zu parameters", n);
    }
    return SY_OK;
}

sy_status sy_model_ckpt_save(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const json_t *extra) {
    sy_backend_t *be = sy_model_backend(m);
    const size_t n = sy_model_numel(m), bytes = n * sizeof(float);
    host_state h;
    SY_CHECK(host_state_alloc(&h, n, opt != NULL));
    be->download(be, h.p, sy_model_params(m), bytes);
    if (opt) {
        be->download(be, h.m, sy_adamw_m(opt), bytes);
        be->download(be, h.v, sy_adamw_v(opt), bytes);
    }
    sy_status s = sy_model_ckpt_save_from(st, run, step, m, h.p, h.m, h.v,
                                          opt ? sy_adamw_t_count(opt) : 0, extra);
    host_state_free(&h);
    return s;
}

typedef struct {
    sy_store_t *st;
    const json_t *manifest;
} load_ctx;

static sy_status load_one(void *ctx_, const sy_ckpt_group *g) {
    load_ctx *c = ctx_;
    return sy_ckpt_load_group_m(c->st, c->manifest, g);
}

/* Uploads the tensors a load read into the host staging h (those of the selected files). */
static void upload_loaded(sy_model_t *m, sy_adamw_t *opt, const host_state *h, bool with_dense,
                          const bool *experts) {
    sy_backend_t *be = sy_model_backend(m);
    for (int i = 0; i < sy_model_n_params(m); i++) {
        const sy_param_t *p = sy_model_param(m, i);
        if (p->expert < 0 ? !with_dense : experts && !experts[p->expert]) continue;
        const size_t bytes = p->numel * sizeof(float);
        be->upload(be, sy_model_params(m) + p->offset, h->p + p->offset, bytes);
        if (!opt) continue;
        be->upload(be, sy_adamw_m(opt) + p->offset, h->m + p->offset, bytes);
        be->upload(be, sy_adamw_v(opt) + p->offset, h->v + p->offset, bytes);
    }
}

/* Files are read into host staging, then the tensors they hold are uploaded: a load that fails
 * leaves the model as it was. */
static sy_status load_sel(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                          sy_adamw_t *opt, bool with_dense, const bool *experts) {
    json_t *man = NULL;
    host_state h;
    SY_CHECK(host_state_alloc(&h, sy_model_numel(m), opt != NULL));
    sy_status s = sy_ckpt_read_manifest(st, run, step, &man);
    if (s != SY_OK) {
        host_state_free(&h);
        return s;
    }
    load_ctx c = {st, man};
    s = for_groups_sel(m, h.p, h.m, h.v, with_dense, experts, load_one, &c);
    json_t *t = opt ? json_object_get(man, "optimizer_step") : NULL;
    if (s == SY_OK && opt && !json_is_integer(t))
        s = sy_err_set(SY_ECORRUPT, "checkpoint step %lld of run %s: manifest has no optimizer_step",
                       (long long)step, run);
    if (s == SY_OK) {
        upload_loaded(m, opt, &h, with_dense, experts);
        if (opt) sy_adamw_set_t_count(opt, json_integer_value(t));
        sy_model_weights_changed(m);
    }
    host_state_free(&h);
    json_decref(man);
    return s;
}

sy_status sy_model_ckpt_load(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const bool *experts) {
    return load_sel(st, run, step, m, opt, true, experts);
}

sy_status sy_model_ckpt_load_experts(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                                     sy_adamw_t *opt, const bool *experts) {
    return load_sel(st, run, step, m, opt, false, experts);
}
