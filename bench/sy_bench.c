/* switchyard micro- and step benchmarks (not a test; bench/run.sh runs them next to the
 * PyTorch baseline in bench/torch_bench.py).
 *
 *   sy_bench sgemm  [--threads N] [--iters N]
 *       cblas_sgemm 2048x2048x2048: the machine's GEMM rate.
 *   sy_bench switch [--threads N] [--iters N] [--warmup N] [--tokens G] [--d-model D]
 *                   [--d-ff F] [--experts E] [--cf X] [--router-std S] [--seed S] [--dump FILE]
 *       One Switch layer forward + backward (route, dispatch, experts, combine and the
 *       backward in reverse) over one routing group. --dump writes the inputs (h, Wr, W1, W2,
 *       dout, raw little-endian fp32 in that order) so the PyTorch side runs on the same data.
 *   sy_bench step   [--threads N] [--iters N] [--warmup N] [--config FILE] [--seed S]
 *                   [--dump PREFIX]
 *       One optimizer step of the model of FILE (default configs/tiny.yaml): M micro-batches of
 *       sy_model_fwd_bwd, grad norm, clip, AdamW, on fixed random tokens. --dump writes
 *       PREFIX.params (raw fp32, model layout), PREFIX.index (name offset numel per line),
 *       PREFIX.tokens (int32 [M, B, T+1]) and PREFIX.json (the config, sy_config_to_json).
 *
 *   sy_bench cublas [--device N] [--iters N] [--tokens M] [--d-model K] [--d-ff N]
 *       The CUDA device's dense bf16 cuBLAS GEMM rate, M x N x K (default 4096 x 3072 x 768):
 *       the yardstick the GPU Switch-layer figures are a fraction of.
 *   --backend cuda [--device N] [--precision bf16] (switch, step): run on the CUDA backend (bf16 GEMMs
 *       with --bf16); timings then synchronise the device before each clock reading.
 *
 * Every mode prints human-readable lines and one machine-readable line
 * "RESULT name=... key=value ...", which bench/run.sh parses. */
#include <cblas.h>
#include <jansson.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "base/config.h"
#include "backend/cpu_setup.h"
#include "model/model.h"
#include "model/optim.h"
#include "base/rng.h"
#include "base/status.h"
#include "model/switch.h"
#include "backend/gemm_cpu.h"

typedef struct {
    const char *mode;
    int threads, iters, warmup;
    int G, D, F, E;
    double cf, router_std, skew;
    uint64_t seed;
    const char *config;
    const char *dump;
    const char *backend; /* "cpu" (default) or "cuda" */
    int device;
    bool bf16;
} opts_t;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* CPU time of the whole process (all threads): on a shared machine it moves far less than the
 * clock, since time spent descheduled does not count (spinning at OpenMP barriers does). */
