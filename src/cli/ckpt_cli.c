/* `switchyard ckpt ls | show | export`; see ckpt_cli.h. */
#include "cli/ckpt_cli.h"

#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "storage/ckpt.h"
#include "base/fsutil.h"
#include "base/config.h"
#include "base/log.h"
#include "model/model.h"
#include "model/model_ckpt.h"
#include "base/safetensors.h"
#include "storage/store.h"

#define URL_MAX 4096
#define KEY_MAX (URL_MAX + 64)

sy_status sy_ckpt_cli_split(const char *arg, char *store, char *run, size_t cap, int64_t *step) {
    char buf[URL_MAX];
    *step = -1;
    if (!arg || !arg[0]) return sy_err_set(SY_EINVAL, "expected STORE/RUN[@STEP], got an empty argument");
    if (snprintf(buf, sizeof buf, "%s", arg) >= (int)sizeof buf)
        return sy_err_set(SY_EINVAL, "STORE/RUN '%.64s...' is too long", arg);
    size_t n = strlen(buf);
    while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
    char *slash = strrchr(buf, '/');
    char *name = slash ? slash + 1 : buf;
    char *at = strrchr(name, '@');
    if (at) {
        char *end;
        *at = 0;
        if (!at[1] || at[1] < '0' || at[1] > '9')
            return sy_err_set(SY_EINVAL, "%s: bad step '%s' after '@' (expected a step number >= 0)", arg, at + 1);
        long long v = strtoll(at + 1, &end, 10);
        if (*end || v < 0)
            return sy_err_set(SY_EINVAL, "%s: bad step '%s' after '@' (expected a step number >= 0)", arg, at + 1);
        *step = v;
    }
    if (!name[0] || !sy_store_key_valid(name))
        return sy_err_set(SY_EINVAL, "%s: invalid run name '%s' (expected STORE/RUN, run in [A-Za-z0-9._-])", arg,
                          name);
    if ((size_t)snprintf(run, cap, "%s", name) >= cap) return sy_err_set(SY_EINVAL, "%s: run name too long", arg);
    if (!slash) {
        snprintf(store, cap, ".");
        return SY_OK;
    }
    *slash = 0;
    if (slash == buf) {
        snprintf(store, cap, "/");
        return SY_OK;
    }
    size_t sl = strlen(buf);
    if (buf[sl - 1] == '/' || buf[sl - 1] == ':')
        return sy_err_set(SY_EINVAL, "%s: expected STORE/RUN with a store before the run name (e.g. s3://bucket/RUN)",
                          arg);
    if ((size_t)snprintf(store, cap, "%s", buf) >= cap) return sy_err_set(SY_EINVAL, "%s: store URL too long", arg);
    return SY_OK;
}

static void human(char *out, size_t cap, double bytes) {
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (bytes >= 1024 && i < 4) bytes /= 1024, i++;
    snprintf(out, cap, i ? "%.1f %s" : "%.0f %s", bytes, u[i]);
}

/* Sum of the sizes listed in a manifest. */
static int64_t manifest_bytes(const json_t *man) {
    const json_t *fl = json_object_get(man, "files");
    int64_t total = 0;
    for (size_t i = 0; i < json_array_size(fl); i++)
        total += json_integer_value(json_object_get(json_array_get(fl, i), "size"));
    return total;
}

/* Objects and bytes under a step folder (for debris). */
static sy_status folder_usage(sy_store_t *st, const char *run, int64_t step, size_t *n_files, uint64_t *bytes) {
    char prefix[KEY_MAX];
    char **keys = NULL;
    size_t n = 0;
    *n_files = 0;
    *bytes = 0;
    snprintf(prefix, sizeof prefix, "%s/ckpt/step-%09lld/", run, (long long)step);
    SY_CHECK(sy_store_list(st, prefix, &keys, &n));
    for (size_t i = 0; i < n; i++) {
        uint64_t sz = 0;
        if (sy_store_head(st, keys[i], &sz) == SY_OK) *bytes += sz;
    }
    *n_files = n;
    sy_store_keys_free(keys, n);
    return SY_OK;
}

