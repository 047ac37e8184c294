/* src/data/data: shard writing and validation, windows, batches, the sample order (spec §6). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "data/data.h"

#include "sy_test.h"

typedef struct {
    char dir[64];
    char a[128], b[128], c[128];
    uint16_t *ta, *tb, *tc;
    uint64_t na, nb, nc;
} fixture_t;

/* Tokens of shard `id`: distinct per (shard, position) so a copied window is identifiable. */
static uint16_t tok_of(int id, uint64_t i) { return (uint16_t)((id * 7919 + i * 31) % 251); }

static uint16_t *make_tokens(int id, uint64_t n) {
    uint16_t *t = malloc(n * sizeof *t + 1);
    for (uint64_t i = 0; i < n; i++) t[i] = tok_of(id, i);
    return t;
}

static int setup(void **state) {
    fixture_t *f = calloc(1, sizeof *f);
    strcpy(f->dir, "/tmp/sy_test_data_XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    snprintf(f->a, sizeof f->a, "%s/s_a.bin", f->dir);
    snprintf(f->b, sizeof f->b, "%s/s_b.bin", f->dir);
    snprintf(f->c, sizeof f->c, "%s/s_c.bin", f->dir);
    f->na = 41; /* T=8: (41-1)/8 = 5 windows */
    f->nb = 8;  /* < T+1: no window */
    f->nc = 20; /* (20-1)/8 = 2 windows */
    f->ta = make_tokens(1, f->na);
    f->tb = make_tokens(2, f->nb);
    f->tc = make_tokens(3, f->nc);
    if (sy_data_write_shard(f->a, f->ta, f->na) != SY_OK) return -1;
    if (sy_data_write_shard(f->b, f->tb, f->nb) != SY_OK) return -1;
    if (sy_data_write_shard(f->c, f->tc, f->nc) != SY_OK) return -1;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture_t *f = *state;
    if (sy_test_rmtree(f->dir) != 0) return -1;
    free(f->ta);
    free(f->tb);
    free(f->tc);
    free(f);
    return 0;
}

static sy_data_t *open3(fixture_t *f, int T) {
    const char *p[] = {f->a, f->b, f->c};
    sy_data_t *d = NULL;
    sy_status st = sy_data_open(p, 3, 256, T, &d);
    if (st != SY_OK) print_error("open: %s\n", sy_err_msg());
    assert_int_equal(st, SY_OK);
    return d;
}

static void test_write_format(void **state) {
    fixture_t *f = *state;
    FILE *fp = fopen(f->a, "rb");
    assert_non_null(fp);
    int32_t hdr[256];
    assert_int_equal(fread(hdr, 4, 256, fp), 256);
    assert_int_equal(hdr[0], 20240520);
    assert_int_equal(hdr[1], 1);
    assert_int_equal(hdr[2], (int32_t)f->na);
    uint16_t t[64];
    assert_int_equal(fread(t, 2, 64, fp), f->na); /* exactly count tokens follow */
    fclose(fp);
    assert_memory_equal(t, f->ta, f->na * 2);
}

static void test_windows(void **state) {
    fixture_t *f = *state;
    sy_data_t *d = open3(f, 8);
    assert_int_equal(sy_data_windows(d), 5 + 0 + 2);
    assert_int_equal(sy_data_shards(d), 3);
    assert_string_equal(sy_data_shard_path(d, 2), f->c);
    sy_data_destroy(&d);
    assert_null(d);
    sy_data_destroy(&d); /* twice is safe */
    d = open3(f, 4);     /* (40)/4 + (7)/4 + (19)/4 = 10 + 1 + 4 */
    assert_int_equal(sy_data_windows(d), 15);
    sy_data_destroy(&d);
    d = open3(f, 40); /* only shard a: (41-1)/40 = 1 */
    assert_int_equal(sy_data_windows(d), 1);
    sy_data_destroy(&d);
}

static void test_eval_batch_contents(void **state) {
    fixture_t *f = *state;
    const int T = 8;
    sy_data_t *d = open3(f, T);
    int32_t buf[4 * 9];
    /* windows 4, 5, 6, 0 (wrapping): a's last window, c's two windows, a's first */
    assert_int_equal(sy_data_eval_batch(d, 4, 4, buf), SY_OK);
    for (int t = 0; t <= T; t++) {
        assert_int_equal(buf[0 * 9 + t], f->ta[4 * T + t]);
        assert_int_equal(buf[1 * 9 + t], f->tc[0 * T + t]);
        assert_int_equal(buf[2 * 9 + t], f->tc[1 * T + t]);
        assert_int_equal(buf[3 * 9 + t], f->ta[t]);
    }
    sy_data_destroy(&d);
}

static void test_train_batch_matches_window_of(void **state) {
    fixture_t *f = *state;
    const int T = 4, M = 3, b = 2;
    sy_data_t *d = open3(f, T);
    /* window -> (shard tokens, offset) by the spec's concatenation rule, computed here */
    const uint16_t *src[15];
    uint64_t off[15];
    int w = 0;
    for (uint64_t k = 0; k < 10; k++, w++) src[w] = f->ta, off[w] = k * T;
    for (uint64_t k = 0; k < 1; k++, w++) src[w] = f->tb, off[w] = k * T;
    for (uint64_t k = 0; k < 4; k++, w++) src[w] = f->tc, off[w] = k * T;
    int32_t buf[2 * 5];
    for (int64_t s = 0; s < 6; s++)
        for (int m = 0; m < M; m++) {
            assert_int_equal(sy_data_train_batch(d, 77, s, M, b, m, buf), SY_OK);
            for (int j = 0; j < b; j++) {
                uint64_t idx = sy_data_sample_index(s, M, b, m, j);
                assert_int_equal(idx, (uint64_t)s * M * b + (uint64_t)m * b + (uint64_t)j);
                uint64_t win = sy_data_window_of(d, 77, idx);
                assert_true(win < 15);
                for (int t = 0; t <= T; t++)
                    assert_int_equal(buf[j * 5 + t], src[win][off[win] + (uint64_t)t]);
            }
        }
    assert_int_not_equal(sy_data_train_batch(d, 77, 0, M, b, M, buf), SY_OK); /* m >= M */
    assert_int_not_equal(sy_data_train_batch(d, 77, -1, M, b, 0, buf), SY_OK);
    sy_data_destroy(&d);
}

static void test_permutation_each_epoch(void **state) {
    fixture_t *f = *state;
    sy_data_t *d = open3(f, 4);
    uint64_t N = sy_data_windows(d);
    for (uint64_t ep = 0; ep < 5; ep++) {
        int seen[15] = {0};
        for (uint64_t i = 0; i < N; i++) seen[sy_data_window_of(d, 5, ep * N + i)]++;
        for (uint64_t w = 0; w < N; w++) assert_int_equal(seen[w], 1);
    }
    /* the epochs are not all the same order */
    int differ = 0;
    for (uint64_t i = 0; i < N; i++)
        differ |= sy_data_window_of(d, 5, i) != sy_data_window_of(d, 5, N + i);
    assert_true(differ);
    sy_data_destroy(&d);
}

static void test_order_pure_function(void **state) {
    fixture_t *f = *state;
    sy_data_t *d = open3(f, 4), *e = open3(f, 4);
    uint64_t N = sy_data_windows(d), total = 7 * N + 3;
    uint64_t *fwd = malloc(total * sizeof *fwd);
    for (uint64_t i = 0; i < total; i++) fwd[i] = sy_data_window_of(d, 123, i);
    /* backwards, and jumping between far-apart epochs, on a fresh handle */
    for (uint64_t i = total; i-- > 0;) assert_int_equal(sy_data_window_of(e, 123, i), fwd[i]);
    for (uint64_t k = 0; k < 200; k++) {
        uint64_t i = (k * 7919) % total;
        assert_int_equal(sy_data_window_of(e, 123, i), fwd[i]);
        assert_int_equal(sy_data_window_of(e, 123, total - 1 - i), fwd[total - 1 - i]);
    }
    /* interleaving seeds does not disturb the cache */
    for (uint64_t i = 0; i < total; i++) {
        (void)sy_data_window_of(e, 999, i);
        assert_int_equal(sy_data_window_of(e, 123, i), fwd[i]);
    }
    free(fwd);
    sy_data_destroy(&d);
    sy_data_destroy(&e);
}

static void test_seeds_differ(void **state) {
    fixture_t *f = *state;
    sy_data_t *d = open3(f, 4);
    uint64_t N = sy_data_windows(d);
    int differ = 0;
    for (uint64_t i = 0; i < N; i++)
        differ |= sy_data_window_of(d, 1, i) != sy_data_window_of(d, 2, i);
    assert_true(differ);
    sy_data_destroy(&d);
}

/* The feistel order (data.h, PINNED) is a bijection of [0, N) for every N, and spreads: over
 * many epochs each window lands at a given position about equally often. */
static void test_feistel_bijection(void **state) {
    (void)state;
    static uint8_t seen[(1 << 20) + 1];
    const uint64_t sizes[] = {1, 2, 3, 4, 5, 7, 16, 17, 255, 256, 257, 1000, 4097, 65535, 65536, 65537,
                              (1 << 20) - 3, 1 << 20, (1 << 20) + 1};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        uint64_t N = sizes[k];
        sy_feistel_t f;
        sy_data_feistel_key(&f, N, 0x1234 + k, k % 3);
        memset(seen, 0, N);
        for (uint64_t i = 0; i < N; i++) {
            uint64_t w = sy_data_feistel(&f, i);
            assert_true(w < N);
            assert_int_equal(seen[w], 0);
            seen[w] = 1;
        }
    }
    /* position 0 of 8000 epochs of N = 8: each window about 1000 times (binomial sd ~30) */
    int count[8] = {0};
    for (uint64_t ep = 0; ep < 8000; ep++) {
        sy_feistel_t f;
        sy_data_feistel_key(&f, 8, 77, ep);
        count[sy_data_feistel(&f, 0)]++;
    }
    for (int w = 0; w < 8; w++) assert_in_range(count[w], 850, 1150);
    /* huge N: values stay in range and differ */
    sy_feistel_t f;
    sy_data_feistel_key(&f, UINT64_MAX, 5, 0);
    assert_true(sy_data_feistel(&f, 0) != sy_data_feistel(&f, 1));
    assert_true(sy_data_feistel(&f, UINT64_MAX - 1) < UINT64_MAX);
}

