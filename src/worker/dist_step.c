#include "worker/dist_step.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "model/switch_ep.h"

/* All-reduce of the first n values of the fp64 gradient accumulator, a backend buffer: a comm
 * that takes device buffers (nccl) gets it in place once the backend's work is done; a comm
 * that reads host memory gets the backend's host view when it has one (the CPU backend: no
 * copy), else a host buffer staged by download, all-reduce, upload. */
static sy_status allreduce_grad_acc(sy_model_t *m, sy_comm_t *comm, size_t n) {
    sy_backend_t *be = sy_model_backend(m);
    double *acc = sy_model_grad_acc(m);
    if (sy_comm_device_buffers(comm)) {
        be->sync(be);
        return sy_comm_allreduce_f64(comm, acc, n);
    }
    double *view = be->host_view(be, acc);
    if (view) {
        be->sync(be);
        return sy_comm_allreduce_f64(comm, view, n);
    }
    double *host = malloc(sizeof(double) * (n ? n : 1));
    if (!host) return sy_err_set(SY_ENOMEM, "gradient all-reduce: out of memory (%zu values)", n);
    be->download(be, host, acc, sizeof(double) * n);
    sy_status st = sy_comm_allreduce_f64(comm, host, n);
    if (st == SY_OK) be->upload(be, acc, host, sizeof(double) * n);
    free(host);
    return st;
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
    /* with expert parallelism each owner counts the whole step's tokens for its experts */
    sy_ep_t *ep = W > 1 ? sy_model_ep(m) : NULL;
    out->counts_owned = ep != NULL;
    if (ep) sy_ep_counts_reset(ep);

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
            if (out->terms) {
                double *t = out->terms + 3 * (size_t)out->micro_batches;
                t[0] = l.ce, t[1] = l.aux, t[2] = l.z;
            }
            out->tokens += l.tokens, out->routed += l.routed, out->dropped += l.dropped;
            out->micro_batches++;
            if (counts && !ep) {
                const int32_t *mc = sy_model_expert_counts(m);
                for (int i = 0; i < nsw * E; i++) counts[i] += mc[i];
            }
        } else {
            sy_draw_key key = {cfg->run.seed, s0, k * W};
            SY_CHECK(sy_model_serve_idle(m, key));
        }
    }

    if (counts && ep) sy_ep_counts(ep, counts);

    /* Dense gradients: the fp64 partial sums of every rank, summed in rank order, then rounded
     * once; expert gradients stay with their owners. */
    const size_t dense = sy_model_dense_numel(m);
    if (c->comm && W > 1) SY_CHECK(allreduce_grad_acc(m, c->comm, dense));
    /* The norm pieces come back to the host in one download: sq[0] dense, sq[1+e] expert e
     * (owned; 0 elsewhere). The expert ones are summed over owners by an all-reduce of host
     * scalars. */
    double sq[E + 1];
    sy_model_grad_sqnorms(m, c->owned, sq);
    if (c->comm && W > 1) SY_CHECK(sy_comm_allreduce_f64(c->comm, sq + 1, (size_t)E));
    double total = sq[0];
    for (int e = 0; e < E; e++) total += sq[1 + e];
    out->grad_norm = sqrt(total);
    sy_clip_grads(sy_model_backend(m), sy_model_grads(m), sy_model_numel(m), out->grad_norm,
                  cfg->train.grad_clip);
    out->lr = sy_lr_at(cfg, s0);
    if (c->before_update) c->before_update(c->before_arg);
    sy_adamw_step_owned(c->opt, out->lr, c->owned);
    return SY_OK;
}

int sy_dist_eval_batches(const sy_config_t *cfg, const sy_data_t *val) {
    uint64_t full = sy_data_windows(val) / (uint64_t)cfg->train.micro_batch_seqs;
    uint64_t want = cfg->train.eval_batches > 0 ? (uint64_t)cfg->train.eval_batches : full;
    if (want > full) want = full;
    return want > INT32_MAX ? INT32_MAX : (int)want;
}

bool sy_dist_eval_due(const sy_config_t *cfg, int64_t step) {
    return cfg->train.eval_every > 0 && (step % cfg->train.eval_every == 0 || step == cfg->run.steps);
}

sy_status sy_dist_eval(sy_dist_ctx *c, sy_data_t *val, int n, double *val_loss) {
    const int b = c->cfg->train.micro_batch_seqs;
    const int W = c->comm ? sy_comm_world(c->comm) : 1;
    const int rank = c->comm ? sy_comm_rank(c->comm) : 0;
    double *terms = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
    if (!terms) return sy_err_set(SY_ENOMEM, "validation: out of memory (%d micro-batches)", n);
    sy_status st = SY_OK;
    const int rounds = (n + W - 1) / W;
    for (int k = 0; k < rounds && st == SY_OK; k++) {
        int i = k * W + rank;
        if (i < n) {
            st = sy_data_eval_batch(val, (uint64_t)i * (uint64_t)b, b, c->tokens);
            sy_losses l;
            if (st == SY_OK) st = sy_model_forward_eval(c->model, c->tokens, n, &l);
            if (st == SY_OK) terms[i] = l.ce;
        } else {
            st = sy_model_serve_idle_eval(c->model);
        }
    }
    if (st == SY_OK && c->comm && W > 1) st = sy_comm_allreduce_f64(c->comm, terms, (size_t)n);
    double sum = 0.0;
    for (int i = 0; i < n; i++) sum += terms[i];
    *val_loss = sum;
    free(terms);
    return st;
}

sy_status sy_dist_open_val(const sy_config_t *cfg, sy_data_t **val, int *n) {
    *val = NULL;
    *n = 0;
    if (cfg->train.eval_every <= 0 || cfg->data.val.n == 0) return SY_OK;
    sy_data_options dopts;
    sy_data_options_from_config(cfg, &dopts);
    sy_status st = sy_data_open_with((const char *const *)cfg->data.val.items, cfg->data.val.n,
                                     cfg->model.vocab_size, cfg->model.seq_len, &dopts, val);
    if (st != SY_OK) return sy_err_prefix(st, "data.val (set data.val= or train.eval_every=0 for no validation)");
    *n = sy_dist_eval_batches(cfg, *val);
    if (*n == 0) {
        sy_warn("data.val holds %llu windows of %d tokens, fewer than one micro-batch of %d: no validation",
                (unsigned long long)sy_data_windows(*val), cfg->model.seq_len + 1, cfg->train.micro_batch_seqs);
        sy_data_destroy(val);
    }
    return SY_OK;
}
