/* Dumps what the PyTorch reference (tests/reference/) checks switchyard against:
 *
 *   sy_refdump CONFIG --out DIR --steps K [--set SECTION.FIELD=VALUE ...]
 *
 * writes into DIR:
 *   config.json          the effective config (sy_config_to_json)
 *   init.safetensors     the parameters after initialisation (model spec §7 names, F32)
 *   tokens.bin           int32 little-endian [K, M, b, T+1]: the micro-batches of steps 1..K
 *   grads1.safetensors   the gradients of step 1, before clipping (spec names)
 *   final.safetensors    the parameters after K AdamW steps
 *   losses.json          [{"step", "loss", "ce", "aux", "z", "grad_norm", "lr", "dropped"}...]
 * The training loop is the same as `switchyard train` (model, data order, clipping, schedule). */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/config.h"
#include "backend/cpu_setup.h"
#include "data/data.h"
#include "model/model.h"
#include "model/optim.h"
#include "base/safetensors.h"

static int write_file(const char *dir, const char *name, const void *buf, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(buf, 1, len, f) != len) {
        fprintf(stderr, "sy_refdump: cannot write %s\n", path);
        if (f) fclose(f);
        return -1;
    }
    fclose(f);
    return 0;
}

/* base: a backend buffer laid out like the parameters (params or grads), downloaded first */
static int dump_tensors(const char *dir, const char *name, sy_model_t *m, const float *base) {
    int n = sy_model_n_params(m);
    sy_tensor_ref *refs = calloc((size_t)n, sizeof *refs);
    float *host = malloc(sy_model_numel(m) * sizeof(float) + 1);
    void *buf = NULL;
    size_t len = 0;
    int rc = -1;
    if (refs && host) {
        sy_backend_t *be = sy_model_backend(m);
        be->download(be, host, base, sy_model_numel(m) * sizeof(float));
        for (int i = 0; i < n; i++) refs[i] = sy_model_ref(m, i, host, NULL);
        if (sy_st_serialize(refs, n, SY_ST_F32, &buf, &len) == SY_OK) rc = write_file(dir, name, buf, len);
        else fprintf(stderr, "sy_refdump: %s\n", sy_err_msg());
    }
    free(buf);
    free(host);
    free(refs);
    return rc;
}

int main(int argc, char **argv) {
    sy_cpu_setup(argc, argv);
    const char *cfg_path = NULL, *out = NULL;
    int steps = 3;
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    sy_config_defaults(&cfg);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--set") && i + 1 < argc) {
            if (!cfg_path) {
                fprintf(stderr, "sy_refdump: CONFIG must come before --set\n");
                return 2;
            }
            if (sy_config_set(&cfg, argv[++i]) != SY_OK) {
                fprintf(stderr, "sy_refdump: %s\n", sy_err_msg());
                return 2;
            }
        } else if (!cfg_path) {
            cfg_path = argv[i];
            if (sy_config_load(&cfg, cfg_path) != SY_OK) {
                fprintf(stderr, "sy_refdump: %s\n", sy_err_msg());
                return 2;
            }
        } else {
            fprintf(stderr, "usage: sy_refdump CONFIG --out DIR --steps K [--set k=v ...]\n");
            return 2;
        }
    }
    if (!cfg_path || !out || steps < 1) {
        fprintf(stderr, "usage: sy_refdump CONFIG --out DIR --steps K [--set k=v ...]\n");
        return 2;
    }
    if (sy_config_validate(&cfg) != SY_OK) {
        fprintf(stderr, "sy_refdump: %s\n", sy_err_msg());
        return 2;
    }
    mkdir(out, 0755);
    sy_backend_t *be = NULL;
    sy_model_t *m = NULL;
    sy_adamw_t *opt = NULL;
    sy_data_t *d = NULL;
    const int b = cfg.train.micro_batch_seqs, T = cfg.model.seq_len;
    const int M = cfg.train.global_batch_seqs / b;
    sy_model_dims dims = sy_model_dims_from_config(&cfg);
    sy_data_options dopt;
    sy_data_options_from_config(&cfg, &dopt); /* data.order as the run has it */
    dopt.prefetch_steps = 0;
    if (sy_backend_cpu_new(cfg.train.threads, cfg.train.precision == SY_PREC_BF16, &be) != SY_OK ||
        sy_model_new(&dims, be, &m) != SY_OK || sy_adamw_new(m, &cfg, &opt) != SY_OK ||
        sy_data_open_with((const char *const *)cfg.data.train.items, cfg.data.train.n, cfg.model.vocab_size, T, &dopt,
                          &d) != SY_OK) {
        fprintf(stderr, "sy_refdump: %s\n", sy_err_msg());
        return 1;
    }
    json_t *cj = sy_config_to_json(&cfg);
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", out);
    json_dump_file(cj, path, JSON_INDENT(2));
    json_decref(cj);

    sy_model_init(m, cfg.run.seed);
    if (dump_tensors(out, "init.safetensors", m, sy_model_params(m))) return 1;
    size_t row = (size_t)b * (T + 1);
    int32_t *tokens = malloc(sizeof(int32_t) * row * M * steps);
    json_t *losses = json_array();
    size_t numel = sy_model_numel(m);
    for (int s = 0; s < steps; s++) {
        sy_model_zero_grads(m);
        double ce = 0, aux = 0, z = 0;
        int64_t dropped = 0;
        for (int mi = 0; mi < M; mi++) {
            int32_t *tk = tokens + ((size_t)s * M + mi) * row;
            sy_losses l;
            if (sy_data_train_batch(d, cfg.run.seed, s, M, b, mi, tk) != SY_OK ||
                sy_model_fwd_bwd(m, tk, M, (sy_draw_key){cfg.run.seed, s, mi}, &l) != SY_OK) {
                fprintf(stderr, "sy_refdump: %s\n", sy_err_msg());
                return 1;
            }
            ce += l.ce, aux += l.aux, z += l.z, dropped += l.dropped;
        }
        if (s == 0 && dump_tensors(out, "grads1.safetensors", m, sy_model_grads(m))) return 1;
        double norm = sqrt(sy_grad_sqnorm(be, sy_model_grads(m), numel));
        sy_clip_grads(be, sy_model_grads(m), numel, norm, cfg.train.grad_clip);
        double lr = sy_lr_at(&cfg, s);
        sy_adamw_step(opt, lr);
        json_array_append_new(losses, json_pack("{s:i, s:f, s:f, s:f, s:f, s:f, s:f, s:I}", "step", s + 1,
                                                "loss", ce + aux + z, "ce", ce, "aux", aux, "z", z,
                                                "grad_norm", norm, "lr", lr, "dropped", (json_int_t)dropped));
    }
    if (write_file(out, "tokens.bin", tokens, sizeof(int32_t) * row * M * steps)) return 1;
    if (dump_tensors(out, "final.safetensors", m, sy_model_params(m))) return 1;
    snprintf(path, sizeof path, "%s/losses.json", out);
    json_dump_file(losses, path, JSON_INDENT(1));
    json_decref(losses);
    free(tokens);
    sy_data_destroy(&d);
    sy_adamw_destroy(&opt);
    sy_model_destroy(&m);
    sy_backend_destroy(&be);
    sy_config_free(&cfg);
    return 0;
}