/* Writes `bytes` raw bytes to dir/name, returns the path (static buffer). */
static const char *write_raw(fixture_t *f, const char *name, const void *bytes, size_t n) {
    static char path[160];
    snprintf(path, sizeof path, "%s/%s", f->dir, name);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(bytes, 1, n, fp), n);
    fclose(fp);
    return path;
}

static void expect_open_fails(const char *path, int vocab, const char *needle) {
    const char *p[] = {path};
    sy_data_t *d = (sy_data_t *)0x1;
    sy_err_clear();
    sy_status st = sy_data_open(p, 1, vocab, 4, &d);
    assert_int_not_equal(st, SY_OK);
    assert_null(d);
    const char *msg = sy_err_msg();
    if (!strstr(msg, path) || (needle && !strstr(msg, needle)))
        print_error("message '%s' lacks '%s' / '%s'\n", msg, path, needle ? needle : "");
    assert_non_null(strstr(msg, path));
    if (needle) assert_non_null(strstr(msg, needle));
}

static void test_rejects_bad_shards(void **state) {
    fixture_t *f = *state;
    enum { N = 20 };
    struct {
        int32_t hdr[256];
        uint16_t tok[N];
    } s;
    memset(&s, 0, sizeof s);
    for (int i = 0; i < N; i++) s.tok[i] = (uint16_t)i;
    s.hdr[0] = 20240520, s.hdr[1] = 1, s.hdr[2] = N;
    const char *ok = write_raw(f, "ok.bin", &s, sizeof s);
    const char *pp[] = {ok};
    sy_data_t *d = NULL;
    assert_int_equal(sy_data_open(pp, 1, 256, 4, &d), SY_OK); /* the control opens */
    sy_data_destroy(&d);

    s.hdr[0] = 20240521;
    expect_open_fails(write_raw(f, "magic.bin", &s, sizeof s), 256, "magic");
    s.hdr[0] = 20240520, s.hdr[1] = 2;
    expect_open_fails(write_raw(f, "version.bin", &s, sizeof s), 256, "version");
    s.hdr[1] = 1;
    expect_open_fails(write_raw(f, "short.bin", &s, sizeof s - 1), 256, "size");
    s.hdr[2] = N - 1;
    expect_open_fails(write_raw(f, "long.bin", &s, sizeof s), 256, "size");
    s.hdr[2] = -5;
    expect_open_fails(write_raw(f, "neg.bin", &s, sizeof s), 256, "negative");
    s.hdr[2] = N;
    expect_open_fails(write_raw(f, "hdr.bin", &s, 100), 256, "header");
    s.tok[13] = 256; /* the first token out of range: open checks header and size only, the
                      * batch that reads the window fails, and sy_data_validate finds it up front */
    const char *pb[] = {write_raw(f, "vocab.bin", &s, sizeof s)};
    assert_int_equal(sy_data_open(pb, 1, 256, 4, &d), SY_OK);
    int32_t rows[2 * 5];
    assert_int_equal(sy_data_eval_batch(d, 0, 2, rows), SY_OK); /* windows 0, 1: tokens 0..8 */
    assert_int_equal(sy_data_eval_batch(d, 2, 2, rows), SY_EFORMAT); /* window 3: tokens 12..16 */
    assert_non_null(strstr(sy_err_msg(), pb[0]));
    assert_non_null(strstr(sy_err_msg(), "token 256 at index 13 >= vocab_size 256"));
    sy_data_destroy(&d);
    sy_data_check_counts cc;
    assert_int_equal(sy_data_validate(pb, 1, 256, 4, NULL, NULL, &cc), SY_EFORMAT);
    assert_non_null(strstr(sy_err_msg(), "token 256 at index 13 >= vocab_size 256"));
    s.tok[13] = 13;
    const char *pg[] = {write_raw(f, "good.bin", &s, sizeof s)}; /* (write_raw's buffer is static) */
    assert_int_equal(sy_data_validate(pg, 1, 256, 4, NULL, NULL, &cc), SY_OK);
    assert_true(cc.shards == 1 && cc.tokens == N && cc.windows == (N - 1) / 4);
    s.tok[13] = 256;
    /* same file is fine with a larger vocabulary */
    const char *pv[] = {write_raw(f, "vocab2.bin", &s, sizeof s)};
    assert_int_equal(sy_data_open(pv, 1, 257, 4, &d), SY_OK);
    sy_data_destroy(&d);

    char missing[160], nomatch[160];
    snprintf(missing, sizeof missing, "%s/missing.bin", f->dir);
    expect_open_fails(missing, 256, NULL);
    snprintf(nomatch, sizeof nomatch, "%s/nothing_*.bin", f->dir);
    expect_open_fails(nomatch, 256, "no");
    /* no full window anywhere */
    uint16_t few[3] = {1, 2, 3};
    char tiny[160];
    snprintf(tiny, sizeof tiny, "%s/tiny.bin", f->dir);
    assert_int_equal(sy_data_write_shard(tiny, few, 3), SY_OK);
    expect_open_fails(tiny, 256, "window");
}

