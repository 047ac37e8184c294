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

sy_status sy_model_ckpt_save(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const json_t *extra) {
    return sy_model_ckpt_save_from(st, run, step, m, sy_model_params(m), opt ? sy_adamw_m(opt) : NULL,
                                   opt ? sy_adamw_v(opt) : NULL, opt ? sy_adamw_t_count(opt) : 0, extra);
}

typedef struct {
    sy_store_t *st;
    const json_t *manifest;
} load_ctx;

static sy_status load_one(void *ctx_, const sy_ckpt_group *g) {
    load_ctx *c = ctx_;
    return sy_ckpt_load_group_m(c->st, c->manifest, g);
}

static sy_status load_sel(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                          sy_adamw_t *opt, bool with_dense, const bool *experts) {
    json_t *man = NULL;
    SY_CHECK(sy_ckpt_read_manifest(st, run, step, &man));
    load_ctx c = {st, man};
    sy_status s = for_groups_sel(m, sy_model_params(m), opt ? sy_adamw_m(opt) : NULL,
                                 opt ? sy_adamw_v(opt) : NULL, with_dense, experts, load_one, &c);
    if (s == SY_OK && opt) {
        json_t *t = json_object_get(man, "optimizer_step");
        if (!json_is_integer(t)) {
            s = sy_err_set(SY_ECORRUPT, "checkpoint step %lld of run %s: manifest has no optimizer_step",
                           (long long)step, run);
        } else {
            sy_adamw_set_t_count(opt, json_integer_value(t));
        }
    }
    json_decref(man);
    if (s == SY_OK) sy_model_weights_changed(m);
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
