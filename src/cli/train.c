/* Single-process training and evaluation. */
#include "cli/train.h"
#include "cli/cli_ckpt.h"
#include "base/clock.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <libgen.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "storage/ckpt.h"
#include "worker/ckpt_async.h"
#include "storage/ckpt_run.h"
#include "backend/cpu_setup.h"
#include "data/data.h"
#include "worker/dist_step.h"
#include "base/fsutil.h"
#include "base/log.h"
#include "model/memplan.h"
#include "model/model.h"
#include "model/model_ckpt.h"
#include "model/optim.h"
#include "storage/store.h"
#include "storage/store_s3.h"



/* Rewrites metrics.jsonl keeping only the lines of steps <= keep_step (used on resume, so the
 * file tells one consistent history). */
static void metrics_truncate(const char *path, int64_t keep_step) {
    FILE *in = fopen(path, "r");
    if (!in) return;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *out = sy_fs_fopen_regular(tmp, 0);
    if (!out) {
        fclose(in);
        return;
    }
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, in) > 0) {
        json_t *j = json_loads(line, 0, NULL);
        json_t *s = j ? json_object_get(j, "step") : NULL;
        if (s && json_is_integer(s) && json_integer_value(s) <= keep_step) fputs(line, out);
        json_decref(j);
    }
    free(line);
    fclose(in);
    fclose(out);
    if (sy_fs_check_replaceable(path) == SY_OK) rename(tmp, path);
}


typedef struct {
    const sy_config_t *cfg;
    sy_backend_t *be;
    sy_model_t *model;
    sy_adamw_t *opt;
    sy_data_t *data;
    sy_data_t *val;         /* data.val for train.eval_every; NULL: no validation */
    int val_batches;
    sy_store_t *store;
    sy_ckpt_saver_t *saver; /* checkpoint.async: the background saver; NULL: synchronous */
    int32_t *tokens;
    int M;
    char writer[SY_RUN_WRITER_HEX + 1]; /* this process's claim on the run (ckpt_run.h) */
} trainer;

static void trainer_free(trainer *t) {
    sy_ckpt_saver_destroy(&t->saver); /* waits for a save in flight; before the store goes */
    sy_adamw_destroy(&t->opt);
    sy_model_destroy(&t->model);
    sy_backend_destroy(&t->be);
    sy_data_destroy(&t->data);
    sy_data_destroy(&t->val);
    sy_store_destroy(&t->store);
    free(t->tokens);
}

static json_t *manifest_extra(const sy_config_t *cfg, int64_t step, const char *writer) {
    json_t *ex = json_object();
    json_object_set_new(ex, "writer", json_string(writer));
    json_object_set_new(ex, "config", sy_config_to_json(cfg));
    /* The data position is the step alone (model spec §6): the next step to run is step+1,
     * whose samples start at global index step·M·b. RNG: every draw is keyed by
     * (seed, step, micro-batch, layer, token), so the seed is the whole RNG state. */
    json_object_set_new(ex, "data_position",
                        json_pack("{s:I, s:I}", "next_step", (json_int_t)(step + 1),
                                  "first_sample", (json_int_t)(step * cfg->train.global_batch_seqs)));
    json_object_set_new(ex, "rng", json_pack("{s:s, s:I}", "kind", "splitmix64-keyed", "seed",
                                             (json_int_t)cfg->run.seed));
    json_object_set_new(ex, "world", json_integer(1));
    return ex;
}

/* Checkpoint `step`. Synchronous: saves, applies retention; *stall_ms = *upload_ms = its time.
 * Async: snapshots and returns (*stall_ms = copy + wait for a save in flight; *upload_ms = -1);
 * an error of an earlier background save is logged, not fatal (the next save may succeed; the
 * final one is checked by finish_ckpt). */
