/* Local object store and checkpoints: store operations and key rules, scatter-gather put
 * (local and concatenating fallback), save → latest → load,
 * debris and corrupt-manifest handling, checksum failures, retention. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "storage/ckpt.h"
#include "base/safetensors.h"
#include "storage/store.h"

#define SY_TESTDIR_PREFIX "/tmp/sy-ckpt-test-"
#include "sy_test.h"

static sy_store_t *open_store(void) {
    char url[300];
    snprintf(url, sizeof url, "file://%s/store", tmpdir);
    sy_store_t *s = NULL;
    assert_int_equal(sy_store_open(url, &s), SY_OK);
    return s;
}

static int file_exists(const char *rel) {
    char p[600];
    struct stat sb;
    snprintf(p, sizeof p, "%s/store/%s", tmpdir, rel);
    return stat(p, &sb) == 0;
}

/* ---------------------------------------------------------------- store */

static void test_store_keys(void **state) {
    (void)state;
    const char *bad[] = {"", "/a", "a/../b", "..", ".", "a/./b", "a//b", "a/", "a b", "a\\b", "a#b", "ü", "a/..",
                         "../x", "a\nb"};
    const char *good[] = {"a", "a/b.c-d_e", "run/ckpt/step-000000001/MANIFEST.json", "...", ".hidden", "a/.b"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (sy_store_key_valid(bad[i])) fail_msg("key '%s' accepted", bad[i]);
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        if (!sy_store_key_valid(good[i])) fail_msg("key '%s' rejected", good[i]);
    sy_store_t *s = open_store();
    assert_int_equal(sy_store_put(s, "../escape", "x", 1), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "../escape"));
    assert_int_equal(sy_store_put(s, "/abs", "x", 1), SY_EINVAL);
    void *b;
    size_t l;
    assert_int_equal(sy_store_get(s, "a//b", &b, &l), SY_EINVAL);
    char **keys;
    size_t n;
    assert_int_equal(sy_store_list(s, "../", &keys, &n), SY_EINVAL);
    assert_int_equal(sy_store_delete_prefix(s, ""), SY_EINVAL);
    sy_store_destroy(&s);
    assert_null(s);
    sy_store_destroy(&s);
    /* without credentials an s3 store is refused with a message naming what is missing */
    unsetenv("AWS_ACCESS_KEY_ID");
    unsetenv("AWS_SECRET_ACCESS_KEY");
    assert_int_equal(sy_store_open("s3://bucket/prefix", &s), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "AWS_ACCESS_KEY_ID"));
    assert_null(s);
    assert_int_equal(sy_store_open("file://relative/x", &s), SY_EINVAL);
    assert_int_equal(sy_store_open("http://x/y", &s), SY_EINVAL);
    assert_int_equal(sy_store_open("", &s), SY_EINVAL);
}

static void test_store_ops(void **state) {
    (void)state;
    /* a plain path works too, and the folder is created */
    char root[300];
    snprintf(root, sizeof root, "%s/store/", tmpdir);
    sy_store_t *s = NULL;
    assert_int_equal(sy_store_open(root, &s), SY_OK);
    const char msg[] = "hello, object store";
    assert_int_equal(sy_store_put(s, "run/ckpt/step-1/x", msg, sizeof msg), SY_OK);
    assert_true(file_exists("run/ckpt/step-1/x"));
    void *b = NULL;
    size_t l = 0;
    assert_int_equal(sy_store_get(s, "run/ckpt/step-1/x", &b, &l), SY_OK);
    assert_int_equal(l, sizeof msg);
    assert_memory_equal(b, msg, sizeof msg);
    free(b);
    uint64_t size = 0;
    assert_int_equal(sy_store_head(s, "run/ckpt/step-1/x", &size), SY_OK);
    assert_int_equal(size, sizeof msg);
    char part[6];
    assert_int_equal(sy_store_get_range(s, "run/ckpt/step-1/x", 7, 6, part), SY_OK);
    assert_memory_equal(part, "object", 6);
    assert_int_equal(sy_store_get_range(s, "run/ckpt/step-1/x", sizeof msg - 2, 3, part), SY_EINVAL);
    assert_int_equal(sy_store_get_range(s, "run/ckpt/step-1/x", sizeof msg, 0, part), SY_OK);
    /* replace */
    assert_int_equal(sy_store_put(s, "run/ckpt/step-1/x", "new", 3), SY_OK);
    assert_int_equal(sy_store_get(s, "run/ckpt/step-1/x", &b, &l), SY_OK);
    assert_int_equal(l, 3);
    assert_memory_equal(b, "new", 3);
    free(b);
    /* empty object */
    assert_int_equal(sy_store_put(s, "empty", NULL, 0), SY_OK);
    assert_int_equal(sy_store_get(s, "empty", &b, &l), SY_OK);
    assert_int_equal(l, 0);
    free(b);
    /* missing */
    assert_int_equal(sy_store_get(s, "missing", &b, &l), SY_ENOTFOUND);
    assert_non_null(strstr(sy_err_msg(), "missing"));
    assert_int_equal(sy_store_head(s, "missing/deeper", &size), SY_ENOTFOUND);
    assert_int_equal(sy_store_head(s, "run/ckpt", &size), SY_ENOTFOUND); /* a folder is no object */
    /* put_if_absent */
    assert_int_equal(sy_store_put_if_absent(s, "run/ckpt/step-10/y", "first", 5), SY_OK);
    assert_int_equal(sy_store_put_if_absent(s, "run/ckpt/step-10/y", "second", 6), SY_EEXIST);
    assert_int_equal(sy_store_get(s, "run/ckpt/step-10/y", &b, &l), SY_OK);
    assert_int_equal(l, 5);
    assert_memory_equal(b, "first", 5);
    free(b);
    /* list: sorted, string-prefix semantics, temp-looking files hidden */
    assert_int_equal(sy_store_put(s, "run/other", "o", 1), SY_OK);
    assert_int_equal(sy_store_put(s, "run2/z", "z", 1), SY_OK);
    assert_int_equal(sy_store_put(s, "run/ckpt/step-1/a", "a", 1), SY_OK);
    char junk[600];
    snprintf(junk, sizeof junk, "%s/store/run/.x#tmp.1.2", tmpdir);
    FILE *fp = fopen(junk, "w");
    fclose(fp);
    char **keys = NULL;
    size_t n = 0;
    assert_int_equal(sy_store_list(s, "run/", &keys, &n), SY_OK);
    const char *want1[] = {"run/ckpt/step-1/a", "run/ckpt/step-1/x", "run/ckpt/step-10/y", "run/other"};
    assert_int_equal(n, 4);
    for (size_t i = 0; i < n; i++) assert_string_equal(keys[i], want1[i]);
    sy_store_keys_free(keys, n);
    assert_int_equal(sy_store_list(s, "run/ckpt/step-1", &keys, &n), SY_OK);
    assert_int_equal(n, 3);
    assert_string_equal(keys[2], "run/ckpt/step-10/y");
    sy_store_keys_free(keys, n);
    assert_int_equal(sy_store_list(s, "run", &keys, &n), SY_OK);
    assert_int_equal(n, 5);
    assert_string_equal(keys[4], "run2/z");
    sy_store_keys_free(keys, n);
    assert_int_equal(sy_store_list(s, "", &keys, &n), SY_OK);
    assert_int_equal(n, 6);
    assert_string_equal(keys[0], "empty");
    sy_store_keys_free(keys, n);
    assert_int_equal(sy_store_list(s, "nothing/", &keys, &n), SY_OK);
    assert_int_equal(n, 0);
    assert_null(keys);
    /* delete */
    assert_int_equal(sy_store_delete(s, "run/other"), SY_OK);
    assert_int_equal(sy_store_delete(s, "run/other"), SY_OK); /* missing is fine */
    assert_int_equal(sy_store_head(s, "run/other", &size), SY_ENOTFOUND);
    assert_int_equal(sy_store_delete_prefix(s, "run/ckpt/step-1/"), SY_OK);
    assert_int_equal(sy_store_list(s, "run/", &keys, &n), SY_OK);
    assert_int_equal(n, 1);
    assert_string_equal(keys[0], "run/ckpt/step-10/y");
    sy_store_keys_free(keys, n);
    assert_false(file_exists("run/ckpt/step-1")); /* emptied folders go away */
    assert_true(file_exists("run/ckpt/step-10/y"));
    sy_store_destroy(&s);
}

