/* The nccl data plane on a GPU (comm.h "nccl"; docs/protocol.md "NCCL data plane"). Exits 77
 * (skipped, never passed) where the nccl data plane cannot run: no CUDA device, or a build
 * without NCCL. test_cuda_nodev checks that failure; tests/gpu/device_check.sh runs this file
 * and tools/sy_commabort (the abort latency) on a GPU.
 *
 * One GPU cannot hold two NCCL ranks (NCCL refuses the same device twice), so this runs a
 * one-rank NCCL communicator (the nccl implementation runs its own world 1, comm.h): every
 * collective really goes through NCCL (the unique id, ncclCommInitRankConfig non-blocking,
 * grouped send/recv, the all-to-all + device sum + all-gather all-reduce, broadcast, the
 * barrier), on device buffers of the CUDA backend and on host buffers (staged). At world 1 each
 * result is known exactly: all-to-all-v copies, the all-reduce returns its input bit for bit,
 * broadcast leaves the root's bytes. The rank-order sum over W > 1 ranks is what the tcp data
 * plane computes; only a multi-GPU host can compare them (not done yet). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "base/status.h"
#include "comm/comm.h"
#include "sy_test.h"

static int g_device;

static void test_world1(void **state) {
    (void)state;
    sy_backend_t *be = NULL;
    assert_int_equal(sy_backend_cuda_new(g_device, false, &be), SY_OK);
    sy_dataplane_t *dp = NULL;
    assert_int_equal(sy_dataplane_new("nccl", "tcp://127.0.0.1:*", &dp), SY_OK);
    assert_string_equal(sy_dataplane_kind(dp), "nccl");
    const char *eps[1] = {sy_dataplane_endpoint(dp)};
    sy_comm_t *c = NULL;
    assert_int_equal(sy_comm_new(dp, 7, 0, 1, eps, 30000, &c), SY_OK);
    assert_int_equal(sy_comm_device_buffers(c), 1);

    /* all-to-all-v on device buffers: our own chunk comes back unchanged */
    enum { NB = 4099, N = 100003 };
    unsigned char hs[NB], hr[NB];
    for (int i = 0; i < NB; i++) hs[i] = (unsigned char)(i * 37 + 11);
    void *ds = sy_test_upload_new(be, hs, NB), *dr = sy_test_upload_new(be, NULL, NB);
    size_t sb[1] = {NB}, rb[1] = {NB};
    be->sync(be);
    assert_int_equal(sy_comm_alltoallv(c, ds, sb, dr, rb), SY_OK);
    sy_test_download(be, hr, dr, NB);
    assert_memory_equal(hr, hs, NB);

    /* fp64 all-reduce on a device buffer: the sum over one rank is its input, bit for bit */
    double *x = malloc(sizeof(double) * N), *y = malloc(sizeof(double) * N);
    for (int i = 0; i < N; i++) x[i] = frand(-1e3, 1e3);
    void *dx = sy_test_upload_new(be, x, sizeof(double) * N);
    be->sync(be);
    assert_int_equal(sy_comm_allreduce_f64(c, dx, N), SY_OK);
    sy_test_download(be, y, dx, sizeof(double) * N);
    assert_memory_equal(y, x, sizeof(double) * N);
    /* and on a host buffer (staged through the communicator's device buffer) */
    memcpy(y, x, sizeof(double) * N);
    assert_int_equal(sy_comm_allreduce_f64(c, y, N), SY_OK);
    assert_memory_equal(y, x, sizeof(double) * N);
    float f[5] = {1.5f, -2.25f, 3e-7f, 1e30f, 0.0f}, g[5];
    memcpy(g, f, sizeof f);
    assert_int_equal(sy_comm_allreduce_f32(c, g, 5), SY_OK);
    assert_memory_equal(g, f, sizeof f);
    /* broadcast (device and host) and barrier */
    assert_int_equal(sy_comm_broadcast(c, ds, NB, 0), SY_OK);
    sy_test_download(be, hr, ds, NB);
    assert_memory_equal(hr, hs, NB);
    memcpy(hr, hs, NB);
    assert_int_equal(sy_comm_broadcast(c, hr, NB, 0), SY_OK);
    assert_memory_equal(hr, hs, NB);
    assert_int_equal(sy_comm_barrier(c), SY_OK);
    assert_int_equal(sy_comm_device_lost(c), 0);
    sy_comm_stats st = sy_comm_get_stats(c);
    assert_int_equal((int)st.collectives, 8);

    /* abort: every later collective says so at once */
    sy_comm_abort(c);
    assert_int_equal(sy_comm_barrier(c), SY_EABORTED);
    sy_comm_destroy(&c); /* ncclCommAbort */
    /* the next generation on the same data plane */
    assert_int_equal(sy_comm_new(dp, 8, 0, 1, eps, 30000, &c), SY_OK);
    assert_int_equal(sy_comm_allreduce_f64(c, dx, N), SY_OK);
    sy_test_download(be, y, dx, sizeof(double) * N);
    assert_memory_equal(y, x, sizeof(double) * N);
    sy_comm_destroy(&c);
    sy_dataplane_destroy(&dp);
    be->free(be, ds), be->free(be, dr), be->free(be, dx);
    free(x), free(y);
    sy_backend_destroy(&be);
}

int main(void) {
    char why[1024] = "";
    if (sy_comm_nccl_available(why, sizeof why) <= 0) {
        fprintf(stderr, "test_comm_nccl: skipped: %s\n", why);
        return 77;
    }
    fprintf(stderr, "test_comm_nccl: %s\n", why);
    const char *dev = getenv("SY_CUDA_DEVICE");
    g_device = dev && dev[0] ? atoi(dev) : 0;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_world1),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