static double cpu_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* FNV-1a over raw bytes: results compared bit for bit between builds. */
static uint64_t fnv1a(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of n samples (sorts in place). */
static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void fill_normal(float *x, size_t n, double std, uint64_t seed, const char *tag) {
    sy_rng_t r = sy_rng_key(seed, tag, 0, 0, 0);
    for (size_t i = 0; i < n; i++) x[i] = (float)(std * sy_rng_normal(&r));
}

static sy_status write_floats(FILE *f, const char *path, const float *x, size_t n) {
    if (fwrite(x, sizeof(float), n, f) != n)
        return sy_err_set(SY_EIO, "cannot write %zu floats to %s", n, path);
    return SY_OK;
}

/* ------------------------------------------------------------------------------------------ */

static sy_status bench_sgemm(const opts_t *o) {
    const int n = 2048;
    sy_status s = SY_OK;
    float *A = malloc(sizeof(float) * n * n), *B = malloc(sizeof(float) * n * n),
          *C = malloc(sizeof(float) * n * n);
    double *t = calloc((size_t)o->iters, sizeof(double));
    if (!A || !B || !C || !t) {
        s = sy_err_set(SY_ENOMEM, "sgemm: out of memory");
        goto done;
    }
    fill_normal(A, (size_t)n * n, 1.0, o->seed, "sgemm.A");
    fill_normal(B, (size_t)n * n, 1.0, o->seed, "sgemm.B");
    /* one untimed warm-up call */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, A, n, B, n, 0.0f, C, n);
    for (int i = 0; i < o->iters; i++) {
        double t0 = now_s();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, A, n, B, n, 0.0f,
                    C, n);
        t[i] = now_s() - t0;
    }
    double ms = median(t, o->iters) * 1e3, min_ms = t[0] * 1e3; /* sorted by median() */
    double gflops = 2.0 * n * n * n / (ms * 1e-3) / 1e9;
    printf("sgemm %dx%dx%d: median %.2f ms over %d, %.1f GFLOP/s (%d threads, OpenBLAS %s)\n",
           n, n, n, ms, o->iters, gflops, omp_get_max_threads(), sy_cpu_blas_core());
    /* the same product through sy_sgemm (fixed tiles, thread-count invariant): what the
     * backend runs; its rate against OpenBLAS's own threading is the price of invariance */
    sy_sgemm(false, false, n, n, n, 1.0f, A, n, B, n, 0.0f, C, n, false);
    for (int i = 0; i < o->iters; i++) {
        double t0 = now_s();
        sy_sgemm(false, false, n, n, n, 1.0f, A, n, B, n, 0.0f, C, n, false);
        t[i] = now_s() - t0;
    }
    double tms = median(t, o->iters) * 1e3;
    double tgflops = 2.0 * n * n * n / (tms * 1e-3) / 1e9;
    printf("sy_sgemm (fixed tiles) %dx%dx%d: median %.2f ms, %.1f GFLOP/s (%.0f%% of cblas_sgemm)\n",
           n, n, n, tms, tgflops, 100.0 * tgflops / gflops);
    printf("RESULT name=sgemm ms=%.4f min_ms=%.4f gflops=%.3f tiled_ms=%.4f tiled_gflops=%.3f "
           "threads=%d blas=%s\n", ms, min_ms, gflops, tms, tgflops, omp_get_max_threads(),
           sy_cpu_blas_core());
done:
    free(A);
    free(B);
    free(C);
    free(t);
    return s;
}

/* ------------------------------------------------------------------------------------------ */

