/* The CUDA backend where it cannot run: sy_backend_cuda_new must fail cleanly and fast (a
 * returned error naming the device and the reason, within a second, no hang, no exit), and so
 * must SY_BACKEND=cuda. This runs everywhere:
 *   - a build without CUDA: the error says the build has no CUDA and how to get it;
 *   - CUDA built, no driver or no device (this machine): the error names device 0 and the
 *     CUDA runtime's reason (cudaGetDeviceCount's error string);
 *   - CUDA built and a device present (a GPU machine): a device number past the last one and a
 *     negative one fail the same way ("not present", with the count), and device 0 succeeds.
 * The nccl data plane likewise (test_nccl_dataplane_nodev): without a device (or built without
 * NCCL) sy_dataplane_new("nccl") fails within a second, SY_EINVAL, naming nccl, the reason and
 * the fix (cluster.comm: tcp); the generic comm argument checks run before any implementation;
 * tcp and threads report host buffers (sy_comm_device_buffers 0) and never a lost device.
 * The GPU tests themselves are test_backend_cuda and test_comm_nccl (exit 77, skipped, without a
 * device). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "comm/comm.h"
#include "base/status.h"
#include "sy_test.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* sy_backend_cuda_new(device) fails within a second with a message containing want1 and want2 */
static void fails_fast(int device, const char *want1, const char *want2) {
    sy_backend_t *be = (sy_backend_t *)0x1;
    double t0 = now_s();
    sy_status st = sy_backend_cuda_new(device, true, &be);
    double dt = now_s() - t0;
    const char *msg = sy_err_msg();
    fprintf(stderr, "device %d: %s (%.3f s): %s\n", device, sy_strerror(st), dt, msg);
    assert_int_not_equal(st, SY_OK);
    assert_null(be);
    assert_true(dt < 1.0);
    assert_non_null(strstr(msg, want1));
    if (want2) assert_non_null(strstr(msg, want2));
}

static void test_cuda_new_fails_cleanly(void **state) {
    (void)state;
    char why[256] = "";
    int n = sy_backend_cuda_devices(why, sizeof why);
    fprintf(stderr, "built with CUDA: %s; devices: %d (%s)\n", sy_backend_cuda_built() ? "yes" : "no",
            n, why);
    if (!sy_backend_cuda_built()) {
        assert_int_equal(n, -1);
        fails_fast(0, "device 0", "built without CUDA");
        return;
    }
    if (n <= 0) {
        /* the runtime's reason, from cudaGetDeviceCount */
        assert_non_null(strstr(why, "cudaGetDeviceCount"));
        fails_fast(0, "device 0", "cudaGetDeviceCount");
        fails_fast(3, "device 3", "cudaGetDeviceCount");
        return;
    }
    char want[64];
    snprintf(want, sizeof want, "%d CUDA device(s) visible", n);
    fails_fast(n, "not present", want);
    fails_fast(-1, "not present", want);
    sy_backend_t *be = NULL;
    assert_int_equal(sy_backend_cuda_new(0, true, &be), SY_OK);
    assert_string_equal(be->name, "cuda");
    sy_backend_destroy(&be);
}

/* SY_BACKEND=cuda (tests and tools that pick their backend from the environment) */
static void test_env_selection(void **state) {
    (void)state;
    char why[256];
    if (sy_backend_cuda_devices(why, sizeof why) > 0) skip();
    setenv("SY_BACKEND", "cuda", 1);
    setenv("SY_CUDA_DEVICE", "0", 1);
    sy_backend_t *be = NULL;
    double t0 = now_s();
    sy_status st = sy_backend_new_from_env(1, false, &be);
    assert_true(now_s() - t0 < 1.0);
    assert_int_not_equal(st, SY_OK);
    assert_null(be);
    assert_non_null(strstr(sy_err_msg(), "device 0"));
    unsetenv("SY_BACKEND");
    unsetenv("SY_CUDA_DEVICE");
}

static void test_nccl_dataplane_nodev(void **state) {
    (void)state;
    bool listed = false;
    for (int i = 0; sy_comm_kinds[i]; i++) listed |= strcmp(sy_comm_kinds[i], "nccl") == 0;
    assert_true(listed);
    /* the generic checks come first, whatever the kind: no device needed to see them */
    sy_comm_t *c = (sy_comm_t *)0x1;
    assert_int_equal(sy_comm_new(NULL, 1, 2, 2, NULL, 1000, &c), SY_EINVAL);
    assert_null(c);
    /* tcp and threads: host buffers, no device to lose */
    sy_dataplane_t *dp = NULL;
    assert_int_equal(sy_dataplane_new("threads", NULL, &dp), SY_OK);
    assert_int_equal(sy_comm_new(NULL, 1, 0, 1, NULL, 1000, &c), SY_OK);
    assert_int_equal(sy_comm_device_buffers(c), 0);
    assert_int_equal(sy_comm_device_lost(c), 0);
    sy_comm_destroy(&c);
    sy_dataplane_destroy(&dp);

    char why[1024] = "";
    int n = sy_comm_nccl_available(why, sizeof why);
    fprintf(stderr, "nccl data plane: %d device(s): %s\n", n, why);
    if (n > 0) skip(); /* a GPU machine: test_comm_nccl runs it */
    dp = (sy_dataplane_t *)0x1;
    double t0 = now_s();
    sy_status st = sy_dataplane_new("nccl", "tcp://127.0.0.1:*", &dp);
    double dt = now_s() - t0;
    const char *msg = sy_err_msg();
    fprintf(stderr, "nccl: %s (%.3f s): %s\n", sy_strerror(st), dt, msg);
    assert_int_equal(st, SY_EINVAL);
    assert_null(dp);
    assert_true(dt < 1.0);
    assert_non_null(strstr(msg, "nccl"));
    assert_non_null(strstr(msg, "cluster.comm: tcp"));
    assert_true(strstr(msg, "cudaGetDeviceCount") || strstr(msg, "built without NCCL") ||
                strstr(msg, "NCCL module"));
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_nccl_dataplane_nodev),
        cmocka_unit_test(test_cuda_new_fails_cleanly),
        cmocka_unit_test(test_env_selection),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