/* Several processes race put_if_absent on one key: exactly one wins, its bytes stay. */
static void test_store_put_if_absent_race(void **state) {
    (void)state;
    enum { NPROC = 6 };
    sy_store_t *s = open_store();
    pid_t pids[NPROC];
    for (int i = 0; i < NPROC; i++) {
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0) {
            char body[64];
            int len = snprintf(body, sizeof body, "writer %d", i);
            sy_status st = sy_store_put_if_absent(s, "race/commit", body, (size_t)len);
            _exit(st == SY_OK ? 10 + i : st == SY_EEXIST ? 1 : 2);
        }
    }
    int winner = -1, losers = 0;
    for (int i = 0; i < NPROC; i++) {
        int ws;
        assert_int_equal(waitpid(pids[i], &ws, 0), pids[i]);
        assert_true(WIFEXITED(ws));
        int c = WEXITSTATUS(ws);
        if (c >= 10) {
            assert_int_equal(winner, -1);
            winner = c - 10;
        } else {
            assert_int_equal(c, 1);
            losers++;
        }
    }
    assert_true(winner >= 0);
    assert_int_equal(losers, NPROC - 1);
    void *b;
    size_t l;
    char want[64];
    snprintf(want, sizeof want, "writer %d", winner);
    assert_int_equal(sy_store_get(s, "race/commit", &b, &l), SY_OK);
    assert_int_equal(l, strlen(want));
    assert_memory_equal(b, want, l);
    free(b);
    char **keys;
    size_t n;
    assert_int_equal(sy_store_list(s, "", &keys, &n), SY_OK);
    assert_int_equal(n, 1); /* no temp debris visible */
    sy_store_keys_free(keys, n);
    /* and no temp files left on disk either */
    char dir[600];
    snprintf(dir, sizeof dir, "%s/store/race", tmpdir);
    int count = 0;
    FILE *p;
    char cmd[700];
    snprintf(cmd, sizeof cmd, "ls -A %s", dir);
    p = popen(cmd, "r");
    char line[256];
    while (fgets(line, sizeof line, p)) count++;
    pclose(p);
    assert_int_equal(count, 1);
    sy_store_destroy(&s);
}

/* ---------------------------------------------------------------- checkpoints */

enum { E = 3, L = 2, D = 4, F = 6 };

/* A toy model state: dense params, expert params per (layer, expert), and both moments. */
typedef struct {
    float embed[8 * D], norm[D];
    float fc[L][E][D * F], proj[L][E][F * D];
    float m_embed[8 * D], v_embed[8 * D], m_norm[D], v_norm[D];
    float m_fc[L][E][D * F], v_fc[L][E][D * F];
    char names[L * E * 6][64];
    sy_tensor_ref dense[2], dense_opt[4], expert[E][2 * L], expert_opt[E][4 * L];
    sy_ckpt_group groups[2 + 2 * E];
    char files[2 + 2 * E][40];
} toy;

static void fill_seeded(float *p, size_t n, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        p[i] = (float)((int)(x >> 8) - (1 << 23)) / (float)(1 << 20);
    }
}

