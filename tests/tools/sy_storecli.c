/* sy_storecli: a small command line over the object store API (sy_store_*), for tests and
 * benchmarks.
 *
 *   sy_storecli [options] URL put FILE KEY          write FILE as KEY
 *   sy_storecli [options] URL put-if-absent FILE KEY (exit 3 if KEY exists)
 *   sy_storecli [options] URL get KEY OUT           read KEY into file OUT
 *   sy_storecli [options] URL range KEY OFFSET LEN OUT
 *   sy_storecli [options] URL head KEY              prints the size
 *   sy_storecli [options] URL ls [PREFIX]           prints keys, one a line
 *   sy_storecli [options] URL rm KEY
 *   sy_storecli [options] URL rm-prefix PREFIX
 *   sy_storecli [options] URL put-many PREFIX N     writes N small objects PREFIX%06d ("i\n")
 *   sy_storecli [options] URL ckpt-save RUN STEP NBYTES   a checkpoint of 2 groups, seeded by STEP
 *   sy_storecli [options] URL ckpt-latest RUN       prints the newest committed step
 *   sy_storecli [options] URL ckpt-load RUN STEP NBYTES   loads and checks against the seed
 *
 * Options (s3:// URLs): --endpoint URL --region R --addressing auto|path|virtual
 *   --multipart-mb N --part-mb N --parallel N --timeout-ms N --connect-timeout-ms N
 *   --attempts N --backoff-ms BASE --backoff-cap-ms CAP; --time prints "seconds MB/s" of the
 *   store call (put/get) on stdout.
 * Exit: 0 ok, 1 error (message on stderr), 2 usage, 3 exists, 4 not found. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "storage/ckpt.h"
#include "storage/store.h"
#include "storage/store_s3.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int read_file(const char *path, void **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "sy_storecli: %s: %s\n", path, strerror(errno));
        return -1;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *b = malloc(n > 0 ? (size_t)n : 1);
    if (!b || (n > 0 && fread(b, 1, (size_t)n, f) != (size_t)n)) {
        fprintf(stderr, "sy_storecli: reading %s failed\n", path);
        free(b);
        fclose(f);
        return -1;
    }
    fclose(f);
    *buf = b;
    *len = (size_t)n;
    return 0;
}

static int write_file(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f || (len && fwrite(buf, 1, len, f) != len) || fclose(f) != 0) {
        fprintf(stderr, "sy_storecli: writing %s failed\n", path);
        return -1;
    }
    return 0;
}

static int fail(sy_status st) {
    fprintf(stderr, "sy_storecli: %s: %s\n", sy_strerror(st), sy_err_msg());
    return st == SY_EEXIST ? 3 : st == SY_ENOTFOUND ? 4 : 1;
}

static void usage(void) {
    fprintf(stderr,
            "usage: sy_storecli [--endpoint URL] [--region R] [--addressing auto|path|virtual] [--multipart-mb N]\n"
            "         [--part-mb N] [--parallel N] [--timeout-ms N] [--connect-timeout-ms N] [--attempts N]\n"
            "         [--backoff-ms N] [--backoff-cap-ms N] [--time] URL COMMAND ARGS...\n"
            "commands: put FILE KEY | put-if-absent FILE KEY | get KEY OUT | range KEY OFF LEN OUT | head KEY |\n"
            "          ls [PREFIX] | rm KEY | rm-prefix PREFIX | put-many PREFIX N |\n"
            "          ckpt-save RUN STEP NBYTES | ckpt-latest RUN | ckpt-load RUN STEP NBYTES\n");
}

/* Checkpoint payload: two groups ("dense" with one tensor, "expert-0000" with one), floats
 * derived from step so a load can be checked independently. */
static float val(int64_t step, int g, size_t i) { return (float)((double)(step * 1000 + g) + 1e-3 * (double)(i % 997)); }