static sy_status save_ckpt(trainer *t, int64_t step, double *stall_ms, double *upload_ms) {
    double t0 = sy_mono_s();
    json_t *ex = manifest_extra(t->cfg, step, t->writer);
    sy_status s;
    *upload_ms = -1.0;
    if (t->saver) {
        s = sy_ckpt_saver_submit(t->saver, step, t->model, t->opt, ex, stall_ms);
        json_decref(ex);
        if (s == SY_ECONFLICT) return s; /* fenced off: another writer owns the run now */
        if (s != SY_OK) sy_warn("training goes on after a checkpoint failure: %s", sy_err_msg());
        return SY_OK;
    }
    s = sy_model_ckpt_save(t->store, t->cfg->run.name, step, t->model, t->opt, ex);
    json_decref(ex);
    if (s == SY_EEXIST) { /* only when this writer committed it already (ckpt.h) */
        sy_warn("checkpoint step %lld already committed by this run; keeping it", (long long)step);
        s = SY_OK;
    }
    if (s == SY_OK) s = sy_ckpt_retain(t->store, t->cfg->run.name, t->cfg->checkpoint.keep_last);
    *stall_ms = *upload_ms = (sy_mono_s() - t0) * 1e3;
    return s;
}

/* Waits for the background save in flight (async) and returns its error: the run's last
 * checkpoint must be committed before train returns success. *ms: the wait. */
static sy_status finish_ckpt(trainer *t, double *ms) {
    double t0 = sy_mono_s();
    sy_status s = t->saver ? sy_ckpt_saver_wait(t->saver) : SY_OK;
    *ms = (sy_mono_s() - t0) * 1e3;
    return s;
}