static void toy_init(toy *t, uint32_t seed) {
    memset(t, 0, sizeof *t);
    if (seed) {
        fill_seeded(t->embed, 8 * D, seed + 1);
        fill_seeded(t->norm, D, seed + 2);
        fill_seeded(&t->fc[0][0][0], sizeof t->fc / 4, seed + 3);
        fill_seeded(&t->proj[0][0][0], sizeof t->proj / 4, seed + 4);
        fill_seeded(t->m_embed, 8 * D, seed + 5);
        fill_seeded(t->v_embed, 8 * D, seed + 6);
        fill_seeded(t->m_norm, D, seed + 7);
        fill_seeded(t->v_norm, D, seed + 8);
        fill_seeded(&t->m_fc[0][0][0], sizeof t->m_fc / 4, seed + 9);
        fill_seeded(&t->v_fc[0][0][0], sizeof t->v_fc / 4, seed + 10);
    }
    t->dense[0] = (sy_tensor_ref){"embed.weight", 2, {8, D}, t->embed};
    t->dense[1] = (sy_tensor_ref){"norm.weight", 1, {D}, t->norm};
    t->dense_opt[0] = (sy_tensor_ref){"m.embed.weight", 2, {8, D}, t->m_embed};
    t->dense_opt[1] = (sy_tensor_ref){"v.embed.weight", 2, {8, D}, t->v_embed};
    t->dense_opt[2] = (sy_tensor_ref){"m.norm.weight", 1, {D}, t->m_norm};
    t->dense_opt[3] = (sy_tensor_ref){"v.norm.weight", 1, {D}, t->v_norm};
    int k = 0;
    for (int e = 0; e < E; e++)
        for (int l = 0; l < L; l++) {
            char *fc = t->names[k++], *pr = t->names[k++], *mf = t->names[k++], *vf = t->names[k++];
            k += 2;
            char base[48];
            snprintf(base, sizeof base, "blocks.%d.moe.experts.%d", 2 * l + 1, e);
            snprintf(fc, 64, "%s.fc.weight", base);
            snprintf(pr, 64, "%s.proj.weight", base);
            snprintf(mf, 64, "m.%s.fc.weight", base);
            snprintf(vf, 64, "v.%s.fc.weight", base);
            t->expert[e][2 * l] = (sy_tensor_ref){fc, 2, {F, D}, t->fc[l][e]};
            t->expert[e][2 * l + 1] = (sy_tensor_ref){pr, 2, {D, F}, t->proj[l][e]};
            t->expert_opt[e][2 * l] = (sy_tensor_ref){mf, 2, {F, D}, t->m_fc[l][e]};
            t->expert_opt[e][2 * l + 1] = (sy_tensor_ref){vf, 2, {F, D}, t->v_fc[l][e]};
        }
    t->groups[0] = (sy_ckpt_group){sy_ckpt_file_dense(t->files[0], 40, 0), t->dense, 2};
    t->groups[1] = (sy_ckpt_group){sy_ckpt_file_dense(t->files[1], 40, 1), t->dense_opt, 4};
    for (int e = 0; e < E; e++) {
        t->groups[2 + 2 * e] = (sy_ckpt_group){sy_ckpt_file_expert(t->files[2 + 2 * e], 40, e, 0), t->expert[e], 2 * L};
        /* only the fc moments are tracked in the toy: enough to check m./v. naming */
        t->groups[3 + 2 * e] = (sy_ckpt_group){sy_ckpt_file_expert(t->files[3 + 2 * e], 40, e, 1), t->expert_opt[e], 2 * L};
    }
}

static void save_toy(sy_store_t *s, const char *run, int64_t step, uint32_t seed) {
    toy *t = malloc(sizeof *t);
    toy_init(t, seed);
    json_t *extra = json_pack("{s:I,s:{s:i},s:s}", "optimizer_steps", (json_int_t)step, "data", "position", 1234,
                              "rng", "abcd");
    sy_status st = sy_ckpt_save(s, run, step, t->groups, 2 + 2 * E, extra);
    if (st != SY_OK) fail_msg("save step %lld: %s", (long long)step, sy_err_msg());
    json_decref(extra);
    free(t);
}

static void corrupt_byte(const char *rel, long from_end) {
    char p[600];
    snprintf(p, sizeof p, "%s/store/%s", tmpdir, rel);
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    off_t end = lseek(fd, 0, SEEK_END);
    unsigned char c;
    assert_int_equal(pread(fd, &c, 1, end - from_end), 1);
    c ^= 0x01;
    assert_int_equal(pwrite(fd, &c, 1, end - from_end), 1);
    close(fd);
}

static void write_raw(const char *rel, const char *text) {
    char p[600];
    snprintf(p, sizeof p, "%s/store/%s", tmpdir, rel);
    FILE *fp = fopen(p, "w");
    assert_non_null(fp);
    fputs(text, fp);
    fclose(fp);
}

/* ---------------------------------------------------------------- scatter-gather put */

/* A backend with no native putv (like S3): forwards to a local store, so sy_store_putv takes the
 * front end's concatenating path. */
static sy_status fw_put(void *impl, const char *key, const void *buf, size_t len, int if_absent) {
    return if_absent ? sy_store_put_if_absent(impl, key, buf, len) : sy_store_put(impl, key, buf, len);
}
static sy_status fw_get(void *impl, const char *key, void **buf, size_t *len) { return sy_store_get(impl, key, buf, len); }
static sy_status fw_get_range(void *impl, const char *key, uint64_t off, size_t len, void *buf) {
    return sy_store_get_range(impl, key, off, len, buf);
}
static sy_status fw_head(void *impl, const char *key, uint64_t *size) { return sy_store_head(impl, key, size); }
static sy_status fw_list(void *impl, const char *prefix, char ***keys, size_t *n) {
    return sy_store_list(impl, prefix, keys, n);
}
static sy_status fw_del(void *impl, const char *key) { return sy_store_delete(impl, key); }
static void fw_destroy(void *impl) {
    sy_store_t *s = impl;
    sy_store_destroy(&s);
}
static const sy_store_ops fw_ops = {.put = fw_put, .get = fw_get, .get_range = fw_get_range, .head = fw_head,
                                    .list = fw_list, .del = fw_del, .destroy = fw_destroy};

static sy_store_t *open_no_putv_store(void) {
    sy_store_t *inner = open_store(), *s = NULL;
    assert_int_equal(sy_store_wrap(&fw_ops, inner, "fw://test", &s), SY_OK);
    return s;
}

/* Records what the tap saw; fails with SY_EABORTED on call number fail_at (0: never). */
typedef struct {
    unsigned char *buf;
    size_t len, cap, max_chunk;
    int calls, fail_at;
} tap_rec;