static sy_status bench_switch(const opts_t *o, sy_backend_t *be) {
    const int G = o->G, D = o->D, F = o->F, E = o->E;
    sy_status s = SY_OK;
    sy_switch_t *sw = NULL;
    /* inputs are made in host arrays (h, Wr, W1, W2, dout) and uploaded into backend buffers
     * (names ending in b); outputs are downloaded into host arrays for the checksum */
    float *h = NULL, *Wr = NULL, *dout = NULL, *W1 = NULL, *W2 = NULL, *outh = NULL, *dhh = NULL;
    float *hb = NULL, *Wrb = NULL, *dWr = NULL, *out = NULL, *doutb = NULL, *dh = NULL;
    float *W1b = NULL, *W2b = NULL, *dW1 = NULL, *dW2 = NULL;
    double *acc1 = NULL, *acc2 = NULL;
    sy_expert_weights *ex = NULL;
    double *tf = calloc((size_t)o->iters, sizeof(double));
    double *tb = calloc((size_t)o->iters, sizeof(double));
    double *tt = calloc((size_t)o->iters, sizeof(double));
    double *tc = calloc((size_t)o->iters, sizeof(double));
    FILE *f = NULL;

    SY_CHECK_GOTO(sy_switch_new(be, G, D, F, E, &sw), s, done);
    const size_t gd = (size_t)G * D, fd = (size_t)F * D;
    h = malloc(sizeof(float) * gd);
    dout = malloc(sizeof(float) * gd);
    outh = malloc(sizeof(float) * gd);
    dhh = malloc(sizeof(float) * gd);
    Wr = malloc(sizeof(float) * (size_t)E * D);
    W1 = malloc(sizeof(float) * fd * E);
    W2 = malloc(sizeof(float) * fd * E);
    hb = sy_alloc_act(be, gd); /* activations, activation gradients and the experts' working
                                * weights: bf16 storage in bf16 mode */
    doutb = sy_alloc_act(be, gd);
    out = sy_alloc_act(be, gd);
    dh = sy_alloc_act(be, gd);
    Wrb = be->alloc(be, sizeof(float) * (size_t)E * D);
    dWr = be->alloc(be, sizeof(float) * (size_t)E * D);
    W1b = sy_alloc_act(be, fd * E);
    W2b = sy_alloc_act(be, fd * E);
    dW1 = be->alloc(be, sizeof(float) * fd * E);
    dW2 = be->alloc(be, sizeof(float) * fd * E);
    /* fp64 gradient accumulators: training always sums expert weight gradients across
     * micro-batches in fp64 (model.c), so the benchmark runs that path too */
    acc1 = be->alloc(be, sizeof(double) * fd * E);
    acc2 = be->alloc(be, sizeof(double) * fd * E);
    ex = calloc((size_t)E, sizeof *ex);
    if (!h || !dout || !outh || !dhh || !Wr || !W1 || !W2 || !hb || !doutb || !out || !dh ||
        !Wrb || !dWr || !W1b || !W2b || !dW1 || !dW2 || !acc1 || !acc2 || !ex || !tf || !tb || !tc ||
        !tt) {
        s = sy_err_set(SY_ENOMEM, "switch bench: out of memory (G=%d D=%d F=%d E=%d)", G, D, F, E);
        goto done;
    }
    /* Inputs: h ~ N(0,1) (a LayerNorm output has unit variance), router ~ N(0, router_std),
     * experts initialised like the model (spec §3: sqrt(0.1/fan_in)), dout ~ N(0,1). */
    fill_normal(h, gd, 1.0, o->seed, "bench.h");
    fill_normal(Wr, (size_t)E * D, o->router_std, o->seed, "bench.Wr");
    fill_normal(W1, fd * E, sqrt(0.1 / D), o->seed, "bench.W1");
    fill_normal(W2, fd * E, sqrt(0.1 / F), o->seed, "bench.W2");
    fill_normal(dout, gd, 1.0, o->seed, "bench.dout");
    if (o->skew > 0.0) {
        /* Skewed routing: every token gets a shared component u and router row e gains
         * skew·(e/(E-1))·u/|u|², so higher experts attract more tokens and the busiest ones
         * overflow their capacity (the drop path early in training). */
        float *u = malloc(sizeof(float) * (size_t)D);
        if (!u) {
            s = sy_err_set(SY_ENOMEM, "switch bench: out of memory");
            goto done;
        }
        fill_normal(u, (size_t)D, 1.0 / sqrt((double)D), o->seed, "bench.skew");
        double u2 = 0.0;
        for (int i = 0; i < D; i++) u2 += (double)u[i] * u[i];
        for (size_t t = 0; t < (size_t)G; t++)
            for (int i = 0; i < D; i++) h[t * D + i] += u[i];
        for (int e = 0; e < E; e++)
            for (int i = 0; i < D; i++)
                Wr[(size_t)e * D + i] += (float)(o->skew * (E > 1 ? (double)e / (E - 1) : 0.0) * u[i] / u2);
        free(u);
    }
    be->upload(be, hb, h, sizeof(float) * gd);
    be->upload(be, Wrb, Wr, sizeof(float) * (size_t)E * D);
    be->upload(be, W1b, W1, sizeof(float) * fd * E);
    be->upload(be, W2b, W2, sizeof(float) * fd * E);
    be->upload(be, doutb, dout, sizeof(float) * gd);
    for (int e = 0; e < E; e++)
        ex[e] = (sy_expert_weights){W1b + fd * e, W2b + fd * e, dW1 + fd * e, dW2 + fd * e,
                                    acc1 + fd * e, acc2 + fd * e};

    if (o->dump) {
        f = fopen(o->dump, "wb");
        if (!f) {
            s = sy_err_set(SY_EIO, "cannot create %s", o->dump);
            goto done;
        }
        SY_CHECK_GOTO(write_floats(f, o->dump, h, gd), s, done);
        SY_CHECK_GOTO(write_floats(f, o->dump, Wr, (size_t)E * D), s, done);
        SY_CHECK_GOTO(write_floats(f, o->dump, W1, fd * E), s, done);
        SY_CHECK_GOTO(write_floats(f, o->dump, W2, fd * E), s, done);
        SY_CHECK_GOTO(write_floats(f, o->dump, dout, gd), s, done);
        if (fclose(f) != 0) {
            f = NULL;
            s = sy_err_set(SY_EIO, "cannot write %s", o->dump);
            goto done;
        }
        f = NULL;
    }

    const float aux_coef = 0.01f, z_coef = 0.001f;
    const float aux_scale = aux_coef * E / (float)G, z_scale = z_coef * 2.0f / (float)G;
    sy_switch_key key = {o->seed, 0, 0, 0};
    for (int it = -o->warmup; it < o->iters; it++) {
        double c0 = cpu_s(), t0 = now_s();
        sy_switch_route(sw, hb, Wrb, o->cf, 0.0, key);
        sy_switch_dispatch(sw, hb);
        sy_switch_experts(sw, ex, 0, E, 0.0, key);
        sy_switch_combine(sw, out);
        be->sync(be);
        double t1 = now_s();
        sy_switch_combine_bwd(sw, doutb);
        sy_switch_experts_bwd(sw, ex, 0, E);
        sy_switch_dispatch_bwd(sw, dh);
        sy_switch_route_bwd(sw, hb, Wrb, dWr, dh, aux_scale, z_scale);
        be->sync(be);
        double t2 = now_s(), c2 = cpu_s();
        if (it >= 0) {
            tc[it] = c2 - c0;
            tf[it] = t1 - t0;
            tb[it] = t2 - t1;
            tt[it] = t2 - t0;
        }
    }
    sy_switch_info info = sy_switch_get_info(sw);
    /* A checksum over the outputs, so the work cannot be skipped and the two sides can be
     * compared loosely: Σ out·dout (= the main-loss part of the objective). */
    be->download(be, outh, out, sizeof(float) * gd);
    be->download(be, dhh, dh, sizeof(float) * gd);
    double obj = 0.0, dh2 = 0.0;
    for (size_t i = 0; i < gd; i++) obj += (double)outh[i] * dout[i], dh2 += (double)dhh[i] * dhh[i];
    /* and a hash of every result's bits (out, dh, dWr and the fp64 expert-gradient sums, which
     * add up over all warmup + timed iterations), to check that a change keeps them exactly */
    uint64_t bits = fnv1a(0xcbf29ce484222325ull, outh, sizeof(float) * gd);
    bits = fnv1a(bits, dhh, sizeof(float) * gd);
    {
        double *a = malloc(sizeof(double) * fd * E);
        if (!a) {
            s = sy_err_set(SY_ENOMEM, "switch bench: out of memory");
            goto done;
        }
        be->download(be, a, dWr, sizeof(float) * (size_t)E * D);
        bits = fnv1a(bits, a, sizeof(float) * (size_t)E * D);
        be->download(be, a, acc1, sizeof(double) * fd * E);
        bits = fnv1a(bits, a, sizeof(double) * fd * E);
        be->download(be, a, acc2, sizeof(double) * fd * E);
        bits = fnv1a(bits, a, sizeof(double) * fd * E);
        free(a);
    }
    double fwd = median(tf, o->iters) * 1e3, bwd = median(tb, o->iters) * 1e3,
           tot = median(tt, o->iters) * 1e3, min_ms = tt[0] * 1e3, cpu = median(tc, o->iters) * 1e3, cpu_min = tc[0] * 1e3;
    double flop_fwd = 2.0 * info.n_kept * D * F * 2 + 2.0 * G * D * E;
    double flop_bwd = 2.0 * (2.0 * info.n_kept * D * F * 2) + 2.0 * (2.0 * G * D * E);
    double gflops = (flop_fwd + flop_bwd) / (tot * 1e-3) / 1e9;
    printf("switch G=%d D=%d F=%d E=%d cf=%.2f skew=%.2f: C=%d kept %d/%d (%.1f%%, %.1f%% dropped), "
           "aux %.4f z %.4f\n", G, D, F, E, o->cf, o->skew, info.C, info.n_kept, G,
           100.0 * info.n_kept / G, 100.0 * (G - info.n_kept) / G, info.aux_group, info.z_group);
    printf("  kept per expert:");
    for (int e = 0; e < E; e++) printf(" %d/%d", info.kept[e], info.counts[e]);
    printf("\n  median over %d: fwd %.2f ms, bwd %.2f ms, fwd+bwd %.2f ms, %.1f GFLOP/s; "
           "CPU time %.2f ms; bits %016llx\n", o->iters, fwd, bwd, tot, gflops, cpu,
           (unsigned long long)bits);
    printf("RESULT name=%s ms=%.4f min_ms=%.4f fwd_ms=%.4f bwd_ms=%.4f gflops=%.3f kept=%d G=%d "
           "capacity=%d aux=%.6f z=%.6f obj=%.6e dh_norm=%.6e cpu_ms=%.4f cpu_min_ms=%.4f bits=%016llx\n",
           o->skew > 0.0 ? "switch_skew" : "switch", tot, min_ms, fwd, bwd, gflops, info.n_kept, G, info.C, info.aux_group, info.z_group, obj,
           sqrt(dh2), cpu, cpu_min, (unsigned long long)bits);
done:
    if (f) fclose(f);
    sy_switch_destroy(&sw);
    void *bufs[] = {hb, Wrb, dWr, out, doutb, dh, W1b, W2b, dW1, dW2, acc1, acc2};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i]) be->free(be, bufs[i]);
    void *host[] = {h, Wr, dout, W1, W2, outh, dhh};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++) free(host[i]);
    free(ex);
    free(tf);
    free(tb);
    free(tt);
    free(tc);
    return s;
}

