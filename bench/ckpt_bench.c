/* Checkpoint save / load throughput of a model state (parameters + AdamW moments) to a store,
 * and the stall of an asynchronous save (snapshot copy) for the same state. Driven by
 * bench/ckpt_bench.sh, which also times plain `cp` of the same bytes.
 *
 * usage: ckpt_bench --store URL [--run NAME] [--set SECTION.FIELD=VALUE ...] [--reps N]
 * Prints one JSON line: numel, state_bytes (sum of the checkpoint files), save_s, save_mbps,
 * load_s, load_mbps, async_stall_ms, async_upload_ms (best of N repetitions each). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "storage/ckpt.h"
#include "worker/ckpt_async.h"
#include "base/config.h"
#include "model/model.h"
#include "model/model_ckpt.h"
#include "model/optim.h"
#include "storage/store.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Fills the backend buffer x [n] through the host buffer tmp [n]. */
static void fill(sy_backend_t *be, float *x, float *tmp, size_t n, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        tmp[i] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
    }
    be->upload(be, x, tmp, n * sizeof(float));
}

int main(int argc, char **argv) {
    static const struct option longopts[] = {{"store", required_argument, 0, 'o'},
                                             {"run", required_argument, 0, 'r'},
                                             {"set", required_argument, 0, 's'},
                                             {"reps", required_argument, 0, 'n'},
                                             {0, 0, 0, 0}};
    const char *store_url = NULL, *run = "bench";
    char **sets = calloc((size_t)argc + 1, sizeof(char *));
    int n_sets = 0, reps = 3, c, rc = 1;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': store_url = optarg; break;
        case 'r': run = optarg; break;
        case 's': sets[n_sets++] = optarg; break;
        case 'n': reps = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: ckpt_bench --store URL [--run NAME] [--set S.F=V ...] [--reps N]\n");
            return 2;
        }
    }
    if (!store_url || reps < 1) {
        fprintf(stderr, "usage: ckpt_bench --store URL [--run NAME] [--set S.F=V ...] [--reps N]\n");
        return 2;
    }
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    sy_backend_t *be = NULL;
    sy_model_t *m = NULL;
    sy_adamw_t *opt = NULL;
    sy_store_t *st = NULL;
    sy_ckpt_saver_t *sv = NULL;
    if (sy_config_defaults(&cfg) != SY_OK) goto fail;
    for (int i = 0; i < n_sets; i++)
        if (sy_config_set(&cfg, sets[i]) != SY_OK) goto fail;
    if (sy_config_validate(&cfg) != SY_OK) goto fail;
    sy_model_dims d = sy_model_dims_from_config(&cfg);
    d.B = 1;
    if (sy_backend_cpu_new(cfg.train.threads, false, &be) != SY_OK || sy_model_new(&d, be, &m) != SY_OK ||
        sy_adamw_new(m, &cfg, &opt) != SY_OK || sy_store_open(store_url, &st) != SY_OK)
        goto fail;
    size_t n = sy_model_numel(m);
    float *tmp = malloc(n * sizeof(float) + 1);
    if (!tmp) {
        sy_err_set(SY_ENOMEM, "out of memory");
        goto fail;
    }
    fill(be, sy_model_params(m), tmp, n, 1);
    fill(be, sy_adamw_m(opt), tmp, n, 2);
    fill(be, sy_adamw_v(opt), tmp, n, 3);
    free(tmp);
    sy_adamw_set_t_count(opt, 1);

    double best_save = 1e30, best_load = 1e30, best_stall = 1e30, best_upload = 1e30;
    int64_t bytes = 0;
    for (int r = 0; r < reps; r++) {
        int64_t step = r + 1;
        double t0 = now_s();
        if (sy_model_ckpt_save(st, run, step, m, opt, NULL) != SY_OK) goto fail;
        double ts = now_s() - t0;
        if (ts < best_save) best_save = ts;
        t0 = now_s();
        if (sy_model_ckpt_load(st, run, step, m, opt, NULL) != SY_OK) goto fail;
        double tl = now_s() - t0;
        if (tl < best_load) best_load = tl;
        if (r == 0) {
            json_t *man = NULL;
            if (sy_ckpt_read_manifest(st, run, step, &man) != SY_OK) goto fail;
            const json_t *fl = json_object_get(man, "files");
            for (size_t i = 0; i < json_array_size(fl); i++)
                bytes += json_integer_value(json_object_get(json_array_get(fl, i), "size"));
            json_decref(man);
        }
        if (sy_ckpt_retain(st, run, 1) != SY_OK) goto fail;
    }
    /* async: the caller's stall (snapshot copy) and the background time, same state */
    if (sy_ckpt_saver_new(st, run, 1, SY_ONBUSY_WAIT, &sv) != SY_OK) goto fail;
    if (sy_ckpt_saver_prepare(sv, m, opt) != SY_OK) goto fail;
    for (int r = 0; r < reps; r++) {
        double stall = 0;
        if (sy_ckpt_saver_submit(sv, 1000 + r, m, opt, NULL, &stall) != SY_OK) goto fail;
        if (sy_ckpt_saver_wait(sv) != SY_OK) goto fail;
        sy_ckpt_saver_stats s;
        sy_ckpt_saver_get_stats(sv, &s);
        if (stall < best_stall) best_stall = stall;
        if (s.last_upload_ms < best_upload) best_upload = s.last_upload_ms;
    }
    printf("{\"numel\": %zu, \"state_bytes\": %lld, \"save_s\": %.4f, \"save_mbps\": %.1f, \"load_s\": %.4f, "
           "\"load_mbps\": %.1f, \"async_stall_ms\": %.2f, \"async_upload_ms\": %.1f}\n",
           n, (long long)bytes, best_save, bytes / best_save / 1e6, best_load, bytes / best_load / 1e6, best_stall,
           best_upload);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "ckpt_bench: %s\n", sy_err_msg());
out:
    sy_ckpt_saver_destroy(&sv);
    sy_store_destroy(&st);
    sy_adamw_destroy(&opt);
    sy_model_destroy(&m);
    sy_backend_destroy(&be);
    sy_config_free(&cfg);
    free(sets);
    return rc;
}