static sy_status rec_tap(void *arg, const void *p, size_t n) {
    tap_rec *r = arg;
    if (++r->calls == r->fail_at) return sy_err_set(SY_EABORTED, "tap refused chunk %d", r->calls);
    assert_true(r->len + n <= r->cap);
    memcpy(r->buf + r->len, p, n);
    r->len += n;
    if (n > r->max_chunk) r->max_chunk = n;
    return SY_OK;
}

/* Entries of folder `rel` of the store whose name has '#' (put's temp files). */
static int temp_files_in(const char *rel) {
    char p[600];
    snprintf(p, sizeof p, "%s/store/%s", tmpdir, rel);
    DIR *d = opendir(p);
    if (!d) return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (strchr(de->d_name, '#')) n++;
    closedir(d);
    return n;
}

/* Parts that cross every batching boundary of the local writer: a 3-byte head, an empty part,
 * parts longer than a tap chunk, more tiny parts than one writev takes, and more than one
 * writeback step in all. *want gets their concatenation. */
enum { PV_TINY = 150 };
typedef struct {
    unsigned char head[3], tiny[PV_TINY][5];
    float big1[(3 * (256 << 10) + 20) / 4], big2[(9 << 20) / 4];
} pv_data;

static size_t make_parts(pv_data *d, sy_store_part *parts, unsigned char **want, uint32_t seed) {
    fill_seeded(d->big1, sizeof d->big1 / 4, seed);
    fill_seeded(d->big2, sizeof d->big2 / 4, seed + 1);
    for (int i = 0; i < 3; i++) d->head[i] = (unsigned char)(seed + (uint32_t)i);
    for (int i = 0; i < PV_TINY; i++)
        for (int k = 0; k < 5; k++) d->tiny[i][k] = (unsigned char)(seed * 31u + (uint32_t)(i * 5 + k));
    size_t n = 0;
    parts[n++] = (sy_store_part){d->head, 3};
    parts[n++] = (sy_store_part){NULL, 0};
    parts[n++] = (sy_store_part){d->big1, sizeof d->big1};
    for (int i = 0; i < PV_TINY; i++) parts[n++] = (sy_store_part){d->tiny[i], 5};
    parts[n++] = (sy_store_part){d->big2, sizeof d->big2};
    parts[n++] = (sy_store_part){d->head, 1};
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += parts[i].len;
    *want = malloc(total);
    for (size_t i = 0, off = 0; i < n; off += parts[i].len, i++)
        if (parts[i].len) memcpy(*want + off, parts[i].base, parts[i].len);
    return n;
}

static size_t parts_total(const sy_store_part *parts, size_t n) {
    size_t t = 0;
    for (size_t i = 0; i < n; i++) t += parts[i].len;
    return t;
}

static void check_object(sy_store_t *s, const char *key, const unsigned char *want, size_t len) {
    void *b = NULL;
    size_t l = 0;
    assert_int_equal(sy_store_get(s, key, &b, &l), SY_OK);
    assert_int_equal(l, len);
    assert_memory_equal(b, want, len);
    free(b);
}

/* putv on one store: bytes, tap, replace, put-if-absent, and errors that leave no object. */
static void putv_checks(sy_store_t *s, const char *dir) {
    sy_store_part parts[PV_TINY + 8], parts2[PV_TINY + 8];
    unsigned char *want = NULL, *want2 = NULL;
    pv_data *d1 = malloc(sizeof *d1), *d2 = malloc(sizeof *d2);
    size_t n = make_parts(d1, parts, &want, 11), total = parts_total(parts, n);
    char key[64], once[64], aborted[64];
    snprintf(key, sizeof key, "%s/obj", dir);
    snprintf(once, sizeof once, "%s/once", dir);
    snprintf(aborted, sizeof aborted, "%s/aborted", dir);

    tap_rec r = {.buf = malloc(total), .cap = total};
    sy_store_tap tap = {rec_tap, &r};
    assert_int_equal(sy_store_putv(s, key, parts, n, 0, &tap), SY_OK);
    check_object(s, key, want, total);
    assert_int_equal(r.len, total); /* the tap saw every byte, in order, in bounded chunks */
    assert_memory_equal(r.buf, want, total);
    assert_true(r.max_chunk <= SY_STORE_TAP_CHUNK);
    assert_true(r.calls > 1);
    /* without a tap; replacing */
    size_t n2 = make_parts(d2, parts2, &want2, 12), total2 = parts_total(parts2, n2);
    assert_int_equal(sy_store_putv(s, key, parts2, n2, 0, NULL), SY_OK);
    check_object(s, key, want2, total2);
    /* no parts: an empty object */
    assert_int_equal(sy_store_putv(s, once, NULL, 0, 0, NULL), SY_OK);
    check_object(s, once, want, 0);
    assert_int_equal(sy_store_delete(s, once), SY_OK);
    /* put-if-absent: the first wins, the second stores nothing */
    assert_int_equal(sy_store_putv(s, once, parts, n, 1, NULL), SY_OK);
    assert_int_equal(sy_store_putv(s, once, parts2, n2, 1, NULL), SY_EEXIST);
    assert_non_null(strstr(sy_err_msg(), once));
    check_object(s, once, want, total);
    assert_int_equal(sy_store_put_if_absent(s, once, "x", 1), SY_EEXIST);

    /* errors: named, and no object (nor temp file) left */
    assert_int_equal(sy_store_putv(s, "../escape", parts, n, 0, NULL), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "../escape"));
    sy_store_part holed[2] = {{"ab", 2}, {NULL, 4}};
    assert_int_equal(sy_store_putv(s, aborted, holed, 2, 0, NULL), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "part 1"));
    assert_int_equal(sy_store_head(s, aborted, NULL), SY_ENOTFOUND);
    tap_rec r2 = {.buf = malloc(total), .cap = total, .fail_at = 3};
    tap.arg = &r2;
    assert_int_equal(sy_store_putv(s, aborted, parts, n, 0, &tap), SY_EABORTED);
    assert_non_null(strstr(sy_err_msg(), "tap refused chunk 3"));
    assert_non_null(strstr(sy_err_msg(), aborted));
    assert_int_equal(sy_store_head(s, aborted, NULL), SY_ENOTFOUND);
    r2.calls = 0, r2.len = 0;
    assert_int_equal(sy_store_putv(s, once, parts2, n2, 1, &tap), SY_EABORTED); /* if-absent: same */
    check_object(s, once, want, total);
    assert_int_equal(temp_files_in(dir), 0);
    /* a folder that cannot be made: an object lies where the folder should be */
    char blocked[80];
    snprintf(blocked, sizeof blocked, "%s/obj/deeper", dir);
    assert_int_equal(sy_store_putv(s, blocked, parts, n, 0, NULL), SY_EIO);
    assert_non_null(strstr(sy_err_msg(), dir));
    assert_int_equal(sy_store_head(s, blocked, NULL), SY_ENOTFOUND);
    check_object(s, key, want2, total2);
    assert_int_equal(temp_files_in(dir), 0);
    free(r.buf);
    free(r2.buf);
    free(want);
    free(want2);
    free(d1);
    free(d2);
}

