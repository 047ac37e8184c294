/* sy_parallel_for (src/base/parallel.c): every index exactly once whatever the thread count,
 * the first error returned with its message, stop_on_error ending the handing out of indexes,
 * and the items really running side by side (the checkpoint writer and S3 multipart rely on
 * it to overlap uploads). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

#include "base/parallel.h"
#include "sy_test.h"

#define N_MAX 200

typedef struct {
    atomic_int runs[N_MAX];
    int fail_at;           /* -1: none */
    atomic_int active, max_active;
    int want_together;     /* > 0: each item waits (at most 5 s) until this many run at once */
} ctx_t;

static sy_status item(void *arg, size_t i) {
    ctx_t *c = arg;
    atomic_fetch_add(&c->runs[i], 1);
    int now = atomic_fetch_add(&c->active, 1) + 1, m = atomic_load(&c->max_active);
    while (now > m && !atomic_compare_exchange_weak(&c->max_active, &m, now)) {
    }
    for (int k = 0; c->want_together > 0 && atomic_load(&c->max_active) < c->want_together && k < 5000; k++)
        usleep(1000);
    atomic_fetch_sub(&c->active, 1);
    if ((int)i == c->fail_at) return sy_err_set(SY_EIO, "item %zu failed on purpose", i);
    return SY_OK;
}

static void test_every_index_once(void **state) {
    (void)state;
    static const int threads[] = {1, 2, 3, 4, 8, 64, 1000};
    static const size_t ns[] = {0, 1, 2, 7, 64, N_MAX};
    for (size_t a = 0; a < sizeof threads / sizeof *threads; a++)
        for (size_t b = 0; b < sizeof ns / sizeof *ns; b++) {
            ctx_t c;
            memset(&c, 0, sizeof c);
            c.fail_at = -1;
            assert_int_equal(sy_parallel_for(threads[a], ns[b], true, item, &c), SY_OK);
            for (size_t i = 0; i < N_MAX; i++) assert_int_equal(atomic_load(&c.runs[i]), i < ns[b] ? 1 : 0);
        }
}

static void test_first_error(void **state) {
    (void)state;
    /* one thread: indexes in order, nothing after the failure with stop_on_error */
    ctx_t c;
    memset(&c, 0, sizeof c);
    c.fail_at = 5;
    assert_int_equal(sy_parallel_for(1, 50, true, item, &c), SY_EIO);
    assert_non_null(strstr(sy_err_msg(), "item 5 failed on purpose"));
    for (size_t i = 0; i < 50; i++) assert_int_equal(atomic_load(&c.runs[i]), i <= 5 ? 1 : 0);
    /* without stop_on_error every item runs, the error is still returned */
    for (int t = 1; t <= 4; t++) {
        memset(&c, 0, sizeof c);
        c.fail_at = 5;
        sy_err_clear();
        assert_int_equal(sy_parallel_for(t, 50, false, item, &c), SY_EIO);
        assert_non_null(strstr(sy_err_msg(), "item 5 failed on purpose"));
        for (size_t i = 0; i < 50; i++) assert_int_equal(atomic_load(&c.runs[i]), 1);
    }
    assert_int_equal(sy_parallel_for(2, 3, true, NULL, NULL), SY_EINVAL);
}

static void test_side_by_side(void **state) {
    (void)state;
    ctx_t c;
    memset(&c, 0, sizeof c);
    c.fail_at = -1;
    c.want_together = 4;
    assert_int_equal(sy_parallel_for(4, 8, true, item, &c), SY_OK);
    assert_int_equal(atomic_load(&c.max_active), 4); /* 4 items at once, never more */
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_index_once),
        cmocka_unit_test(test_first_error),
        cmocka_unit_test(test_side_by_side),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
