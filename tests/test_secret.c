/* Tests of src/base/secret.c: token files (permissions refused as ssh refuses them, one line,
 * size and character limits), the order status.token > status.token_file > SY_STATUS_TOKEN,
 * and random tokens, including getrandom(2) failing (a seccomp filter in a forked child): an
 * error, never a weaker fallback. */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "base/secret.h"

#define SY_TESTDIR_PREFIX "/tmp/sy_test_secret_"
#include "sy_test.h"

static const char *write_file(const char *name, const char *text, size_t len, mode_t mode) {
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    unlink(path);
    FILE *fp = fopen(path, "w");
    assert_non_null(fp);
    assert_int_equal(fwrite(text, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
    assert_int_equal(chmod(path, mode), 0);
    return path;
}

static void assert_msg_has(const char *needle) {
    if (!strstr(sy_err_msg(), needle)) fail_msg("error message \"%s\" lacks \"%s\"", sy_err_msg(), needle);
}

static void test_read_file(void **state) {
    (void)state;
    char out[64];
    const char *p = write_file("t1", "s3cret-Token_1\n", 15, 0600);
    if (sy_secret_read_file(p, "status.token_file", out, sizeof out) != SY_OK) fail_msg("%s", sy_err_msg());
    assert_string_equal(out, "s3cret-Token_1");
    p = write_file("t2", "abc\r\n", 5, 0400);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_OK);
    assert_string_equal(out, "abc");
    p = write_file("t3", "abc", 3, 0600); /* no newline */
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_OK);
    assert_string_equal(out, "abc");
    /* exactly n - 1 bytes, with and without a newline after them */
    char big[80];
    memset(big, 'x', sizeof big);
    p = write_file("t4", big, 63, 0600);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_OK);
    assert_int_equal(strlen(out), 63);
    big[63] = '\n';
    p = write_file("t5", big, 64, 0600);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_OK);
    assert_int_equal(strlen(out), 63);
}

static void test_read_file_refused(void **state) {
    (void)state;
    char out[64];
    static const mode_t open_modes[] = {0644, 0640, 0604, 0660, 0606, 0610};
    for (size_t i = 0; i < sizeof open_modes / sizeof open_modes[0]; i++) {
        const char *p = write_file("open", "tok\n", 4, open_modes[i]);
        assert_int_equal(sy_secret_read_file(p, "status.token_file", out, sizeof out), SY_EINVAL);
        assert_msg_has("status.token_file");
        assert_msg_has("too open");
        assert_msg_has("chmod 600");
        assert_string_equal(out, "");
    }
    char path[512];
    snprintf(path, sizeof path, "%s/missing", tmpdir);
    assert_int_equal(sy_secret_read_file(path, "w", out, sizeof out), SY_ENOTFOUND);
    assert_msg_has(path);
    assert_int_equal(sy_secret_read_file(tmpdir, "w", out, sizeof out), SY_EINVAL); /* a folder */
    assert_msg_has("not a regular file");
    const char *p = write_file("empty", "\n", 1, 0600);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_EINVAL);
    assert_msg_has("empty");
    p = write_file("space", "two words\n", 10, 0600);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_EINVAL);
    p = write_file("lines", "one\ntwo\n", 8, 0600);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_EINVAL);
    char big[80];
    memset(big, 'x', sizeof big);
    p = write_file("long", big, 64, 0600);
    assert_int_equal(sy_secret_read_file(p, "w", out, sizeof out), SY_EINVAL);
    assert_msg_has("longer than 63");
    assert_string_equal(out, ""); /* wiped */
}

static void test_status_token_order(void **state) {
    (void)state;
    char out[64];
    const char *p = write_file("tf", "from-file\n", 10, 0600);
    char fpath[512];
    snprintf(fpath, sizeof fpath, "%s", p);
    setenv(SY_STATUS_TOKEN_ENV, "from-env", 1);
    assert_int_equal(sy_secret_status_token("inline", fpath, out, sizeof out), SY_OK);
    assert_string_equal(out, "inline");
    assert_int_equal(sy_secret_status_token("", fpath, out, sizeof out), SY_OK);
    assert_string_equal(out, "from-file");
    assert_int_equal(sy_secret_status_token(NULL, "", out, sizeof out), SY_OK);
    assert_string_equal(out, "from-env");
    setenv(SY_STATUS_TOKEN_ENV, "bad env", 1);
    assert_int_equal(sy_secret_status_token(NULL, NULL, out, sizeof out), SY_EINVAL);
    assert_msg_has(SY_STATUS_TOKEN_ENV);
    unsetenv(SY_STATUS_TOKEN_ENV);
    assert_int_equal(sy_secret_status_token(NULL, NULL, out, sizeof out), SY_OK);
    assert_string_equal(out, "");
    assert_int_equal(chmod(fpath, 0644), 0); /* a bad file is an error, not a fall-through */
    setenv(SY_STATUS_TOKEN_ENV, "from-env", 1);
    assert_int_equal(sy_secret_status_token(NULL, fpath, out, sizeof out), SY_EINVAL);
    unsetenv(SY_STATUS_TOKEN_ENV);
}

static void test_random_hex(void **state) {
    (void)state;
    char a[33], b[33];
    assert_int_equal(sy_secret_random_hex(a, 16), SY_OK);
    assert_int_equal(sy_secret_random_hex(b, 16), SY_OK);
    assert_int_equal(strlen(a), 32);
    assert_int_equal(strspn(a, "0123456789abcdef"), 32);
    assert_string_not_equal(a, b);
}

/* getrandom(2) answers ENOSYS (a seccomp filter, as an old kernel or a sandbox would): the token
 * is an error naming getrandom, and no token is made. Runs in a child: the filter is for ever. */
static void test_random_hex_no_getrandom(void **state) {
    (void)state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getrandom, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        };
        struct sock_fprog prog = {.len = sizeof f / sizeof f[0], .filter = f};
        if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
            _exit(77);
        char out[33] = "";
        sy_status s = sy_secret_random_hex(out, 16);
        if (s != SY_EIO) _exit(1);
        if (!strstr(sy_err_msg(), "getrandom")) _exit(2);
        _exit(0);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    if (WEXITSTATUS(st) == 77) {
        fprintf(stderr, "seccomp unavailable: getrandom failure not simulated\n");
        skip();
    }
    assert_int_equal(WEXITSTATUS(st), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_file),
        cmocka_unit_test(test_read_file_refused),
        cmocka_unit_test(test_status_token_order),
        cmocka_unit_test(test_random_hex),
        cmocka_unit_test(test_random_hex_no_getrandom),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