static void test_store_putv(void **state) {
    (void)state;
    sy_store_t *s = open_store();
    putv_checks(s, "pv");
    /* an unwritable folder (permissions do not bind root, so only as another user) */
    if (geteuid() != 0) {
        char p[600];
        assert_int_equal(sy_store_put(s, "ro/x", "x", 1), SY_OK);
        snprintf(p, sizeof p, "%s/store/ro", tmpdir);
        assert_int_equal(chmod(p, 0555), 0);
        sy_store_part one = {"data", 4};
        assert_int_equal(sy_store_putv(s, "ro/y", &one, 1, 0, NULL), SY_EIO);
        assert_non_null(strstr(sy_err_msg(), "ro/y"));
        assert_int_equal(chmod(p, 0755), 0);
        assert_int_equal(sy_store_head(s, "ro/y", NULL), SY_ENOTFOUND);
    }
    sy_store_destroy(&s);
    /* the same contract through a backend without a native putv */
    s = open_no_putv_store();
    putv_checks(s, "fw");
    sy_store_destroy(&s);
}

/* Every object sy_ckpt_write_part stores (header + tensors sent from their own buffers) is
 * byte-identical to sy_st_serialize's file, and its listed size and sha256 are those of the
 * object read back; also through a store without native putv, and with tensors longer than a
 * tap chunk, empty and scalar ones. */
static void write_part_checks(sy_store_t *s, const char *run) {
    toy *t = malloc(sizeof *t);
    toy_init(t, 5);
    static float big[(1 << 20) + 3], scalar = 2.5f, none[1];
    fill_seeded(big, sizeof big / 4, 77);
    sy_tensor_ref extra_t[4] = {{"big", 2, {(1 << 20) + 3, 1}, big},
                                {"empty", 2, {0, 7}, none},
                                {"scalar", 0, {0}, &scalar},
                                {"tail", 1, {3}, big + 5}};
    sy_ckpt_group groups[3 + 2 * E];
    memcpy(groups, t->groups, sizeof t->groups);
    groups[2 + 2 * E] = (sy_ckpt_group){"extra.safetensors", extra_t, 4};
    int ng = 3 + 2 * E;
    json_t *files = NULL;
    assert_int_equal(sy_ckpt_write_part(s, run, 7, groups, ng, &files), SY_OK);
    assert_int_equal(json_array_size(files), ng);
    for (int i = 0; i < ng; i++) {
        json_t *e = json_array_get(files, (size_t)i);
        assert_string_equal(json_string_value(json_object_get(e, "name")), groups[i].file);
        char key[200];
        assert_int_equal(sy_ckpt_key(key, sizeof key, run, 7, groups[i].file), SY_OK);
        void *got = NULL, *ref = NULL;
        size_t gl = 0, rl = 0;
        assert_int_equal(sy_store_get(s, key, &got, &gl), SY_OK);
        assert_int_equal(sy_st_serialize(groups[i].tensors, groups[i].n, SY_ST_F32, &ref, &rl), SY_OK);
        assert_int_equal(gl, rl);
        assert_memory_equal(got, ref, rl);
        assert_int_equal(json_integer_value(json_object_get(e, "size")), gl);
        unsigned char md[32];
        SHA256(got, gl, md);
        char hex[65];
        for (int k = 0; k < 32; k++) snprintf(hex + 2 * k, 3, "%02x", md[k]);
        assert_string_equal(hex, json_string_value(json_object_get(e, "sha256")));
        free(got);
        free(ref);
    }
    /* the files commit, and the checkpoint loads and verifies */
    assert_int_equal(sy_ckpt_commit(s, run, 7, files, NULL), SY_OK);
    json_t *m = NULL;
    assert_int_equal(sy_ckpt_read_manifest(s, run, 7, &m), SY_OK);
    assert_int_equal(sy_ckpt_verify_file(s, m, "extra.safetensors"), SY_OK);
    json_decref(m);
    json_decref(files);
    free(t);
}

static void test_ckpt_write_part_bytes(void **state) {
    (void)state;
    sy_store_t *s = open_store();
    write_part_checks(s, "pv");
    /* a step folder that cannot be made: an object is in its place; named error, no files */
    toy *t = malloc(sizeof *t);
    toy_init(t, 3);
    assert_int_equal(sy_store_put(s, "pv/ckpt/step-000000009", "x", 1), SY_OK);
    json_t *files = NULL;
    assert_int_equal(sy_ckpt_write_part(s, "pv", 9, t->groups, 2 + 2 * E, &files), SY_EIO);
    assert_null(files);
    assert_non_null(strstr(sy_err_msg(), "pv/ckpt/step-000000009/"));
    char **keys = NULL;
    size_t n = 0;
    assert_int_equal(sy_store_list(s, "pv/ckpt/step-000000009/", &keys, &n), SY_OK);
    assert_int_equal(n, 0);
    free(t);
    sy_store_destroy(&s);
    s = open_no_putv_store();
    write_part_checks(s, "fw");
    sy_store_destroy(&s);
}

