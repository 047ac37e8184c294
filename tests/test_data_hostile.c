/* Shards that change under a run (issue 16 #3): a local shard truncated, rewritten or replaced
 * after sy_data_open makes the next batch an SY_EIO naming the file, never SIGBUS (shards used
 * to be memory-mapped) and never other tokens; an untouched shard reads exactly the tokens
 * written; writers refuse to replace what is not a regular file (#7). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "data/data.h"
#include "base/fsutil.h"
#include "base/safetensors.h"

#define SY_TESTDIR_PREFIX "/tmp/sy-data-hostile-"
#include "sy_test.h"

#define T 16
#define NTOK 4096

static char shard[300];

static void write_one(void) {
    uint16_t *t = malloc(NTOK * sizeof *t);
    for (int i = 0; i < NTOK; i++) t[i] = (uint16_t)((i * 31) % 251);
    snprintf(shard, sizeof shard, "%s/s_000.bin", tmpdir);
    assert_int_equal(sy_data_write_shard(shard, t, NTOK), SY_OK);
    free(t);
}

static sy_data_t *open_one(void) {
    const char *p[1] = {shard};
    sy_data_t *d = NULL;
    assert_int_equal(sy_data_open(p, 1, 256, T, &d), SY_OK);
    return d;
}

static void on_sigbus(int sig) {
    (void)sig;
    fail_msg("SIGBUS reading a truncated shard");
}

static void test_reads_exact_tokens(void **state) {
    (void)state;
    write_one();
    sy_data_t *d = open_one();
    int32_t tok[4 * (T + 1)];
    uint64_t n = sy_data_windows(d);
    for (uint64_t w = 0; w < n; w += 4) {
        assert_int_equal(sy_data_eval_batch(d, w, 4, tok), SY_OK);
        for (int j = 0; j < 4; j++)
            for (int t = 0; t <= T; t++) {
                uint64_t i = ((w + (uint64_t)j) % n) * T + (uint64_t)t;
                assert_int_equal(tok[j * (T + 1) + t], (int32_t)((i * 31) % 251));
            }
    }
    sy_data_destroy(&d);
}

static void test_truncated_shard_is_an_error(void **state) {
    (void)state;
    signal(SIGBUS, on_sigbus);
    write_one();
    sy_data_t *d = open_one();
    int32_t tok[4 * (T + 1)];
    assert_int_equal(sy_data_train_batch(d, 1, 1, 2, 4, 0, tok), SY_OK);
    assert_int_equal(truncate(shard, 2048), 0);
    sy_status s = SY_OK;
    for (int64_t step = 1; step < 20 && s == SY_OK; step++) s = sy_data_train_batch(d, 1, step, 2, 4, 0, tok);
    assert_int_equal(s, SY_EIO);
    assert_non_null(strstr(sy_err_msg(), shard));
    assert_non_null(strstr(sy_err_msg(), "truncated"));
    assert_int_equal(sy_data_eval_batch(d, 100, 4, tok), SY_EIO);
    sy_data_destroy(&d);
    signal(SIGBUS, SIG_DFL);
}

static void test_replaced_shard_is_an_error(void **state) {
    (void)state;
    write_one();
    sy_data_t *d = open_one();
    int32_t tok[4 * (T + 1)];
    assert_int_equal(sy_data_eval_batch(d, 0, 4, tok), SY_OK);
    /* same size, other contents, a new file renamed over the old one */
    char other[320];
    snprintf(other, sizeof other, "%s/other.bin", tmpdir);
    uint16_t *t = calloc(NTOK, sizeof *t);
    assert_int_equal(sy_data_write_shard(other, t, NTOK), SY_OK);
    free(t);
    assert_int_equal(rename(other, shard), 0);
    assert_int_equal(sy_data_eval_batch(d, 0, 4, tok), SY_EIO);
    assert_non_null(strstr(sy_err_msg(), shard));
    assert_non_null(strstr(sy_err_msg(), "replaced"));
    sy_data_destroy(&d);
}

static void test_rewritten_in_place_is_an_error(void **state) {
    (void)state;
    write_one();
    sy_data_t *d = open_one();
    int32_t tok[4 * (T + 1)];
    assert_int_equal(sy_data_eval_batch(d, 0, 4, tok), SY_OK);
    int fd = open(shard, O_WRONLY);
    assert_true(fd >= 0);
    uint16_t big[64];
    for (int i = 0; i < 64; i++) big[i] = 60000; /* >= vocab */
    assert_int_equal(pwrite(fd, big, sizeof big, 1024 + 64), (ssize_t)sizeof big);
    struct timespec ts[2] = {{0, UTIME_OMIT}, {12345, 0}}; /* a different mtime for sure */
    futimens(fd, ts);
    close(fd);
    assert_int_equal(sy_data_eval_batch(d, 0, 4, tok), SY_EIO);
    assert_non_null(strstr(sy_err_msg(), shard));
    sy_data_destroy(&d);
}

static void test_writers_refuse_non_regular(void **state) {
    (void)state;
    char link_p[320], fifo_p[320], target[320];
    snprintf(target, sizeof target, "%s/target", tmpdir);
    snprintf(link_p, sizeof link_p, "%s/link", tmpdir);
    snprintf(fifo_p, sizeof fifo_p, "%s/fifo", tmpdir);
    assert_int_equal(symlink(target, link_p), 0);
    assert_int_equal(mkfifo(fifo_p, 0600), 0);
    const char *bad[] = {link_p, fifo_p, "/dev/null", tmpdir};
    float v[4] = {1, 2, 3, 4};
    sy_tensor_ref t = {.name = "w", .ndim = 1, .shape = {4}, .data = v};
    uint16_t tok[4] = {1, 2, 3, 4};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(sy_fs_check_replaceable(bad[i]), SY_EINVAL);
        assert_non_null(strstr(sy_err_msg(), bad[i]));
        assert_int_equal(sy_st_write_file(bad[i], &t, 1, SY_ST_F32), SY_EINVAL);
        assert_int_equal(sy_data_write_shard(bad[i], tok, 4), SY_EINVAL);
        assert_int_equal(sy_fs_open_regular(bad[i], 0), -1);
        assert_int_equal(sy_fs_open_regular(bad[i], 1), -1);
    }
    struct stat sb;
    assert_int_equal(lstat(link_p, &sb), 0);
    assert_true(S_ISLNK(sb.st_mode));
    assert_int_not_equal(access(target, F_OK), 0); /* nothing written through the link */
    assert_int_equal(lstat(fifo_p, &sb), 0);
    assert_true(S_ISFIFO(sb.st_mode));
    assert_int_equal(stat("/dev/null", &sb), 0);
    assert_true(S_ISCHR(sb.st_mode));
    /* a regular file is replaced as before */
    int fd = sy_fs_open_regular(target, 0);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(sy_st_write_file(target, &t, 1, SY_ST_F32), SY_OK);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_reads_exact_tokens, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_truncated_shard_is_an_error, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_replaced_shard_is_an_error, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_rewritten_in_place_is_an_error, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_writers_refuse_non_regular, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