/* Opens the store of STORE/RUN[@STEP] and lists the run's step folders (error if none). */
static sy_status open_run(const char *arg, sy_store_t **st, char *run, int64_t *step, sy_ckpt_step_info **steps,
                          size_t *n_steps) {
    char store[URL_MAX];
    *st = NULL;
    *steps = NULL;
    *n_steps = 0;
    SY_CHECK(sy_ckpt_cli_split(arg, store, run, URL_MAX, step));
    SY_CHECK(sy_store_open(store, st));
    SY_CHECK(sy_ckpt_list(*st, run, steps, n_steps));
    if (*n_steps == 0)
        return sy_err_set(SY_ENOTFOUND, "no checkpoints of run '%s' in %s (nothing under %s/ckpt/)", run,
                          sy_store_url(*st), run);
    return SY_OK;
}

/* ---------------------------------------------------------------- ls */

static int cmd_ls(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        FILE *f = argc == 2 ? stdout : stderr;
        fprintf(f, "usage: switchyard ckpt ls STORE/RUN\n"
                   "\n"
                   "Lists the checkpoints of run RUN in STORE (a folder, file:///abs/path or\n"
                   "s3://bucket/prefix), newest first: step, status, files, total bytes, creation\n"
                   "time. Step folders without a MANIFEST.json are debris of an unfinished save:\n"
                   "listed as 'uncommitted' and ignored by --resume, eval and export.\n");
        return argc == 2 ? 0 : 2;
    }
    sy_store_t *st = NULL;
    sy_ckpt_step_info *steps = NULL;
    size_t n = 0;
    char run[URL_MAX];
    int64_t step;
    int rc = 1;
    if (open_run(argv[1], &st, run, &step, &steps, &n) != SY_OK) goto fail;
    if (step >= 0) {
        sy_err_set(SY_EINVAL, "ckpt ls takes STORE/RUN without @STEP (use ckpt show %s)", argv[1]);
        rc = 2;
        goto fail;
    }
    printf("run %s in %s\n", run, sy_store_url(st));
    printf("%-12s %-12s %6s %14s %10s  %s\n", "STEP", "STATUS", "FILES", "BYTES", "SIZE", "CREATED");
    for (size_t i = 0; i < n; i++) {
        char hs[32];
        if (steps[i].committed) {
            json_t *man = NULL;
            if (sy_ckpt_read_manifest(st, run, steps[i].step, &man) != SY_OK) {
                printf("%-12lld %-12s %s\n", (long long)steps[i].step, "corrupt", sy_err_msg());
                continue;
            }
            int64_t bytes = manifest_bytes(man);
            human(hs, sizeof hs, (double)bytes);
            printf("%-12lld %-12s %6zu %14" PRId64 " %10s  %s\n", (long long)steps[i].step, "committed",
                   json_array_size(json_object_get(man, "files")), bytes, hs,
                   json_string_value(json_object_get(man, "created")) ? json_string_value(json_object_get(man, "created"))
                                                                      : "?");
            json_decref(man);
        } else {
            size_t nf = 0;
            uint64_t bytes = 0;
            if (folder_usage(st, run, steps[i].step, &nf, &bytes) != SY_OK) goto fail;
            human(hs, sizeof hs, (double)bytes);
            printf("%-12lld %-12s %6zu %14" PRIu64 " %10s  -  (no MANIFEST.json: debris, ignored)\n",
                   (long long)steps[i].step, "uncommitted", nf, bytes, hs);
        }
    }
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "switchyard ckpt ls: %s\n", sy_err_msg());
out:
    free(steps);
    sy_store_destroy(&st);
    return rc;
}