static void test_ckpt_roundtrip(void **state) {
    (void)state;
    sy_store_t *s = open_store();
    int64_t step = -1;
    assert_int_equal(sy_ckpt_latest(s, "r1", &step), SY_ENOTFOUND);
    save_toy(s, "r1", 100, 7);
    save_toy(s, "r1", 200, 8);
    /* layout */
    const char *files[] = {"dense.safetensors", "dense.optim.safetensors", "expert-0000.safetensors",
                           "expert-0002.optim.safetensors", "MANIFEST.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char rel[200];
        snprintf(rel, sizeof rel, "r1/ckpt/step-000000200/%s", files[i]);
        if (!file_exists(rel)) fail_msg("missing %s", rel);
    }
    assert_int_equal(sy_ckpt_latest(s, "r1", &step), SY_OK);
    assert_int_equal(step, 200);
    /* saving a committed step again is refused and changes nothing */
    toy *t = malloc(sizeof *t);
    toy_init(t, 99);
    assert_int_equal(sy_ckpt_save(s, "r1", 200, t->groups, 2 + 2 * E, NULL), SY_EEXIST);
    json_t *bad = json_pack("{s:i}", "step", 5);
    assert_int_equal(sy_ckpt_save(s, "r1", 300, t->groups, 2 + 2 * E, bad), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "step"));
    json_decref(bad);
    /* manifest content */
    json_t *m = NULL;
    assert_int_equal(sy_ckpt_read_manifest(s, "r1", 200, &m), SY_OK);
    assert_string_equal(json_string_value(json_object_get(m, "format")), "switchyard-ckpt");
    assert_int_equal(json_integer_value(json_object_get(m, "version")), 1);
    assert_string_equal(json_string_value(json_object_get(m, "run")), "r1");
    assert_int_equal(json_integer_value(json_object_get(m, "step")), 200);
    assert_int_equal(json_integer_value(json_object_get(m, "optimizer_steps")), 200);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(m, "data"), "position")), 1234);
    assert_true(json_is_string(json_object_get(m, "created")));
    json_t *fl = json_object_get(m, "files");
    assert_int_equal(json_array_size(fl), 2 + 2 * E);
    for (size_t i = 0; i < json_array_size(fl); i++) {
        json_t *e = json_array_get(fl, i);
        char rel[200], p[700];
        snprintf(rel, sizeof rel, "r1/ckpt/step-000000200/%s", json_string_value(json_object_get(e, "name")));
        snprintf(p, sizeof p, "%s/store/%s", tmpdir, rel);
        FILE *fp = fopen(p, "rb");
        assert_non_null(fp);
        static unsigned char data[1 << 16];
        size_t len = fread(data, 1, sizeof data, fp);
        fclose(fp);
        assert_int_equal(len, json_integer_value(json_object_get(e, "size")));
        unsigned char md[32];
        SHA256(data, len, md);
        char hex[65];
        for (int k = 0; k < 32; k++) snprintf(hex + 2 * k, 3, "%02x", md[k]);
        assert_string_equal(hex, json_string_value(json_object_get(e, "sha256")));
        /* every file is a valid safetensors file with F32 tensors */
        sy_st_file_t *f = NULL;
        assert_int_equal(sy_st_read_file(p, &f), SY_OK);
        assert_string_equal(sy_st_dtype_name(f, 0), "F32");
        sy_st_destroy(&f);
    }
    /* partial restore: dense + expert 1 only, via one manifest read */
    toy *want = malloc(sizeof *want), *got = malloc(sizeof *got);
    toy_init(want, 8);
    toy_init(got, 0);
    assert_int_equal(sy_ckpt_load_group_m(s, m, &got->groups[0]), SY_OK);
    assert_int_equal(sy_ckpt_load_group_m(s, m, &got->groups[1]), SY_OK);
    assert_int_equal(sy_ckpt_load_group(s, "r1", 200, &got->groups[2 + 2 * 1]), SY_OK);
    assert_int_equal(sy_ckpt_load_group(s, "r1", 200, &got->groups[3 + 2 * 1]), SY_OK);
    assert_memory_equal(got->embed, want->embed, sizeof got->embed);
    assert_memory_equal(got->norm, want->norm, sizeof got->norm);
    assert_memory_equal(got->v_norm, want->v_norm, sizeof got->v_norm);
    assert_memory_equal(got->m_embed, want->m_embed, sizeof got->m_embed);
    for (int l = 0; l < L; l++) {
        assert_memory_equal(got->fc[l][1], want->fc[l][1], sizeof got->fc[l][1]);
        assert_memory_equal(got->proj[l][1], want->proj[l][1], sizeof got->proj[l][1]);
        assert_memory_equal(got->v_fc[l][1], want->v_fc[l][1], sizeof got->v_fc[l][1]);
        for (int e = 0; e < E; e += 2) /* experts not loaded stay zero */
            for (int k = 0; k < D * F; k++) assert_true(got->fc[l][e][k] == 0.0f);
    }
    /* step 100 holds the other values */
    toy *old = malloc(sizeof *old);
    toy_init(old, 7);
    assert_int_equal(sy_ckpt_load_group(s, "r1", 100, &got->groups[0]), SY_OK);
    assert_memory_equal(got->embed, old->embed, sizeof got->embed);
    /* a file the manifest lacks; a shape mismatch */
    sy_ckpt_group g = {"expert-0009.safetensors", got->expert[0], 1};
    assert_int_equal(sy_ckpt_load_group_m(s, m, &g), SY_ENOTFOUND);
    sy_tensor_ref wrong = {"norm.weight", 1, {D + 1}, got->embed};
    g = (sy_ckpt_group){"dense.safetensors", &wrong, 1};
    assert_int_equal(sy_ckpt_load_group_m(s, m, &g), SY_EFORMAT);
    assert_non_null(strstr(sy_err_msg(), "norm.weight"));
    assert_int_equal(sy_ckpt_read_manifest(s, "r1", 150, &bad), SY_ENOTFOUND);
    json_decref(m);
    free(t);
    free(want);
    free(got);
    free(old);
    sy_store_destroy(&s);
}

