#include "worker/dist_step.h"

#include <math.h>
#include <string.h>

/* Σ g² per expert (fp64) for the owned experts (others 0), in a fixed order per expert. */
static void expert_sqnorms(const sy_model_t *m, const float *g, const bool *owned, double *sq) {
    const int E = sy_model_get_dims(m)->E;
    for (int e = 0; e < E; e++) sq[e] = 0.0;
    for (int i = 0; i < sy_model_n_params(m); i++) {
        const sy_param_t *p = sy_model_param(m, i);
        if (p->expert < 0 || (owned && !owned[p->expert])) continue;
        sq[p->expert] += sy_grad_sqnorm(g + p->offset, p->numel);
    }
}

sy_status sy_dist_step(sy_dist_ctx *c, int64_t step, sy_step_result *out) {
    const sy_config_t *cfg = c->cfg;
    sy_model_t *m = c->model;
    const int b = cfg->train.micro_batch_seqs;
    const int M = cfg->train.global_batch_seqs / b;
    const int W = c->comm ? sy_comm_world(c->comm) : 1;
    const int rank = c->comm ? sy_comm_rank(c->comm) : 0;
    const int64_t s0 = step - 1;
    const int E = sy_model_get_dims(m)->E, nsw = sy_model_n_switch(m);
    int32_t *counts = out->counts;
    out->ce = out->aux = out->z = 0.0;
    out->tokens = out->routed = out->dropped = 0;
    out->micro_batches = 0;
    if (counts) memset(counts, 0, sizeof(int32_t) * (size_t)nsw * E);

    /* this rank's micro-batches of this step and the next ones: the prefetcher reads ahead */
    SY_CHECK(sy_data_plan(c->data, cfg->run.seed, s0, cfg->run.steps, M, b, rank, W));
    sy_model_zero_grads(m);
    const int rounds = (M + W - 1) / W;
    for (int k = 0; k < rounds; k++) {
        int mi = k * W + rank;
        if (mi < M) {
            SY_CHECK(sy_data_train_batch(c->data, cfg->run.seed, s0, M, b, mi, c->tokens));
            sy_losses l;
            sy_draw_key key = {cfg->run.seed, s0, mi};
            SY_CHECK(sy_model_fwd_bwd(m, c->tokens, M, key, &l));
            out->ce += l.ce, out->aux += l.aux, out->z += l.z;
            out->tokens += l.tokens, out->routed += l.routed, out->dropped += l.dropped;
            out->micro_batches++;
            if (counts) {
                const int32_t *mc = sy_model_expert_counts(m);
                for (int i = 0; i < nsw * E; i++) counts[i] += mc[i];
            }
        } else {
            sy_draw_key key = {cfg->run.seed, s0, k * W};
            SY_CHECK(sy_model_serve_idle(m, key));
        }
    }

    /* Dense gradients: the fp64 partial sums of every rank, summed in rank order, then rounded
     * once; expert gradients stay with their owners. */
    const size_t dense = sy_model_dense_numel(m);
    if (c->comm && W > 1) SY_CHECK(sy_comm_allreduce_f64(c->comm, sy_model_grad_acc(m), dense));
    float *g = sy_model_grads(m);
    double esq[E > 0 ? E : 1];
    expert_sqnorms(m, g, c->owned, esq);
    if (c->comm && W > 1) SY_CHECK(sy_comm_allreduce_f64(c->comm, esq, (size_t)E));
    double sq = sy_grad_sqnorm(g, dense);
    for (int e = 0; e < E; e++) sq += esq[e];
    out->grad_norm = sqrt(sq);
    sy_clip_grads(g, sy_model_numel(m), out->grad_norm, cfg->train.grad_clip);
    out->lr = sy_lr_at(cfg, s0);
    sy_adamw_step_owned(c->opt, out->lr, c->owned);
    return SY_OK;
}