/* ------------------------------------------------------------------------------------------ */

static sy_status dump_model(const opts_t *o, const sy_config_t *cfg, sy_model_t *m,
                            const int32_t *tokens, size_t ntok) {
    char path[4096];
    sy_status s = SY_OK;
    FILE *f = NULL;
    snprintf(path, sizeof path, "%s.json", o->dump);
    json_t *j = sy_config_to_json(cfg);
    int rc = j ? json_dump_file(j, path, JSON_INDENT(1)) : -1;
    json_decref(j);
    if (rc != 0) return sy_err_set(SY_EIO, "cannot write %s", path);
    snprintf(path, sizeof path, "%s.params", o->dump);
    if (!(f = fopen(path, "wb"))) return sy_err_set(SY_EIO, "cannot create %s", path);
    float *host = malloc(sy_model_numel(m) * sizeof(float) + 1); /* the masters, downloaded */
    if (host) {
        sy_backend_t *be = sy_model_backend(m);
        be->download(be, host, sy_model_params(m), sy_model_numel(m) * sizeof(float));
        s = write_floats(f, path, host, sy_model_numel(m));
        free(host);
    } else {
        s = sy_err_set(SY_ENOMEM, "out of memory");
    }
    if (fclose(f) != 0 && s == SY_OK) s = sy_err_set(SY_EIO, "cannot write %s", path);
    if (s != SY_OK) return s;

    snprintf(path, sizeof path, "%s.index", o->dump);
    if (!(f = fopen(path, "w"))) return sy_err_set(SY_EIO, "cannot create %s", path);
    for (int i = 0; i < sy_model_n_params(m); i++) {
        const sy_param_t *p = sy_model_param(m, i);
        fprintf(f, "%s %zu %zu\n", p->name, p->offset, p->numel);
    }
    if (fclose(f) != 0) return sy_err_set(SY_EIO, "cannot write %s", path);

    snprintf(path, sizeof path, "%s.tokens", o->dump);
    if (!(f = fopen(path, "wb"))) return sy_err_set(SY_EIO, "cannot create %s", path);
    if (fwrite(tokens, sizeof(int32_t), ntok, f) != ntok)
        s = sy_err_set(SY_EIO, "cannot write %s", path);
    if (fclose(f) != 0 && s == SY_OK) s = sy_err_set(SY_EIO, "cannot write %s", path);
    return s;
}