sy_status sy_train_run(const sy_config_t *cfg, const sy_train_opts *opts) {
    trainer t = {.cfg = cfg};
    sy_status s = SY_OK;
    FILE *metrics = NULL;
    char mpath[4096];
    const int b = cfg->train.micro_batch_seqs, T = cfg->model.seq_len;
    t.M = cfg->train.global_batch_seqs / b;

    /* before anything big is allocated: a config too large for this machine is an error now,
     * not the OOM killer later */
    SY_CHECK_GOTO(sy_memplan_check(cfg, 1), s, done);
    if (strcmp(cfg->cluster.backend, "cuda") == 0) {
        /* single-process training on one GPU: SY_CUDA_DEVICE (default 0) */
        const char *dev = getenv("SY_CUDA_DEVICE");
        s = sy_backend_cuda_new(dev && dev[0] ? atoi(dev) : 0, cfg->train.precision == SY_PREC_BF16,
                                &t.be);
        if (s != SY_OK) {
            sy_err_prefix(s, "cluster.backend is cuda (--set cluster.backend=cpu trains on the CPU)");
            goto done;
        }
    } else {
        SY_CHECK_GOTO(sy_backend_cpu_new(cfg->train.threads, cfg->train.precision == SY_PREC_BF16,
                                         &t.be), s, done);
    }
    sy_model_dims dims = sy_model_dims_from_config(cfg);
    SY_CHECK_GOTO(sy_model_new(&dims, t.be, &t.model), s, done);
    SY_CHECK_GOTO(sy_adamw_new(t.model, cfg, &t.opt), s, done);
    sy_data_options dopts;
    sy_data_options_from_config(cfg, &dopts);
    SY_CHECK_GOTO(sy_data_open_with((const char *const *)cfg->data.train.items, cfg->data.train.n,
                                    cfg->model.vocab_size, T, &dopts, &t.data), s, done);
    if (cfg->data.val.n > 0) { /* a validation pattern that matches nothing is a mistake, not "no validation" */
        s = sy_data_check_patterns((const char *const *)cfg->data.val.items, cfg->data.val.n);
        if (s != SY_OK) {
            sy_err_prefix(s, "data.val (set data.val= for none)");
            goto done;
        }
    }
    SY_CHECK_GOTO(sy_dist_open_val(cfg, &t.val, &t.val_batches), s, done);
    SY_CHECK_GOTO(sy_store_open_config(cfg, &t.store), s, done);
    if (cfg->checkpoint.async)
        SY_CHECK_GOTO(sy_ckpt_saver_new(t.store, cfg->run.name, cfg->checkpoint.keep_last,
                                        cfg->checkpoint.on_busy, &t.saver), s, done);
    t.tokens = malloc(sizeof(int32_t) * (size_t)b * (T + 1));
    if (!t.tokens) {
        s = sy_err_set(SY_ENOMEM, "out of memory");
        goto done;
    }

    /* A resume must continue the same training: the config is checked before the run is
     * claimed, so a refused resume leaves the run's writer alone. */
    if (opts->resume) {
        int64_t latest;
        s = sy_ckpt_latest(t.store, cfg->run.name, &latest);
        if (s == SY_OK) {
            json_t *man = NULL;
            SY_CHECK_GOTO(sy_ckpt_read_manifest(t.store, cfg->run.name, latest, &man), s, done);
            char what[320];
            snprintf(what, sizeof what, "checkpoint %s step %lld", cfg->run.name, (long long)latest);
            s = sy_config_check_resume(cfg, json_object_get(man, "config"), what);
            json_decref(man);
        } else if (s == SY_ENOTFOUND) {
            s = SY_OK;
        }
        if (s != SY_OK) goto done;
    }
    /* claim the run: a fresh run never mixes with or loses an older one, and an older writer of
     * this run is fenced off from committing */
    s = sy_run_claim(t.store, cfg->run.name,
                     opts->resume ? SY_RUN_RESUME : opts->overwrite ? SY_RUN_OVERWRITE : SY_RUN_FRESH, t.writer,
                     NULL, 0);
    if (s != SY_OK) goto done;

    int64_t start = 0;
    if (opts->resume) {
        int64_t latest;
        s = sy_ckpt_latest(t.store, cfg->run.name, &latest);
        if (s == SY_OK) {
            SY_CHECK_GOTO(sy_model_ckpt_load(t.store, cfg->run.name, latest, t.model, t.opt, NULL),
                          s, done);
            start = latest;
            sy_info("resumed from checkpoint step %lld in %s", (long long)latest,
                    sy_store_url(t.store));
        } else if (s == SY_ENOTFOUND) {
            sy_info("no checkpoint for run %s in %s: starting from step 0", cfg->run.name,
                    sy_store_url(t.store));
            s = SY_OK;
        } else {
            goto done;
        }
    }
    if (start == 0) sy_model_init(t.model, cfg->run.seed);
    if (start >= cfg->run.steps) {
        sy_info("run %s is already complete (%lld steps)", cfg->run.name, (long long)start);
        goto done;
    }

    SY_CHECK_GOTO(sy_mkdir_p(cfg->run.state_dir), s, done);
    snprintf(mpath, sizeof mpath, "%s/metrics.jsonl", cfg->run.state_dir);
    if (start > 0) metrics_truncate(mpath, start);
    metrics = sy_fs_fopen_regular(mpath, start > 0);
    if (!metrics) {
        s = SY_EIO;
        goto done;
    }

    sy_info("model: %zu parameters (%zu dense), %d Switch layers x %d experts; %s on %d threads (OpenBLAS %s)",
            sy_model_numel(t.model), sy_model_dense_numel(t.model), sy_model_n_switch(t.model),
            cfg->model.n_experts, cfg->train.precision == SY_PREC_BF16 ? "bf16-emulated" : "fp32",
            omp_get_max_threads(), sy_cpu_blas_core());
    sy_info("data: %llu windows of %d tokens in %d shard(s); %d micro-batches of %d per step",
            (unsigned long long)sy_data_windows(t.data), T + 1, sy_data_shards(t.data), t.M, b);

    const bool tty = isatty(STDERR_FILENO);
    const double run_t0 = sy_mono_s();
    double ckpt_ms = 0.0;
    int64_t steps_done = 0;
    int64_t reported_saves = 0, upload_step = -1;
    if (t.saver) SY_CHECK_GOTO(sy_ckpt_saver_prepare(t.saver, t.model, t.opt), s, done);
    sy_dist_ctx dctx = {.cfg = cfg, .model = t.model, .opt = t.opt, .data = t.data, .comm = NULL,
                        .owned = NULL, .tokens = t.tokens};
    for (int64_t step = start + 1; step <= cfg->run.steps; step++) {
        double t0 = sy_mono_s();
        /* the distributed step with one rank: the same code, so the same numbers (W-invariance) */
        sy_step_result r = {0};
        SY_CHECK_GOTO(sy_dist_step(&dctx, step, &r), s, done);
        const double ce = r.ce, aux = r.aux, z = r.z, norm = r.grad_norm, lr = r.lr;
        const int64_t tokens = r.tokens, routed = r.routed, dropped = r.dropped;
        double dt = sy_mono_s() - t0;
        double loss = ce + aux + z;
        if (!isfinite(loss)) {
            s = sy_err_set(SY_EINTERNAL, "step %lld: loss is %f (diverged); stopping", (long long)step, loss);
            goto done;
        }
        steps_done++;

        double step_ckpt_ms = 0.0, upload_ms = -1.0;
        bool last = step == cfg->run.steps;
        bool stop_here = opts->stop_after > 0 && step >= opts->stop_after;
        if ((cfg->checkpoint.every > 0 && step % cfg->checkpoint.every == 0) || last) {
            SY_CHECK_GOTO(save_ckpt(&t, step, &step_ckpt_ms, &upload_ms), s, done);
            if (last || stop_here) {
                /* the final checkpoint is committed before we report success */
                double wait_ms = 0.0;
                SY_CHECK_GOTO(finish_ckpt(&t, &wait_ms), s, done);
                step_ckpt_ms += wait_ms;
            }
            ckpt_ms += step_ckpt_ms;
        }
        if (t.saver) { /* report each background upload once, on the first line after it ended */
            sy_ckpt_saver_stats cs;
            sy_ckpt_saver_get_stats(t.saver, &cs);
            if (cs.saves_done + cs.failed != reported_saves) {
                reported_saves = cs.saves_done + cs.failed;
                upload_ms = cs.last_upload_ms;
                upload_step = cs.last_step;
            }
        } else if (upload_ms >= 0) {
            upload_step = step;
        }
        double val_loss = NAN;
        if (t.val && sy_dist_eval_due(cfg, step)) {
            SY_CHECK_GOTO(sy_dist_eval(&dctx, t.val, t.val_batches, &val_loss), s, done);
            if (!opts->quiet)
                sy_info("step %lld: validation loss %.4f (%d micro-batches of data.val)", (long long)step,
                        val_loss, t.val_batches);
        }
        double tps = (double)tokens / dt;
        json_t *j = json_pack("{s:I, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:f, s:i, s:i, s:f, s:f}",
                              "step", (json_int_t)step, "loss", loss, "ce", ce, "aux", aux, "z", z,
                              "lr", lr, "grad_norm", norm, "tokens_per_s", tps, "dropped_frac",
                              routed ? (double)dropped / routed : 0.0, "world", 1, "generation", 0,
                              "step_ms", dt * 1e3, "time", (double)time(NULL));
        if (!isnan(val_loss)) json_object_set_new(j, "val_loss", json_real(val_loss));
        json_object_set_new(j, "ckpt_stall_ms", json_real(step_ckpt_ms));
        if (upload_ms >= 0) { /* time of the save of step ckpt_step (async: in the background) */
            json_object_set_new(j, "ckpt_upload_ms", json_real(upload_ms));
            json_object_set_new(j, "ckpt_step", json_integer(upload_step));
        }
        char *line = json_dumps(j, JSON_COMPACT);
        fprintf(metrics, "%s\n", line);
        fflush(metrics);
        free(line);
        json_decref(j);

        if (!opts->quiet && (step % cfg->run.log_every == 0 || last || step == start + 1)) {
            double elapsed = sy_mono_s() - run_t0;
            char eta[32];
            sy_log_fmt_duration(eta, sizeof eta, elapsed / steps_done * (cfg->run.steps - step));
            fprintf(stderr, "%sstep %lld/%lld | loss %.4f (ce %.4f aux %.4f z %.5f) | lr %.2e | %.1fk tok/s | dropped %.1f%% | ETA %s%s",
                    tty ? "\r" : "", (long long)step, (long long)cfg->run.steps, loss, ce, aux, z, lr,
                    tps / 1e3, routed ? 100.0 * dropped / routed : 0.0, eta, tty ? "\033[K" : "\n");
            fflush(stderr);
        }
        if (stop_here && !last) {
            if (tty && !opts->quiet) fputc('\n', stderr);
            sy_info("stopping after step %lld as asked", (long long)step);
            double wait_ms = 0.0;
            s = finish_ckpt(&t, &wait_ms); /* a save in flight is committed before we stop */
            goto done;
        }
    }
    if (tty && !opts->quiet) fputc('\n', stderr);
    /* "done" only once the final checkpoint reads back from the store as this run's */
    s = sy_run_verify_checkpoint(t.store, cfg->run.name, cfg->run.steps, t.writer);
    if (s != SY_OK) goto done;
    sy_info("done: %lld steps in %.1f s; checkpoints took %.0f ms; metrics in %s",
            (long long)steps_done, sy_mono_s() - run_t0, ckpt_ms, mpath);
done:
    if (metrics) fclose(metrics);
    trainer_free(&t);
    return s;
}