static void test_ckpt_debris_and_corruption(void **state) {
    (void)state;
    sy_store_t *s = open_store();
    save_toy(s, "r2", 100, 1);
    save_toy(s, "r2", 200, 2);
    int64_t step = -1;
    /* debris of an unfinished save: a newer step folder without a manifest */
    assert_int_equal(sy_store_put(s, "r2/ckpt/step-000000300/dense.safetensors", "partial", 7), SY_OK);
    assert_int_equal(sy_ckpt_latest(s, "r2", &step), SY_OK);
    assert_int_equal(step, 200);
    assert_int_equal(sy_ckpt_read_manifest(s, "r2", 300, &(json_t *){NULL}), SY_ENOTFOUND);
    /* a flipped byte in a tensor file: size ok, checksum not */
    toy *got = malloc(sizeof *got);
    toy_init(got, 0);
    corrupt_byte("r2/ckpt/step-000000200/expert-0001.safetensors", 5);
    assert_int_equal(sy_ckpt_load_group(s, "r2", 200, &got->groups[2 + 2 * 1]), SY_ECORRUPT);
    assert_non_null(strstr(sy_err_msg(), "r2/ckpt/step-000000200/expert-0001.safetensors"));
    assert_non_null(strstr(sy_err_msg(), "sha256"));
    /* other files of the checkpoint still load */
    assert_int_equal(sy_ckpt_load_group(s, "r2", 200, &got->groups[2]), SY_OK);
    /* a truncated file: size mismatch, and latest skips the checkpoint */
    char p[600];
    snprintf(p, sizeof p, "%s/store/r2/ckpt/step-000000200/dense.safetensors", tmpdir);
    assert_int_equal(truncate(p, 16), 0);
    assert_int_equal(sy_ckpt_load_group(s, "r2", 200, &got->groups[0]), SY_ECORRUPT);
    assert_non_null(strstr(sy_err_msg(), "dense.safetensors"));
    assert_int_equal(sy_ckpt_latest(s, "r2", &step), SY_OK);
    assert_int_equal(step, 100);
    /* a corrupt newest manifest: falls back to the previous one */
    save_toy(s, "r2", 400, 4);
    assert_int_equal(sy_ckpt_latest(s, "r2", &step), SY_OK);
    assert_int_equal(step, 400);
    write_raw("r2/ckpt/step-000000400/MANIFEST.json", "{\"format\": \"switchyard-ckpt\", \"vers");
    assert_int_equal(sy_ckpt_read_manifest(s, "r2", 400, &(json_t *){NULL}), SY_ECORRUPT);
    assert_int_equal(sy_ckpt_latest(s, "r2", &step), SY_OK);
    assert_int_equal(step, 100);
    /* a manifest for another step (copied into the wrong folder) is not trusted either */
    save_toy(s, "r2", 500, 5);
    void *b;
    size_t l;
    assert_int_equal(sy_store_get(s, "r2/ckpt/step-000000100/MANIFEST.json", &b, &l), SY_OK);
    assert_int_equal(sy_store_delete(s, "r2/ckpt/step-000000500/MANIFEST.json"), SY_OK);
    assert_int_equal(sy_store_put(s, "r2/ckpt/step-000000500/MANIFEST.json", b, l), SY_OK);
    free(b);
    assert_int_equal(sy_ckpt_latest(s, "r2", &step), SY_OK);
    assert_int_equal(step, 100);
    /* when every committed checkpoint is broken, that is an error, not "start fresh" */
    corrupt_byte("r2/ckpt/step-000000100/MANIFEST.json", 3);
    write_raw("r2/ckpt/step-000000100/MANIFEST.json", "not json");
    assert_int_equal(sy_ckpt_latest(s, "r2", &step), SY_ECORRUPT);
    assert_int_equal(sy_ckpt_latest(s, "other-run", &step), SY_ENOTFOUND);
    free(got);
    sy_store_destroy(&s);
}

static void test_ckpt_retain(void **state) {
    (void)state;
    sy_store_t *s = open_store();
    for (int64_t k = 1; k <= 5; k++) save_toy(s, "r3", k * 10, (uint32_t)k);
    save_toy(s, "r3b", 10, 1); /* another run is untouched */
    assert_int_equal(sy_store_put(s, "r3/ckpt/step-000000025/dense.safetensors", "x", 1), SY_OK); /* old debris */
    assert_int_equal(sy_store_put(s, "r3/ckpt/step-000000060/dense.safetensors", "x", 1), SY_OK); /* in progress */
    assert_int_equal(sy_ckpt_retain(s, "r3", 0), SY_EINVAL);
    assert_int_equal(sy_ckpt_retain(s, "r3", 2), SY_OK);
    for (int64_t k = 1; k <= 6; k++) {
        char rel[200];
        snprintf(rel, sizeof rel, "r3/ckpt/step-%09lld/MANIFEST.json", (long long)(k * 10));
        int want = k == 4 || k == 5;
        if (file_exists(rel) != want) fail_msg("%s: exists=%d, want %d", rel, file_exists(rel), want);
        snprintf(rel, sizeof rel, "r3/ckpt/step-%09lld/dense.safetensors", (long long)(k * 10));
        want = k >= 4;
        if (file_exists(rel) != want) fail_msg("%s: exists=%d, want %d", rel, file_exists(rel), want);
    }
    assert_false(file_exists("r3/ckpt/step-000000025"));
    assert_true(file_exists("r3b/ckpt/step-000000010/MANIFEST.json"));
    int64_t step;
    assert_int_equal(sy_ckpt_latest(s, "r3", &step), SY_OK);
    assert_int_equal(step, 50);
    /* keep_last = 1 keeps just the newest; repeating is a no-op */
    assert_int_equal(sy_ckpt_retain(s, "r3", 1), SY_OK);
    assert_int_equal(sy_ckpt_retain(s, "r3", 1), SY_OK);
    char **keys;
    size_t n;
    assert_int_equal(sy_store_list(s, "r3/", &keys, &n), SY_OK);
    for (size_t i = 0; i < n; i++)
        if (strncmp(keys[i], "r3/ckpt/step-000000050/", 23) && strncmp(keys[i], "r3/ckpt/step-000000060/", 23))
            fail_msg("left over: %s", keys[i]);
    assert_int_equal(n, 2 + 2 * E + 1 + 1);
    sy_store_keys_free(keys, n);
    toy *got = malloc(sizeof *got), *want = malloc(sizeof *want);
    toy_init(got, 0);
    toy_init(want, 5);
    for (int g = 0; g < 2 + 2 * E; g++) assert_int_equal(sy_ckpt_load_group(s, "r3", 50, &got->groups[g]), SY_OK);
    assert_memory_equal(got, want, offsetof(toy, names));
    free(got);
    free(want);
    sy_store_destroy(&s);
}