static int ckpt_groups(int64_t step, size_t nbytes, float **a, float **b, sy_tensor_ref *ta, sy_tensor_ref *tb,
                       sy_ckpt_group *g, char names[2][48]) {
    size_t n = nbytes / 8 ? nbytes / 8 : 1; /* half the bytes in each group */
    *a = malloc(n * sizeof(float));
    *b = malloc(n * sizeof(float));
    if (!*a || !*b) return -1;
    for (size_t i = 0; i < n; i++) {
        (*a)[i] = val(step, 0, i);
        (*b)[i] = val(step, 1, i);
    }
    memset(ta, 0, sizeof *ta);
    memset(tb, 0, sizeof *tb);
    ta->name = "w";
    ta->data = *a;
    ta->ndim = 1;
    ta->shape[0] = (int64_t)n;
    *tb = *ta;
    tb->data = *b;
    sy_ckpt_file_dense(names[0], 48, 0);
    sy_ckpt_file_expert(names[1], 48, 0, 0);
    g[0] = (sy_ckpt_group){.file = names[0], .tensors = ta, .n = 1};
    g[1] = (sy_ckpt_group){.file = names[1], .tensors = tb, .n = 1};
    return 0;
}

int main(int argc, char **argv) {
    sy_s3_options o;
    sy_s3_options_default(&o);
    int timed = 0;
    static const struct option longs[] = {{"endpoint", 1, 0, 'e'},     {"region", 1, 0, 'r'},
                                          {"addressing", 1, 0, 'a'},   {"multipart-mb", 1, 0, 'm'},
                                          {"part-mb", 1, 0, 'p'},      {"parallel", 1, 0, 'j'},
                                          {"timeout-ms", 1, 0, 't'},   {"connect-timeout-ms", 1, 0, 'c'},
                                          {"attempts", 1, 0, 'n'},     {"backoff-ms", 1, 0, 'b'},
                                          {"backoff-cap-ms", 1, 0, 'B'}, {"time", 0, 0, 'T'},
                                          {"help", 0, 0, 'h'},         {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "+", longs, NULL)) != -1) {
        switch (c) {
        case 'e': o.endpoint = optarg; break;
        case 'r': o.region = optarg; break;
        case 'a':
            o.addressing = !strcmp(optarg, "path") ? SY_S3_ADDR_PATH
                           : !strcmp(optarg, "virtual") ? SY_S3_ADDR_VIRTUAL
                                                        : SY_S3_ADDR_AUTO;
            break;
        case 'm': o.multipart_threshold = strtoull(optarg, NULL, 10) * 1024 * 1024; break;
        case 'p': o.part_size = strtoull(optarg, NULL, 10) * 1024 * 1024; break;
        case 'j': o.parallel = atoi(optarg); break;
        case 't': o.timeout_ms = atoi(optarg); break;
        case 'c': o.connect_timeout_ms = atoi(optarg); break;
        case 'n': o.max_attempts = atoi(optarg); break;
        case 'b': o.backoff_base_ms = atoi(optarg); break;
        case 'B': o.backoff_cap_ms = atoi(optarg); break;
        case 'T': timed = 1; break;
        case 'h': usage(); return 0;
        default: usage(); return 2;
        }
    }
    if (argc - optind < 2) {
        usage();
        return 2;
    }
    const char *url = argv[optind], *cmd = argv[optind + 1];
    char **a = argv + optind + 2;
    int na = argc - optind - 2;
    sy_store_t *s = NULL;
    sy_status st = !strncmp(url, "s3://", 5) ? sy_store_s3_open(url, &o, &s) : sy_store_open(url, &s);
    if (st != SY_OK) return fail(st);
    int rc = 0;
    void *buf = NULL;
    size_t len = 0;
    double t0 = now_s();