/* ------------------------------------------------------------------------------------------ */

static void train_usage(FILE *f) {
    fprintf(f,
            "usage: switchyard train CONFIG [options]\n"
            "\n"
            "Trains the model of CONFIG in this process, all experts local.\n"
            "\n"
            "options:\n"
            "  --set SECTION.FIELD=VALUE  override one config field (repeatable); see\n"
            "                             docs/configuration.md or `switchyard config doc`\n"
            "  --resume                   continue from the latest committed checkpoint of the\n"
            "                             run in checkpoint.store (from step 0 if none); the\n"
            "                             model and data-order fields must match it\n"
            "  --overwrite                start afresh although checkpoint.store holds a run of\n"
            "                             this name: move it aside to RUN.replaced-<time> first\n"
            "                             (without --resume or --overwrite such a run is refused)\n"
            "  --stop-after STEP          stop after this step (checkpoints as configured, no\n"
            "                             final one): for staged runs and resume tests\n"
            "  --quiet                    no progress line\n"
            "  -h, --help                 this help\n"
            "\n"
            "Writes metrics.jsonl to run.state_dir and checkpoints to\n"
            "checkpoint.store/run.name/ckpt/step-NNNNNNNNN/ every checkpoint.every steps and at the end.\n");
}

/* Loads CONFIG, applies --set overrides, validates. Shared by the commands. */
static sy_status load_config(sy_config_t *cfg, const char *path, char **sets, int n_sets) {
    SY_CHECK(sy_config_defaults(cfg));
    if (path) SY_CHECK(sy_config_load(cfg, path));
    for (int i = 0; i < n_sets; i++) SY_CHECK(sy_config_set(cfg, sets[i]));
    return sy_config_validate_from(cfg, path, sets, n_sets);
}