static sy_status bench_step(const opts_t *o, sy_backend_t *be) {
    sy_status s = SY_OK;
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    sy_model_t *m = NULL;
    sy_adamw_t *opt = NULL;
    int32_t *tokens = NULL;
    double *t = calloc((size_t)o->iters, sizeof(double));
    if (!t) return sy_err_set(SY_ENOMEM, "step bench: out of memory");

    SY_CHECK_GOTO(sy_config_defaults(&cfg), s, done);
    if (o->config) SY_CHECK_GOTO(sy_config_load(&cfg, o->config), s, done);
    const int b = cfg.train.micro_batch_seqs, T = cfg.model.seq_len, V = cfg.model.vocab_size;
    const int M = cfg.train.global_batch_seqs / b;
    sy_model_dims dims = sy_model_dims_from_config(&cfg);
    SY_CHECK_GOTO(sy_model_new(&dims, be, &m), s, done);
    SY_CHECK_GOTO(sy_adamw_new(m, &cfg, &opt), s, done);
    sy_model_init(m, cfg.run.seed);

    const size_t per_micro = (size_t)b * (T + 1), ntok = per_micro * M;
    tokens = malloc(sizeof(int32_t) * ntok);
    if (!tokens) {
        s = sy_err_set(SY_ENOMEM, "step bench: out of memory");
        goto done;
    }
    sy_rng_t r = sy_rng_key(o->seed, "bench.tokens", 0, 0, 0);
    for (size_t i = 0; i < ntok; i++) tokens[i] = (int32_t)sy_rng_below(&r, (uint64_t)V);
    if (o->dump) SY_CHECK_GOTO(dump_model(o, &cfg, m, tokens, ntok), s, done);

    const size_t numel = sy_model_numel(m);
    double loss0 = 0.0, loss_last = 0.0;
    int64_t routed = 0, dropped = 0, ntokens = 0;
    for (int it = -o->warmup; it < o->iters; it++) {
        const int64_t s0 = it + o->warmup; /* 0-based step */
        double t0 = now_s();
        sy_model_zero_grads(m);
        double loss = 0.0;
        ntokens = 0;
        for (int mi = 0; mi < M; mi++) {
            sy_losses l;
            sy_draw_key key = {cfg.run.seed, s0, mi};
            SY_CHECK_GOTO(sy_model_fwd_bwd(m, tokens + per_micro * mi, M, key, &l), s, done);
            loss += l.ce + l.aux + l.z;
            ntokens += l.tokens;
            routed += l.routed;
            dropped += l.dropped;
        }
        float *g = sy_model_grads(m);
        double norm = sqrt(sy_grad_sqnorm(sy_model_backend(m), g, numel));
        sy_clip_grads(sy_model_backend(m), g, numel, norm, cfg.train.grad_clip);
        sy_adamw_step(opt, sy_lr_at(&cfg, s0));
        double dt = now_s() - t0;
        if (it >= 0) t[it] = dt;
        if (s0 == 0) loss0 = loss;
        loss_last = loss;
    }
    double ms = median(t, o->iters) * 1e3, min_ms = t[0] * 1e3;
    double tps = (double)ntokens / (ms * 1e-3);
    printf("step %s: V=%d T=%d D=%d L=%d F=%d E=%d, %d x %d seqs, %zu params\n",
           o->config ? o->config : "(defaults)", V, T, cfg.model.d_model, cfg.model.n_layers,
           cfg.model.d_ff, cfg.model.n_experts, M, b, numel);
    printf("  median over %d: %.2f ms/step, %.0f tokens/s; loss %.4f -> %.4f; dropped %.2f%%\n",
           o->iters, ms, tps, loss0, loss_last, routed ? 100.0 * dropped / routed : 0.0);
    printf("RESULT name=step ms=%.4f min_ms=%.4f tokens_per_s=%.1f tokens=%lld loss0=%.6f loss_last=%.6f "
           "dropped_frac=%.5f steps=%d\n",
           ms, min_ms, tps, (long long)ntokens, loss0, loss_last,
           routed ? (double)dropped / routed : 0.0, o->warmup + o->iters);
done:
    sy_adamw_destroy(&opt);
    sy_model_destroy(&m);
    sy_config_free(&cfg);
    free(tokens);
    free(t);
    return s;
}

