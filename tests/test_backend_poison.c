/* src/backend/backend_poison.c, the poisoned-handle variant (issue 10 item 2): proof that it
 * proves something. A host read or write of a buffer it hands out kills the process (checked in
 * a forked child, which must die by SIGSEGV or SIGBUS), while upload -> ops -> download gives the
 * same bits as the plain CPU backend, for buffers, offsets into them and the grouped ops' host
 * arrays of buffer pointers. SY_BACKEND_POISON=1 selects it in sy_backend_cpu_new. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include "backend/backend.h"
#include "backend/backend_cpu_internal.h"

#define SY_TEST_SEED 0x901504ULL
#include "sy_test.h"

static sy_backend_t *g_plain, *g_poison;

static int setup(void **state) {
    (void)state;
    unsetenv("SY_BACKEND_POISON"); /* the suite may run with it set: start from plain backends */
    sy_backend_t *inner = NULL;
    if (sy_backend_cpu_new(1, false, &g_plain) != SY_OK) return -1;
    if (sy_backend_cpu_new(1, false, &inner) != SY_OK) return -1;
    return sy_backend_poison_wrap(inner, &g_poison) == SY_OK ? 0 : -1;
}
static int teardown(void **state) {
    (void)state;
    sy_backend_destroy(&g_plain);
    sy_backend_destroy(&g_poison);
    return 0;
}

/* ---------------------------------------------------------------- selection */

static void test_env_selects_poison(void **state) {
    (void)state;
    sy_backend_t *be = NULL;
    assert_int_equal(setenv("SY_BACKEND_POISON", "1", 1), 0);
    assert_int_equal(sy_backend_cpu_new(1, false, &be), SY_OK);
    assert_string_equal(be->name, "cpu-poison");
    sy_backend_destroy(&be);
    assert_int_equal(setenv("SY_BACKEND_POISON", "0", 1), 0);
    assert_int_equal(sy_backend_cpu_new(1, false, &be), SY_OK);
    assert_string_not_equal(be->name, "cpu-poison");
    sy_backend_destroy(&be);
    unsetenv("SY_BACKEND_POISON");
}

/* ---------------------------------------------------------------- host access faults */

/* Runs touch(p) in a child; returns the signal that ended it (0 if it exited). */
static int child_signal(void (*touch)(volatile float *p), float *p) {
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core); /* an expected crash leaves no core file */
        signal(SIGSEGV, SIG_DFL);          /* cmocka catches these to report a failure */
        signal(SIGBUS, SIG_DFL);
        touch(p);
        _exit(0);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFSIGNALED(st) ? WTERMSIG(st) : 0;
}
static void touch_read(volatile float *p) {
    volatile float v = p[0];
    (void)v;
}
static void touch_write(volatile float *p) { p[3] = 1.0f; }

static void test_host_access_faults(void **state) {
    (void)state;
    float *buf = g_poison->alloc(g_poison, 64 * sizeof(float));
    assert_non_null(buf);
    int sig = child_signal(touch_read, buf);
    assert_true(sig == SIGSEGV || sig == SIGBUS);
    sig = child_signal(touch_write, buf + 8); /* an offset into a buffer is poisoned too */
    assert_true(sig == SIGSEGV || sig == SIGBUS);
    /* the control: the plain backend's buffers are host memory, the child exits normally */
    float *plain = g_plain->alloc(g_plain, 64 * sizeof(float));
    assert_int_equal(child_signal(touch_read, plain), 0);
    assert_int_equal(child_signal(touch_write, plain), 0);
    g_poison->free(g_poison, buf);
    g_plain->free(g_plain, plain);
}

/* ---------------------------------------------------------------- same bits as plain */

enum { N = 24, IN = 16, OUT = 12, E = 4, G = 3 };

typedef struct {
    float x[N * IN], W[G * OUT * IN], w[IN], g[N * IN], m[N * IN], v[N * IN];
    int32_t tgt[N];
} inputs;

typedef struct {
    float y[N * OUT], ln[N * IN], mean[N], rstd[N], dl[N * OUT], probs[N * E], gate[N], lse[N];
    float grp[G * 8 * OUT], p[N * IN], cp[N * IN];
    int32_t expert[N];
    double xent, sumsq;
} outputs;