static void test_glob_sorted(void **state) {
    fixture_t *f = *state;
    char pat[160];
    snprintf(pat, sizeof pat, "%s/s_*.bin", f->dir);
    const char *p[] = {pat, f->a};
    sy_data_t *d = NULL;
    assert_int_equal(sy_data_open(p, 2, 256, 8, &d), SY_OK);
    assert_int_equal(sy_data_shards(d), 4);
    assert_string_equal(sy_data_shard_path(d, 0), f->a);
    assert_string_equal(sy_data_shard_path(d, 1), f->b);
    assert_string_equal(sy_data_shard_path(d, 2), f->c);
    assert_string_equal(sy_data_shard_path(d, 3), f->a);
    assert_int_equal(sy_data_windows(d), 5 + 0 + 2 + 5);
    sy_data_destroy(&d);
}

/* The launcher's cheap check: patterns must name files; their contents are not read. */
static void test_check_patterns(void **state) {
    fixture_t *f = *state;
    char pat[160], none[160];
    snprintf(pat, sizeof pat, "%s/s_*.bin", f->dir);
    snprintf(none, sizeof none, "%s/nothing_*.bin", f->dir);
    const char *ok[] = {pat, f->a};
    assert_int_equal(sy_data_check_patterns(ok, 2), SY_OK);
    const char *bad[] = {pat, none};
    assert_int_equal(sy_data_check_patterns(bad, 2), SY_ENOTFOUND);
    assert_non_null(strstr(sy_err_msg(), "nothing_*.bin"));
    const char *empty[] = {""};
    assert_int_equal(sy_data_check_patterns(empty, 1), SY_EINVAL);
    /* a corrupt shard passes the check (not read) but not sy_data_open */
    const char *junk = write_raw(f, "junk.bin", "not a shard", 11);
    const char *pj[] = {junk};
    assert_int_equal(sy_data_check_patterns(pj, 1), SY_OK);
    sy_data_t *d = NULL;
    assert_int_not_equal(sy_data_open(pj, 1, 256, 4, &d), SY_OK);
    assert_null(d);
}

