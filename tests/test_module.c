/* src/base/module.c: where an optional module is looked for, and the errors when it cannot be
 * had. The loadable library used is libcmocka (this test's own, found with dladdr); a file
 * that is not a shared library is a temporary text file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/module.h"

#include "sy_test.h"

#define ENV "SY_TEST_MODULE_PATH"

static int g_calls;

/* keeps the candidate when it has cmocka's entry point */
static bool accept_cmocka(void *h, const char *path, void *ctx, char *err, size_t err_len) {
    (void)ctx;
    g_calls++;
    if (dlsym(h, "_cmocka_run_group_tests")) return true;
    snprintf(err, err_len, "%s has no cmocka", path);
    return false;
}

static bool refuse(void *h, const char *path, void *ctx, char *err, size_t err_len) {
    (void)h, (void)ctx;
    g_calls++;
    snprintf(err, err_len, "%s is not of this build", path);
    return false;
}

static const char *cmocka_path(void) {
    Dl_info info;
    assert_true(dladdr((void *)&_cmocka_run_group_tests, &info) != 0);
    assert_non_null(info.dli_fname);
    return info.dli_fname;
}

static sy_module_spec spec_of(const char *build_path) {
    return (sy_module_spec){.what = "the test module", .env_var = ENV,
                            .file = "libsy_no_such_module.so", .build_path = build_path,
                            .dlopen_hint = "is it installed?"};
}

static void test_not_found(void **state) {
    (void)state;
    unsetenv(ENV);
    sy_module_spec spec = spec_of("/nonexistent/libsy_no_such_module.so");
    char err[1024] = "x";
    g_calls = 0;
    assert_false(sy_module_load(&spec, accept_cmocka, NULL, err, sizeof err));
    assert_int_equal(g_calls, 0);
    assert_string_equal(err, "the test module libsy_no_such_module.so was not found (looked beside "
                             "the executable, in ../lib/switchyard/, in "
                             "/nonexistent/libsy_no_such_module.so; " ENV "=PATH names it)");
}

static void test_not_a_library(void **state) {
    (void)state;
    char path[] = "/tmp/sy-test-module-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "not ELF\n", 8), 8);
    close(fd);
    setenv(ENV, path, 1);
    sy_module_spec spec = spec_of("/nonexistent/libsy_no_such_module.so");
    char err[1024] = "";
    g_calls = 0;
    assert_false(sy_module_load(&spec, accept_cmocka, NULL, err, sizeof err));
    assert_int_equal(g_calls, 0);
    char want[512];
    snprintf(want, sizeof want, "cannot load the test module %s: ", path);
    fprintf(stderr, "%s\n", err);
    assert_memory_equal(err, want, strlen(want));
    assert_non_null(strstr(err, "(is it installed?)"));
    unsetenv(ENV);
    unlink(path);
}

static void test_refused_then_error_kept(void **state) {
    (void)state;
    setenv(ENV, cmocka_path(), 1);
    sy_module_spec spec = spec_of("/nonexistent/libsy_no_such_module.so");
    char err[1024] = "";
    g_calls = 0;
    assert_false(sy_module_load(&spec, refuse, NULL, err, sizeof err));
    assert_int_equal(g_calls, 1);
    char want[1024];
    snprintf(want, sizeof want, "%s is not of this build", cmocka_path());
    assert_string_equal(err, want);
    unsetenv(ENV);
}

static void test_env_then_build_path(void **state) {
    (void)state;
    char err[1024] = "";
    setenv(ENV, cmocka_path(), 1); /* the variable first */
    sy_module_spec spec = spec_of("/nonexistent/libsy_no_such_module.so");
    g_calls = 0;
    assert_true(sy_module_load(&spec, accept_cmocka, NULL, err, sizeof err));
    assert_int_equal(g_calls, 1);
    unsetenv(ENV); /* no variable, nothing beside the executable: the build path */
    spec = spec_of(cmocka_path());
    g_calls = 0;
    assert_true(sy_module_load(&spec, accept_cmocka, NULL, err, sizeof err));
    assert_int_equal(g_calls, 1);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_not_found),
        cmocka_unit_test(test_not_a_library),
        cmocka_unit_test(test_refused_then_error_kept),
        cmocka_unit_test(test_env_then_build_path),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