/* ------------------------------------------------------------------------------------------ */

static void usage(FILE *f) {
    fprintf(f,
            "usage: sy_bench sgemm|switch|step [options]\n"
            "  --threads N     threads (default 2)\n"
            "  --iters N       timed iterations (median reported)\n"
            "  --warmup N      untimed iterations first\n"
            "  --seed S        input seed (default 1)\n"
            "switch: --tokens G (2048) --d-model D (512) --d-ff F (2048) --experts E (8)\n"
            "        --cf X (1.25) --router-std S (default sqrt(0.1/D)) --skew X (0: none)\n"
            "        --dump FILE   (expert weight gradients always accumulate in fp64, as in\n"
            "        training; --skew X > 0 skews routing so the busiest experts drop tokens)\n"
            "step:   --config FILE (configs/tiny.yaml values are the defaults) --dump PREFIX\n");
}

static int parse_int(const char *name, const char *v, int lo, int *out) {
    char *end;
    long x = strtol(v, &end, 10);
    if (*end || x < lo || x > 1 << 30) {
        fprintf(stderr, "sy_bench: %s %s: expected an integer >= %d\n", name, v, lo);
        return -1;
    }
    *out = (int)x;
    return 0;
}

static int parse_double(const char *name, const char *v, double *out) {
    char *end;
    double x = strtod(v, &end);
    if (*end || !(x > 0) || !isfinite(x)) {
        fprintf(stderr, "sy_bench: %s %s: expected a positive number\n", name, v);
        return -1;
    }
    *out = x;
    return 0;
}