/* Whether a name in dir (not . or ..) contains needle. */
static int dir_has_name_with(const char *dir, const char *needle) {
    DIR *d = opendir(dir);
    assert_non_null(d);
    int found = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..") && strstr(e->d_name, needle)) found = 1;
    closedir(d);
    return found;
}

static void test_write_leaves_no_temp(void **state) {
    fixture_t *f = *state;
    assert_false(dir_has_name_with(f->dir, "tmp"));
    char bad[160];
    snprintf(bad, sizeof bad, "%s/no/such/dir/x.bin", f->dir);
    uint16_t t[2] = {1, 2};
    sy_err_clear();
    assert_int_not_equal(sy_data_write_shard(bad, t, 2), SY_OK);
    assert_non_null(strstr(sy_err_msg(), bad));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_write_format, setup, teardown),
        cmocka_unit_test_setup_teardown(test_windows, setup, teardown),
        cmocka_unit_test_setup_teardown(test_eval_batch_contents, setup, teardown),
        cmocka_unit_test_setup_teardown(test_train_batch_matches_window_of, setup, teardown),
        cmocka_unit_test_setup_teardown(test_permutation_each_epoch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_order_pure_function, setup, teardown),
        cmocka_unit_test_setup_teardown(test_seeds_differ, setup, teardown),
        cmocka_unit_test(test_feistel_bijection),
        cmocka_unit_test_setup_teardown(test_rejects_bad_shards, setup, teardown),
        cmocka_unit_test_setup_teardown(test_glob_sorted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check_patterns, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_leaves_no_temp, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