int sy_train_cli(int argc, char **argv) {
    static const struct option longopts[] = {{"set", required_argument, 0, 's'},
                                             {"resume", no_argument, 0, 'r'},
                                             {"overwrite", no_argument, 0, 'O'},
                                             {"stop-after", required_argument, 0, 'S'},
                                             {"quiet", no_argument, 0, 'q'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    char **sets = calloc((size_t)argc, sizeof(char *));
    int n_sets = 0, c, rc = 2;
    sy_train_opts opts = {0};
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 's': sets[n_sets++] = optarg; break;
        case 'r': opts.resume = true; break;
        case 'O': opts.overwrite = true; break;
        case 'q': opts.quiet = true; break;
        case 'S': {
            char *end;
            opts.stop_after = strtoll(optarg, &end, 10);
            if (*end || opts.stop_after < 1) {
                fprintf(stderr, "switchyard train: --stop-after %s: expected a step number >= 1\n", optarg);
                goto out;
            }
            break;
        }
        case 'h': train_usage(stdout); rc = 0; goto out;
        default: train_usage(stderr); goto out;
        }
    }
    if (opts.resume && opts.overwrite) {
        fprintf(stderr, "switchyard train: --resume and --overwrite exclude each other\n");
        goto out;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "switchyard train: expected exactly one CONFIG file\n");
        train_usage(stderr);
        goto out;
    }
    if (load_config(&cfg, argv[optind], sets, n_sets) != SY_OK) {
        fprintf(stderr, "switchyard train: %s\n", sy_err_msg());
        goto out;
    }
    sy_log_set_role("train");
    if (sy_train_run(&cfg, &opts) != SY_OK) {
        fprintf(stderr, "switchyard train: %s\n", sy_err_msg());
        rc = 1;
        goto out;
    }
    rc = 0;