/* One pass of a few ops of every kind through `be`, all traffic by upload/download. */
static void run_ops(sy_backend_t *be, const inputs *in, outputs *o) {
    float *x = sy_test_upload_new(be, in->x, sizeof in->x);
    float *W = sy_test_upload_new(be, in->W, sizeof in->W);
    float *w = sy_test_upload_new(be, in->w, sizeof in->w);
    float *g = sy_test_upload_new(be, in->g, sizeof in->g);
    float *p = sy_test_upload_new(be, in->x, sizeof in->x);
    float *m = sy_test_upload_new(be, in->m, sizeof in->m);
    float *v = sy_test_upload_new(be, in->v, sizeof in->v);
    int32_t *tgt = sy_test_upload_new(be, in->tgt, sizeof in->tgt);
    float *y = sy_test_upload_new(be, NULL, sizeof o->y);
    float *ln = sy_test_upload_new(be, NULL, sizeof o->ln);
    float *mean = sy_test_upload_new(be, NULL, sizeof o->mean);
    float *rstd = sy_test_upload_new(be, NULL, sizeof o->rstd);
    float *dl = sy_test_upload_new(be, NULL, sizeof o->dl);
    float *probs = sy_test_upload_new(be, NULL, sizeof o->probs);
    float *gate = sy_test_upload_new(be, NULL, sizeof o->gate);
    float *lse = sy_test_upload_new(be, NULL, sizeof o->lse);
    float *grp = sy_test_upload_new(be, NULL, sizeof o->grp);
    float *cp = sy_test_upload_new(be, NULL, sizeof o->cp);
    int32_t *expert = sy_test_upload_new(be, NULL, sizeof o->expert);
    double *sumsq = sy_test_upload_new(be, NULL, sizeof(double));

    be->matmul_fwd(be, y, x, W + OUT * IN, N, IN, OUT); /* an offset into a buffer */
    be->layernorm_fwd(be, ln, mean, rstd, x, w, N, IN);
    be->copy(be, dl, y, sizeof o->dl);
    o->xent = be->xent_fwd_bwd(be, dl, dl, tgt, N, OUT, 1.0f / N);
    be->router_fwd(be, probs, expert, gate, lse, y, N, E);
    /* grouped: host arrays of buffer pointers (rows 0-7, 8-15, 16-23 of x; expert i's W) */
    float *gy[G] = {grp, grp + 8 * OUT, grp + 16 * OUT};
    const float *gx[G] = {x, x + 8 * IN, x + 16 * IN}, *gW[G] = {W, W + OUT * IN, W + 2 * OUT * IN};
    const int gN[G] = {8, 5, 8};
    be->matmul_fwd_group(be, gy, gx, gW, gN, G, IN, OUT);
    be->adamw(be, p, g, m, v, N * IN, 0.999f, 0.9f, 0.95f, 1e-3f, 1.05f, 1e-8f);
    be->sumsq_add(be, sumsq, p, N * IN);
    be->copy(be, cp, p, sizeof o->cp);
    be->zero(be, cp + 5, 7 * sizeof(float));
    be->sync(be);

    sy_test_download(be, o->y, y, sizeof o->y);
    sy_test_download(be, o->ln, ln, sizeof o->ln);
    sy_test_download(be, o->mean, mean, sizeof o->mean);
    sy_test_download(be, o->rstd, rstd, sizeof o->rstd);
    sy_test_download(be, o->dl, dl, sizeof o->dl);
    sy_test_download(be, o->probs, probs, sizeof o->probs);
    sy_test_download(be, o->gate, gate, sizeof o->gate);
    sy_test_download(be, o->lse, lse, sizeof o->lse);
    sy_test_download(be, o->grp, grp, sizeof o->grp);
    sy_test_download(be, o->p, p, sizeof o->p);
    sy_test_download(be, o->cp, cp, sizeof o->cp);
    sy_test_download(be, o->expert, expert, sizeof o->expert);
    sy_test_download(be, &o->sumsq, sumsq, sizeof(double));
    void *bufs[] = {x, W, w, g, p, m, v, tgt, y, ln, mean, rstd, dl, probs, gate, lse, grp, cp,
                    expert, sumsq};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->free(be, bufs[i]);
}

static void test_same_bits_as_plain(void **state) {
    (void)state;
    static inputs in;
    static outputs a, b;
    fill(in.x, N * IN, -2, 2);
    fill(in.W, G * OUT * IN, -1, 1);
    fill(in.w, IN, 0.5, 1.5);
    fill(in.g, N * IN, -1, 1);
    fill(in.m, N * IN, -0.1, 0.1);
    fill(in.v, N * IN, 0, 0.01);
    for (int i = 0; i < N; i++) in.tgt[i] = (int32_t)(urand() * OUT);
    memset(&a, 0x55, sizeof a); /* padding and unwritten entries compare equal only if written */
    memset(&b, 0x55, sizeof b);
    run_ops(g_plain, &in, &a);
    run_ops(g_poison, &in, &b);
    assert_memory_equal(&a, &b, sizeof a);
    /* and the ops did run: outputs are not the fill pattern or zero */
    assert_true(a.sumsq > 0.0 && a.xent > 0.0 && a.y[0] != 0.0f && a.grp[20 * OUT] != 0.0f);
    assert_true(a.cp[5] == 0.0f && a.cp[11] == 0.0f && a.cp[12] == a.p[12]);
}

/* ---------------------------------------------------------------- plain host memory */

/* The wrapper's ops also take plain host pointers (stripping the tag is idempotent). */
static void test_host_pointers_pass_through(void **state) {
    (void)state;
    float x[8], y[8], want[8];
    fill(x, 8, -1, 1);
    fill(y, 8, -1, 1);
    for (int i = 0; i < 8; i++) want[i] = y[i] + x[i];
    g_poison->add_inplace(g_poison, y, x, 8);
    assert_memory_equal(y, want, sizeof y);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_env_selects_poison),
        cmocka_unit_test(test_host_access_faults),
        cmocka_unit_test(test_same_bits_as_plain),
        cmocka_unit_test(test_host_pointers_pass_through),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