/* Tagged parts (sy_ckpt_write_part_tagged; docs/fault-tolerance.md "Stale workers"): objects are
 * "<tag>.<file>", the manifest lists the file name and the object, loads go to the object; a
 * commit whose manifest names generation G refuses an object of another generation, or an
 * untagged one among tagged ones; a stale writer's later part of the same step lands beside the
 * committed objects and changes none of them. */
static void test_ckpt_tagged_parts(void **state) {
    (void)state;
    sy_store_t *s = open_store();
    toy *t = malloc(sizeof *t), *old = malloc(sizeof *old), *got = malloc(sizeof *got);
    toy_init(t, 21);
    toy_init(old, 22);
    toy_init(got, 0);
    char tag[64];
    assert_int_equal(sy_ckpt_part_tag(tag, sizeof tag, 3, 1), SY_OK);
    assert_string_equal(tag, "g3-r1");
    json_t *files = NULL, *stale = NULL;
    assert_int_equal(sy_ckpt_write_part_tagged(s, "tg", 4, tag, t->groups, 2 + 2 * E, &files), SY_OK);
    json_t *e0 = json_array_get(files, 0);
    assert_string_equal(json_string_value(json_object_get(e0, "name")), t->groups[0].file);
    char want[128], key[200];
    snprintf(want, sizeof want, "g3-r1.%s", t->groups[0].file);
    assert_string_equal(json_string_value(json_object_get(e0, "object")), want);
    assert_int_equal(sy_ckpt_key(key, sizeof key, "tg", 4, t->groups[0].file), SY_OK);
    uint64_t size = 0;
    assert_int_equal(sy_store_head(s, key, &size), SY_ENOTFOUND); /* no untagged object */
    /* generation 4 may not commit generation 3's objects */
    json_t *ex4 = json_pack("{s:i}", "generation", 4), *ex3 = json_pack("{s:i}", "generation", 3);
    assert_int_equal(sy_ckpt_commit(s, "tg", 4, files, ex4), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "not written by generation 4"));
    /* an untagged entry among tagged ones is refused too */
    json_t *mixed = json_deep_copy(files);
    json_object_del(json_array_get(mixed, 1), "object");
    assert_int_equal(sy_ckpt_commit(s, "tg", 4, mixed, ex3), SY_EINVAL);
    json_decref(mixed);
    /* a file listed twice, and two names on one object, are refused (checked with sets: a
     * commit of 2,048 experts lists 4,098 files) */
    json_t *dup = json_deep_copy(files);
    json_array_append_new(dup, json_deep_copy(json_array_get(files, 0)));
    assert_int_equal(sy_ckpt_commit(s, "tg", 4, dup, ex3), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "listed twice"));
    assert_non_null(strstr(sy_err_msg(), "file '"));
    json_object_set_new(json_array_get(dup, json_array_size(dup) - 1), "name", json_string("other.safetensors"));
    assert_int_equal(sy_ckpt_commit(s, "tg", 4, dup, ex3), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "object 'g3-r1."));
    assert_non_null(strstr(sy_err_msg(), "listed twice"));
    json_decref(dup);
    assert_int_equal(sy_ckpt_commit(s, "tg", 4, files, ex3), SY_OK);
    /* a stale writer of generation 2 finishes its part of the same step afterwards */
    assert_int_equal(sy_ckpt_part_tag(tag, sizeof tag, 2, 1), SY_OK);
    assert_int_equal(sy_ckpt_write_part_tagged(s, "tg", 4, tag, old->groups, 2 + 2 * E, &stale), SY_EEXIST);
    /* (refused up front: the step is committed; written anyway with a raw put it is debris) */
    snprintf(want, sizeof want, "g2-r1.%s", t->groups[0].file);
    assert_int_equal(sy_ckpt_key(key, sizeof key, "tg", 4, want), SY_OK);
    assert_int_equal(sy_store_put(s, key, "stale", 5), SY_OK);
    json_t *m = NULL;
    assert_int_equal(sy_ckpt_read_manifest(s, "tg", 4, &m), SY_OK);
    for (int i = 0; i < 2 + 2 * E; i++) assert_int_equal(sy_ckpt_verify_file(s, m, t->groups[i].file), SY_OK);
    json_decref(m);
    for (int i = 0; i < 2 + 2 * E; i++) assert_int_equal(sy_ckpt_load_group(s, "tg", 4, &got->groups[i]), SY_OK);
    assert_memory_equal(got->embed, t->embed, sizeof t->embed);
    assert_memory_equal(got->fc, t->fc, sizeof t->fc);
    int64_t latest = -1;
    assert_int_equal(sy_ckpt_latest(s, "tg", &latest), SY_OK);
    assert_int_equal(latest, 4);
    json_decref(ex3), json_decref(ex4), json_decref(files), json_decref(stale);
    free(t), free(old), free(got);
    sy_store_destroy(&s);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_store_keys, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_store_ops, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_store_put_if_absent_race, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_store_putv, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_ckpt_write_part_bytes, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_ckpt_tagged_parts, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_ckpt_roundtrip, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_ckpt_debris_and_corruption, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_ckpt_retain, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