/* Picks the step to show/export: the given one (must be committed) or the newest committed. */
static sy_status pick_step(const char *run, const sy_ckpt_step_info *steps, size_t n, int64_t want, int64_t *out) {
    for (size_t i = 0; i < n; i++) {
        if (want >= 0 && steps[i].step != want) continue;
        if (steps[i].committed) {
            *out = steps[i].step;
            return SY_OK;
        }
        if (want >= 0)
            return sy_err_set(SY_ENOTFOUND,
                              "step %lld of run '%s' is not committed (no MANIFEST.json: debris of an unfinished save)",
                              (long long)want, run);
    }
    char list[512] = "";
    size_t k = 0;
    for (size_t i = 0; i < n && k + 24 < sizeof list; i++)
        if (steps[i].committed) k += (size_t)snprintf(list + k, sizeof list - k, "%s%lld", k ? ", " : "", (long long)steps[i].step);
    if (want >= 0)
        return sy_err_set(SY_ENOTFOUND, "no checkpoint at step %lld of run '%s' (committed: %s)", (long long)want, run,
                          k ? list : "none");
    return sy_err_set(SY_ENOTFOUND, "run '%s' has no committed checkpoint (only debris)", run);
}

/* ---------------------------------------------------------------- show */

static int cmd_show(int argc, char **argv) {
    if (argc != 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        FILE *f = argc == 2 ? stdout : stderr;
        fprintf(f, "usage: switchyard ckpt show STORE/RUN[@STEP]\n"
                   "\n"
                   "Prints the manifest of checkpoint STEP (default: the newest committed) and\n"
                   "verifies it: every file is read back and its size and SHA-256 checked against\n"
                   "the manifest. Prints 'verified' and exits 0, or names each failing file and\n"
                   "exits 1.\n");
        return argc == 2 ? 0 : 2;
    }
    sy_store_t *st = NULL;
    sy_ckpt_step_info *steps = NULL;
    json_t *man = NULL;
    size_t n = 0;
    char run[URL_MAX];
    int64_t want = -1, step = -1;
    int rc = 1;
    if (open_run(argv[1], &st, run, &want, &steps, &n) != SY_OK) goto fail;
    if (pick_step(run, steps, n, want, &step) != SY_OK) goto fail;
    if (sy_ckpt_read_manifest(st, run, step, &man) != SY_OK) goto fail;
    const json_t *fl = json_object_get(man, "files");
    int64_t bytes = manifest_bytes(man);
    char hs[32];
    human(hs, sizeof hs, (double)bytes);
    printf("run %s step %lld in %s\n", run, (long long)step, sy_store_url(st));
    printf("created         %s\n", json_string_value(json_object_get(man, "created")));
    const json_t *ost = json_object_get(man, "optimizer_step"), *world = json_object_get(man, "world");
    if (json_is_integer(ost)) printf("optimizer_step  %" JSON_INTEGER_FORMAT "\n", json_integer_value(ost));
    if (json_is_integer(world)) printf("world           %" JSON_INTEGER_FORMAT "\n", json_integer_value(world));
    const json_t *model = json_object_get(json_object_get(man, "config"), "model");
    if (json_is_object(model)) {
        printf("model          ");
        const char *keys[] = {"vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_ff", "n_experts",
                              "switch_every"};
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            const json_t *v = json_object_get(model, keys[i]);
            if (json_is_integer(v)) printf(" %s=%" JSON_INTEGER_FORMAT, keys[i], json_integer_value(v));
        }
        printf("\n");
    }
    printf("files           %zu, %" PRId64 " bytes (%s)\n", json_array_size(fl), bytes, hs);
    int bad = 0;
    char first_bad[256] = "";
    for (size_t i = 0; i < json_array_size(fl); i++) {
        const json_t *e = json_array_get(fl, i);
        const char *name = json_string_value(json_object_get(e, "name"));
        sy_status v = sy_ckpt_verify_file(st, man, name);
        printf("  %-34s %12" JSON_INTEGER_FORMAT "  sha256 %s  %s%s\n", name,
               json_integer_value(json_object_get(e, "size")), json_string_value(json_object_get(e, "sha256")),
               v == SY_OK ? "ok" : "FAILED: ", v == SY_OK ? "" : sy_err_msg());
        if (v != SY_OK && !bad++) snprintf(first_bad, sizeof first_bad, "%s", name);
    }
    fflush(stdout);
    if (bad) {
        printf("verification FAILED: %d of %zu files (first: %s)\n", bad, json_array_size(fl), first_bad);
        fprintf(stderr, "switchyard ckpt show: step %lld of run %s: %d corrupt or missing file(s), first %s\n",
                (long long)step, run, bad, first_bad);
        goto out;
    }
    printf("verified: %zu files, %" PRId64 " bytes, sizes and SHA-256 match the manifest\n", json_array_size(fl),
           bytes);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "switchyard ckpt show: %s\n", sy_err_msg());
