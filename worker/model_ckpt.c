#include "model_ckpt.h"

#include <stdio.h>
#include <stdlib.h>

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

/* Runs fn over the file groups selected (dense always; experts by mask). */
typedef sy_status (*group_fn)(void *ctx, const sy_ckpt_group *g);

static sy_status for_groups(sy_model_t *m, sy_adamw_t *opt, const bool *experts, group_fn fn,
                            void *ctx) {
    const int E = sy_model_get_dims(m)->E;
    int np = sy_model_n_params(m);
    sy_tensor_ref *refs = malloc(sizeof(sy_tensor_ref) * (size_t)np * 2);
    if (!refs) return sy_err_set(SY_ENOMEM, "checkpoint: out of memory");
    sy_status st = SY_OK;
    char file[64];
    bool any_expert = sy_model_n_switch(m) > 0;
    for (int e = -1; e < (any_expert ? E : 0) && st == SY_OK; e++) {
        if (e >= 0 && experts && !experts[e]) continue;
        int n = collect(m, e, sy_model_params(m), 0, refs);
        sy_ckpt_group g = {e < 0 ? sy_ckpt_file_dense(file, sizeof file, 0)
                                 : sy_ckpt_file_expert(file, sizeof file, e, 0),
                           refs, n};
        st = fn(ctx, &g);
        if (st != SY_OK || !opt) continue;
        n = collect(m, e, sy_adamw_m(opt), 1, refs);
        n += collect(m, e, sy_adamw_v(opt), 2, refs + n);
        g = (sy_ckpt_group){e < 0 ? sy_ckpt_file_dense(file, sizeof file, 1)
                                  : sy_ckpt_file_expert(file, sizeof file, e, 1),
                            refs, n};
        st = fn(ctx, &g);
    }
    free(refs);
    return st;
}

/* Saving needs every group at once (the manifest lists them): collect copies of the views. */
typedef struct {
    sy_ckpt_group *groups;
    sy_tensor_ref *refs;
    char (*files)[64];
    int n, n_refs;
} save_ctx;

static sy_status add_group(void *ctx_, const sy_ckpt_group *g) {
    save_ctx *c = ctx_;
    snprintf(c->files[c->n], 64, "%s", g->file);
    for (int i = 0; i < g->n; i++) c->refs[c->n_refs + i] = g->tensors[i];
    c->groups[c->n] = (sy_ckpt_group){c->files[c->n], c->refs + c->n_refs, g->n};
    c->n_refs += g->n;
    c->n++;
    return SY_OK;
}

sy_status sy_model_ckpt_save(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const json_t *extra) {
    int np = sy_model_n_params(m), ng = 2 * (sy_model_get_dims(m)->E + 1);
    save_ctx c = {calloc((size_t)ng, sizeof(sy_ckpt_group)),
                  calloc((size_t)np * 3, sizeof(sy_tensor_ref)), calloc((size_t)ng, 64), 0, 0};
    json_t *ex = extra ? json_deep_copy(extra) : json_object();
    sy_status s;
    if (!c.groups || !c.refs || !c.files || !ex) {
        s = sy_err_set(SY_ENOMEM, "checkpoint: out of memory");
        goto done;
    }
    json_object_set_new(ex, "optimizer_step", json_integer(opt ? sy_adamw_t_count(opt) : 0));
    SY_CHECK_GOTO(for_groups(m, opt, NULL, add_group, &c), s, done);
    s = sy_ckpt_save(st, run, step, c.groups, c.n, ex);
done:
    json_decref(ex);
    free(c.groups);
    free(c.refs);
    free(c.files);
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

sy_status sy_model_ckpt_load(sy_store_t *st, const char *run, int64_t step, sy_model_t *m,
                             sy_adamw_t *opt, const bool *experts) {
    json_t *man = NULL;
    SY_CHECK(sy_ckpt_read_manifest(st, run, step, &man));
    load_ctx c = {st, man};
    sy_status s = for_groups(m, opt, experts, load_one, &c);
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