out:
    sy_config_free(&cfg);
    free(sets);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */

static void eval_usage(FILE *f) {
    fprintf(f,
            "usage: switchyard eval --checkpoint DIR --data SHARDS [options]\n"
            "\n"
            "Mean cross-entropy of a checkpoint over the first N*micro_batch_seqs windows of SHARDS,\n"
            "in order (no shuffle), with the eval capacity factor, in micro-batches as in training.\n"
            "Prints one JSON line: loss, ce, tokens, batches, step, dropped_frac.\n"
            "\n"
            "options:\n"
            "  --checkpoint DIR   a checkpoint folder STORE/RUN/ckpt/step-NNNNNNNNN, or a run\n"
            "                     folder STORE/RUN (its latest committed checkpoint)\n"
            "  --data SHARDS      shard path or glob (repeatable, or comma-separated)\n"
            "  --batches N        micro-batches to evaluate (default: every full one)\n"
            "  --set S.F=V        override a field of the checkpoint's config (e.g.\n"
            "                     train.threads, model.eval_capacity_factor)\n"
            "  -h, --help         this help\n");
}

sy_status sy_cli_ckpt_dir_parse(const char *dir, char *store, char *run, int64_t *step) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", dir);
    size_t n = strlen(buf);
    while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
    char *base = strrchr(buf, '/');
    const char *last = base ? base + 1 : buf;
    *step = -1;
    if (!strncmp(last, "step-", 5)) {
        char *end;
        *step = strtoll(last + 5, &end, 10);
        if (*end || *step < 0 || !base)
            return sy_err_set(SY_EINVAL, "--checkpoint %s: not a checkpoint folder (step-NNNNNNNNN)", dir);
        *base = 0; /* strip step-N */
        base = strrchr(buf, '/');
        if (!base || strcmp(base + 1, "ckpt"))
            return sy_err_set(SY_EINVAL, "--checkpoint %s: expected STORE/RUN/ckpt/step-NNNNNNNNN", dir);
        *base = 0; /* strip ckpt */
    }
    base = strrchr(buf, '/');
    const char *name = base ? base + 1 : buf;
    if (strlen(name) >= 256)
        return sy_err_set(SY_EINVAL, "--checkpoint %s: run name longer than 255 characters", dir);
    memcpy(run, name, strlen(name) + 1);
    if (base) {
        *base = 0;
        snprintf(store, 4096, "%s", buf[0] ? buf : "/");
    } else {
        snprintf(store, 4096, ".");
    }
    return SY_OK;
}