int main(int argc, char **argv) {
    sy_cpu_setup(argc, argv);
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    opts_t o = {.mode = argv[1], .threads = 2, .iters = -1, .warmup = -1, .G = 2048, .D = 512,
                .F = 2048, .E = 8, .cf = 1.25, .router_std = -1, .seed = 1};
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) {
            fprintf(stderr, "sy_bench: %s: missing value\n", a);
            return 2;
        }
        const char *v = argv[++i];
        int rc = 0;
        if (!strcmp(a, "--threads")) rc = parse_int(a, v, 1, &o.threads);
        else if (!strcmp(a, "--iters")) rc = parse_int(a, v, 1, &o.iters);
        else if (!strcmp(a, "--warmup")) rc = parse_int(a, v, 0, &o.warmup);
        else if (!strcmp(a, "--tokens")) rc = parse_int(a, v, 1, &o.G);
        else if (!strcmp(a, "--d-model")) rc = parse_int(a, v, 1, &o.D);
        else if (!strcmp(a, "--d-ff")) rc = parse_int(a, v, 1, &o.F);
        else if (!strcmp(a, "--experts")) rc = parse_int(a, v, 1, &o.E);
        else if (!strcmp(a, "--cf")) rc = parse_double(a, v, &o.cf);
        else if (!strcmp(a, "--router-std")) rc = parse_double(a, v, &o.router_std);
        else if (!strcmp(a, "--skew")) rc = parse_double(a, v, &o.skew);
        else if (!strcmp(a, "--seed")) {
            int sd;
            rc = parse_int(a, v, 0, &sd);
            o.seed = (uint64_t)sd;
        } else if (!strcmp(a, "--config")) o.config = v;
        else if (!strcmp(a, "--dump")) o.dump = v;
        else if (!strcmp(a, "--backend")) o.backend = v;
        else if (!strcmp(a, "--device")) rc = parse_int(a, v, 0, &o.device);
        else if (!strcmp(a, "--precision")) {
            if (strcmp(v, "bf16") && strcmp(v, "fp32")) {
                fprintf(stderr, "sy_bench: --precision %s: expected bf16 or fp32\n", v);
                return 2;
            }
            o.bf16 = !strcmp(v, "bf16");
        }
        else {
            fprintf(stderr, "sy_bench: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        if (rc) return 2;
    }
    if (o.router_std < 0) o.router_std = sqrt(0.1 / o.D);

    if (!strcmp(o.mode, "cublas")) {
        const int M = o.G == 2048 ? 4096 : o.G, N = o.F == 2048 ? 3072 : o.F, K = o.D == 512 ? 768 : o.D;
        double tf = sy_backend_cuda_gemm_tflops(o.device, M, N, K, o.iters < 0 ? 20 : o.iters);
        if (tf < 0) {
            fprintf(stderr, "sy_bench: %s\n", sy_err_msg());
            return 1;
        }
        printf("cublas bf16 GEMM %dx%dx%d (fp32 accumulate): %.1f TFLOP/s\n", M, N, K, tf);
        printf("RESULT name=cublas_bf16 M=%d N=%d K=%d tflops=%.3f\n", M, N, K, tf);
        return 0;
    }
    sy_backend_t *be = NULL;
    sy_status s = o.backend && !strcmp(o.backend, "cuda") ? sy_backend_cuda_new(o.device, o.bf16, &be)
                                                           : sy_backend_cpu_new(o.threads, o.bf16, &be);
    if (s != SY_OK) {
        fprintf(stderr, "sy_bench: %s\n", sy_err_msg());
        return 1;
    }
    if (!strcmp(o.mode, "sgemm")) {
        if (o.iters < 0) o.iters = 5;
        s = bench_sgemm(&o);
    } else if (!strcmp(o.mode, "switch")) {
        if (o.iters < 0) o.iters = 20;
        if (o.warmup < 0) o.warmup = 3;
        s = bench_switch(&o, be);
    } else if (!strcmp(o.mode, "step")) {
        if (o.iters < 0) o.iters = 10;
        if (o.warmup < 0) o.warmup = 2;
        s = bench_step(&o, be);
    } else {
        fprintf(stderr, "sy_bench: unknown mode %s\n", o.mode);
        usage(stderr);
        sy_backend_destroy(&be);
        return 2;
    }
    sy_backend_destroy(&be);
    if (s != SY_OK) {
        fprintf(stderr, "sy_bench %s: %s\n", o.mode, sy_err_msg());
        return 1;
    }
    return 0;
}