#define NEED(k)            \
    if (na != (k)) {       \
        usage();           \
        rc = 2;            \
        goto out;          \
    }
    if (!strcmp(cmd, "put") || !strcmp(cmd, "put-if-absent")) {
        NEED(2);
        if (read_file(a[0], &buf, &len)) {
            rc = 1;
            goto out;
        }
        t0 = now_s();
        st = cmd[3] ? sy_store_put_if_absent(s, a[1], buf, len) : sy_store_put(s, a[1], buf, len);
    } else if (!strcmp(cmd, "get")) {
        NEED(2);
        st = sy_store_get(s, a[0], &buf, &len);
        if (st == SY_OK) {
            double t1 = now_s();
            if (write_file(a[1], buf, len)) rc = 1;
            t0 += now_s() - t1; /* time the store call only */
        }
    } else if (!strcmp(cmd, "range")) {
        NEED(4);
        uint64_t off = strtoull(a[1], NULL, 10);
        len = (size_t)strtoull(a[2], NULL, 10);
        buf = malloc(len ? len : 1);
        st = buf ? sy_store_get_range(s, a[0], off, len, buf) : SY_ENOMEM;
        if (st == SY_OK && write_file(a[3], buf, len)) rc = 1;
    } else if (!strcmp(cmd, "head")) {
        NEED(1);
        uint64_t size = 0;
        st = sy_store_head(s, a[0], &size);
        if (st == SY_OK) printf("%" PRIu64 "\n", size);
    } else if (!strcmp(cmd, "ls")) {
        if (na > 1) {
            usage();
            rc = 2;
            goto out;
        }
        char **keys = NULL;
        size_t n = 0;
        st = sy_store_list(s, na ? a[0] : "", &keys, &n);
        for (size_t i = 0; st == SY_OK && i < n; i++) printf("%s\n", keys[i]);
        sy_store_keys_free(keys, n);
    } else if (!strcmp(cmd, "rm")) {
        NEED(1);
        st = sy_store_delete(s, a[0]);
    } else if (!strcmp(cmd, "rm-prefix")) {
        NEED(1);
        st = sy_store_delete_prefix(s, a[0]);
    } else if (!strcmp(cmd, "put-many")) {
        NEED(2);
        long n = atol(a[1]);
        for (long i = 0; i < n && st == SY_OK; i++) {
            char key[1024], body[32];
            snprintf(key, sizeof key, "%s%06ld", a[0], i);
            int bl = snprintf(body, sizeof body, "%ld\n", i);
            st = sy_store_put(s, key, body, (size_t)bl);
        }
    } else if (!strcmp(cmd, "ckpt-save") || !strcmp(cmd, "ckpt-load")) {
        NEED(3);
        int64_t step = strtoll(a[1], NULL, 10);
        size_t nbytes = (size_t)strtoull(a[2], NULL, 10);
        float *x = NULL, *y = NULL;
        sy_tensor_ref tx, ty;
        sy_ckpt_group g[2];
        char names[2][48];
        if (ckpt_groups(step, nbytes, &x, &y, &tx, &ty, g, names)) {
            st = sy_err_set(SY_ENOMEM, "ckpt payload");
        } else if (cmd[5] == 's') {
            st = sy_ckpt_save(s, a[0], step, g, 2, NULL);
        } else {
            size_t n = (size_t)tx.shape[0];
            memset(x, 0, n * sizeof(float));
            memset(y, 0, n * sizeof(float));
            st = sy_ckpt_load_group(s, a[0], step, &g[0]);
            if (st == SY_OK) st = sy_ckpt_load_group(s, a[0], step, &g[1]);
            for (size_t i = 0; st == SY_OK && i < n; i++)
                if (x[i] != val(step, 0, i) || y[i] != val(step, 1, i))
                    st = sy_err_set(SY_ECORRUPT, "ckpt-load: value %zu differs from the saved one", i);
            if (st == SY_OK) printf("loaded %zu floats\n", 2 * n);
        }
        free(x);
        free(y);
    } else if (!strcmp(cmd, "ckpt-latest")) {
        NEED(1);
        int64_t step = -1;
        st = sy_ckpt_latest(s, a[0], &step);
        if (st == SY_OK) printf("%" PRId64 "\n", step);
    } else {
        usage();
        rc = 2;
        goto out;
    }
    if (st != SY_OK) {
        rc = fail(st);
    } else if (timed) {
        double dt = now_s() - t0;
        printf("%.6f %.2f\n", dt, dt > 0 ? (double)len / 1e6 / dt : 0.0);
    }
out:
    free(buf);
    sy_store_destroy(&s);
    return rc;
}