int sy_eval_cli(int argc, char **argv) {
    static const struct option longopts[] = {{"checkpoint", required_argument, 0, 'c'},
                                             {"data", required_argument, 0, 'd'},
                                             {"batches", required_argument, 0, 'b'},
                                             {"set", required_argument, 0, 's'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    char **sets = calloc((size_t)argc, sizeof(char *)), **data = calloc((size_t)argc * 8 + 8, sizeof(char *));
    char *data_buf[64] = {0};
    int n_sets = 0, n_data = 0, n_bufs = 0, c, rc = 2;
    long long batches = 0;
    const char *ckdir = NULL;
    sy_cli_ckpt ck = {0};
    sy_data_t *d = NULL;
    int32_t *tokens = NULL;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c': ckdir = optarg; break;
        case 'd': {
            if (n_bufs >= 64) break;
            char *copy = strdup(optarg), *save = NULL;
            data_buf[n_bufs++] = copy;
            for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
                data[n_data++] = tok;
            break;
        }
        case 'b': {
            char *end;
            batches = strtoll(optarg, &end, 10);
            if (*end || batches < 1) {
                fprintf(stderr, "switchyard eval: --batches %s: expected an integer >= 1\n", optarg);
                goto out;
            }
            break;
        }
        case 's': sets[n_sets++] = optarg; break;
        case 'h': eval_usage(stdout); rc = 0; goto out;
        default: eval_usage(stderr); goto out;
        }
    }
    if (!ckdir || n_data == 0 || optind != argc) {
        fprintf(stderr, "switchyard eval: --checkpoint and --data are required\n");
        eval_usage(stderr);
        goto out;
    }
    sy_log_set_role("eval");
    rc = 1;
    bool bad_set;
    if (sy_cli_ckpt_open(&ck, ckdir, sets, n_sets, &bad_set) != SY_OK) goto fail;
    if (sy_cli_ckpt_load_model(&ck) != SY_OK) goto fail;
    const sy_config_t *cfg = &ck.cfg;
    if (sy_data_open((const char *const *)data, n_data, cfg->model.vocab_size, cfg->model.seq_len, &d) != SY_OK)
        goto fail;
    const int b = cfg->train.micro_batch_seqs, T = cfg->model.seq_len;
    uint64_t nw = sy_data_windows(d);
    long long max_batches = (long long)(nw / (uint64_t)b);
    if (batches == 0) batches = max_batches;
    if (batches < 1 || batches > max_batches) {
        sy_err_set(SY_EINVAL, "--batches %lld: the data holds %lld full micro-batches of %d windows",
                   batches, max_batches, b);
        goto fail;
    }
    tokens = malloc(sizeof(int32_t) * (size_t)b * (T + 1));
    if (!tokens) goto fail;
    double ce = 0, aux = 0, z = 0;
    int64_t ntok = 0, routed = 0, dropped = 0;
    for (long long i = 0; i < batches; i++) {
        if (sy_data_eval_batch(d, (uint64_t)i * b, b, tokens) != SY_OK) goto fail;
        sy_losses l;
        if (sy_model_forward_eval(ck.model, tokens, (int)batches, &l) != SY_OK) goto fail;
        ce += l.ce, aux += l.aux, z += l.z;
        ntok += l.tokens, routed += l.routed, dropped += l.dropped;
    }
    printf("{\"loss\": %.8f, \"ce\": %.8f, \"aux\": %.8f, \"z\": %.8f, \"tokens\": %lld, \"batches\": %lld, "
           "\"step\": %lld, \"dropped_frac\": %.6f}\n",
           ce, ce, aux, z, (long long)ntok, batches, (long long)ck.step,
           routed ? (double)dropped / routed : 0.0);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "switchyard eval: %s\n", sy_err_msg());
out:
    free(tokens);
    sy_data_destroy(&d);
    sy_cli_ckpt_close(&ck);
    for (int i = 0; i < n_bufs; i++) free(data_buf[i]);
    free(sets);
    free(data);
    return rc;
}