out:
    json_decref(man);
    free(steps);
    sy_store_destroy(&st);
    return rc;
}

/* ---------------------------------------------------------------- export */

static void export_usage(FILE *f) {
    fprintf(f, "usage: switchyard ckpt export STORE/RUN[@STEP] --out FILE [--dtype bf16|fp32]\n"
               "\n"
               "Writes the parameters of checkpoint STEP (default: the newest committed one that\n"
               "verifies) as ONE safetensors file with the model spec section 7 names (no optimizer\n"
               "state), metadata {\"format\": \"pt\"}, loadable by safetensors.torch.load_file.\n"
               "Every file read is checked against the manifest's SHA-256. The output is written\n"
               "atomically (temporary file + rename).\n"
               "\n"
               "options:\n"
               "  --out FILE        the output file (required)\n"
               "  --dtype DTYPE     bf16 (default; round to nearest even) or fp32 (bit-exact)\n"
               "  -h, --help        this help\n");
}

static int cmd_export(int argc, char **argv) {
    static const struct option longopts[] = {{"out", required_argument, 0, 'o'},
                                             {"dtype", required_argument, 0, 'd'},
                                             {"help", no_argument, 0, 'h'},
                                             {0, 0, 0, 0}};
    const char *outp = NULL;
    sy_st_dtype dtype = SY_ST_BF16;
    int c, rc = 2;
    sy_store_t *st = NULL;
    sy_ckpt_step_info *steps = NULL;
    json_t *man = NULL;
    sy_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    sy_backend_t *be = NULL;
    sy_model_t *model = NULL;
    sy_tensor_ref *refs = NULL;
    float *host = NULL; /* the parameters, downloaded */
    size_t n = 0;
    char run[URL_MAX];
    int64_t want, step;
    optind = 1;
    while ((c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
        switch (c) {
        case 'o': outp = optarg; break;
        case 'd':
            if (!strcmp(optarg, "bf16")) dtype = SY_ST_BF16;
            else if (!strcmp(optarg, "fp32")) dtype = SY_ST_F32;
            else {
                fprintf(stderr, "switchyard ckpt export: --dtype %s: expected bf16 or fp32\n", optarg);
                goto out;
            }
            break;
        case 'h': export_usage(stdout); rc = 0; goto out;
        default: export_usage(stderr); goto out;
        }
    }
    if (optind != argc - 1 || !outp) {
        fprintf(stderr, "switchyard ckpt export: expected one STORE/RUN[@STEP] and --out FILE\n");
        export_usage(stderr);
        goto out;
    }
    rc = 1;
    /* before any work: a device, FIFO, folder or symlink at --out is never replaced */
    if (sy_fs_check_replaceable(outp) != SY_OK) goto fail;
    if (open_run(argv[optind], &st, run, &want, &steps, &n) != SY_OK) goto fail;
    if (want >= 0) {
        if (pick_step(run, steps, n, want, &step) != SY_OK) goto fail;
    } else if (sy_ckpt_latest(st, run, &step) != SY_OK) {
        goto fail;
    }
    if (sy_ckpt_read_manifest(st, run, step, &man) != SY_OK) goto fail;
    const json_t *jc = json_object_get(man, "config");
    if (!jc) {
        sy_err_set(SY_ECORRUPT, "manifest of step %lld of run %s has no config", (long long)step, run);
        goto fail;
    }
    if (sy_config_defaults(&cfg) != SY_OK || sy_config_from_json(&cfg, jc) != SY_OK ||
        sy_config_validate(&cfg) != SY_OK) {
        sy_err_prefix(SY_ECORRUPT, "manifest of step %lld of run %s: config", (long long)step, run);
        goto fail;
    }
    sy_model_dims dims = sy_model_dims_from_config(&cfg);
    dims.B = 1; /* only the parameter table is used: keep the activation buffers small */
    if (sy_backend_cpu_new(1, false, &be) != SY_OK || sy_model_new(&dims, be, &model) != SY_OK) goto fail;
    if (sy_model_ckpt_load(st, run, step, model, NULL, NULL) != SY_OK) goto fail;
    int np = sy_model_n_params(model);
    refs = calloc((size_t)np, sizeof *refs);
    if (!refs) {
        sy_err_set(SY_ENOMEM, "out of memory");
        goto fail;
    }
    host = malloc(sy_model_numel(model) * sizeof(float) + 1);
    if (!host) {
        sy_err_set(SY_ENOMEM, "out of memory");
        goto fail;
    }
    be->download(be, host, sy_model_params(model), sy_model_numel(model) * sizeof(float));
    for (int i = 0; i < np; i++) refs[i] = sy_model_ref(model, i, host, sy_model_param(model, i)->name);
    if (sy_st_write_file(outp, refs, np, dtype) != SY_OK) goto fail;
    printf("exported run %s step %lld: %d tensors, %zu parameters, %s -> %s\n", run, (long long)step, np,
           sy_model_numel(model), dtype == SY_ST_BF16 ? "bf16" : "fp32", outp);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "switchyard ckpt export: %s\n", sy_err_msg());
out:
    free(refs);
    free(host);
    sy_model_destroy(&model);
    sy_backend_destroy(&be);
    json_decref(man);
    sy_config_free(&cfg);
    free(steps);
    sy_store_destroy(&st);
    return rc;
}

/* ---------------------------------------------------------------- dispatch */

static void ckpt_usage(FILE *f) {
    fprintf(f, "usage: switchyard ckpt ls STORE/RUN\n"
               "       switchyard ckpt show STORE/RUN[@STEP]\n"
               "       switchyard ckpt export STORE/RUN[@STEP] --out FILE [--dtype bf16|fp32]\n"
               "\n"
               "STORE is checkpoint.store: a folder, file:///abs/path or s3://bucket/prefix;\n"
               "RUN is run.name. (switchyard ckpt COMMAND --help for each.)\n"
               "\n"
               "ls      committed checkpoints (step, files, size, created) and uncommitted debris\n"
               "show    one checkpoint's manifest, with every file's size and SHA-256 verified\n"
               "export  one safetensors file of the parameters (spec names) for inference/PyTorch\n");
}

int sy_ckpt_cli(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        ckpt_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    sy_log_set_role("ckpt");
    if (!strcmp(argv[1], "ls")) return cmd_ls(argc - 1, argv + 1);
    if (!strcmp(argv[1], "show")) return cmd_show(argc - 1, argv + 1);
    if (!strcmp(argv[1], "export")) return cmd_export(argc - 1, argv + 1);
    fprintf(stderr, "switchyard ckpt: unknown subcommand '%s' (ls, show, export)\n", argv[1]);
    return 2;
}
