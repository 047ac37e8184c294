/* The dashboard's run history (src/coordinator/history.h): one record per step, steps
 * increasing; a replayed step replaces the records from it on; memory stays bounded (the
 * resolution halves when a buffer fills, and the whole run stays covered); the JSON document
 * parses and carries the columns, the imbalance per layer and the load shares. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <stdlib.h>

#include "coordinator/history.h"

#define L 2
#define E 4

static void add(sy_history_t *h, int64_t step, uint64_t gen, const uint64_t *load) {
    sy_history_step s = {.step = step, .time = 1.7e9 + (double)step, .loss = 10.0 / (double)step, .ce = 1, .lr = 1e-3,
                         .grad_norm = 0.5, .tokens_per_s = 1000, .dropped_frac = 0.1, .step_ms = 20, .world = 2,
                         .generation = gen};
    sy_history_add(h, &s, load);
}

static json_t *doc(const sy_history_t *h) {
    char *s = sy_history_json(h);
    assert_non_null(s);
    json_error_t err;
    json_t *j = json_loads(s, 0, &err);
    free(s);
    assert_non_null(j);
    return j;
}

static int64_t row_step(json_t *rows, size_t i) {
    return json_integer_value(json_array_get(json_array_get(rows, i), 0));
}

static void test_columns_imbalance_and_shares(void **s) {
    (void)s;
    sy_history_t *h = NULL;
    assert_int_equal(sy_history_new(L, E, &h), SY_OK);
    const uint64_t load[L * E] = {10, 10, 10, 10, 40, 0, 0, 0};
    add(h, 1, 1, load);
    add(h, 2, 1, NULL); /* counts not usable: imbalance null, no load sample */
    json_t *j = doc(h);
    json_t *cols = json_object_get(j, "columns"), *rows = json_object_get(j, "rows");
    assert_int_equal(json_array_size(cols), 13 + L);
    assert_string_equal(json_string_value(json_array_get(cols, 0)), "step");
    assert_string_equal(json_string_value(json_array_get(cols, 13)), "imbalance_0");
    assert_int_equal(json_array_size(rows), 2);
    json_t *r0 = json_array_get(rows, 0);
    assert_true(fabs(json_number_value(json_array_get(r0, 1)) - 1.7e9 - 1) < 1e-3); /* time keeps its ms */
    assert_true(fabs(json_number_value(json_array_get(r0, 13)) - 1.0) < 1e-6);    /* balanced */
    assert_true(fabs(json_number_value(json_array_get(r0, 14)) - 4.0) < 1e-6);    /* one expert takes all */
    assert_true(json_is_null(json_array_get(json_array_get(rows, 1), 13)));
    json_t *ld = json_object_get(j, "load");
    assert_int_equal(json_array_size(json_object_get(ld, "steps")), 1);
    json_t *sh = json_array_get(json_array_get(json_object_get(ld, "shares"), 0), 1);
    assert_true(fabs(json_number_value(json_array_get(sh, 0)) - 1.0) < 1e-6);
    assert_int_equal(json_integer_value(json_object_get(j, "layers")), L);
    json_decref(j);
    sy_history_destroy(&h);
    sy_history_destroy(&h); /* safe twice */
    assert_null(h);
}

static void test_replayed_steps_replace(void **s) {
    (void)s;
    sy_history_t *h = NULL;
    assert_int_equal(sy_history_new(L, E, &h), SY_OK);
    const uint64_t load[L * E] = {1, 2, 3, 4, 5, 6, 7, 8};
    for (int64_t k = 1; k <= 12; k++) add(h, k, 1, load);
    uint64_t v = sy_history_version(h);
    for (int64_t k = 11; k <= 14; k++) add(h, k, 2, load); /* restored from step 10 */
    assert_true(sy_history_version(h) > v);
    json_t *j = doc(h);
    json_t *rows = json_object_get(j, "rows");
    assert_int_equal(json_array_size(rows), 14);
    for (size_t i = 0; i < 14; i++) assert_int_equal(row_step(rows, i), (int64_t)i + 1);
    assert_int_equal(json_integer_value(json_array_get(json_array_get(rows, 11), 12)), 2); /* generation */
    assert_int_equal(json_integer_value(json_array_get(json_array_get(rows, 9), 12)), 1);
    json_decref(j);
    sy_history_destroy(&h);
}

static void test_bounded_and_whole_run(void **s) {
    (void)s;
    sy_history_t *h = NULL;
    assert_int_equal(sy_history_new(L, E, &h), SY_OK);
    const uint64_t load[L * E] = {1, 2, 3, 4, 5, 6, 7, 8};
    const int64_t n = 3 * SY_HISTORY_STEPS + 5;
    for (int64_t k = 1; k <= n; k++) add(h, k, 1, load);
    json_t *j = doc(h);
    json_t *rows = json_object_get(j, "rows");
    size_t nr = json_array_size(rows);
    int64_t stride = json_integer_value(json_object_get(j, "stride"));
    assert_true(nr <= SY_HISTORY_STEPS && nr >= SY_HISTORY_STEPS / 2);
    assert_int_equal(stride, 4);
    assert_true(row_step(rows, 0) <= stride);      /* the start of the run is still there */
    assert_true(row_step(rows, nr - 1) > n - stride); /* and its end */
    for (size_t i = 1; i < nr; i++) assert_int_equal(row_step(rows, i) - row_step(rows, i - 1), stride);
    json_t *ls = json_object_get(json_object_get(j, "load"), "steps");
    assert_true(json_array_size(ls) <= SY_HISTORY_LOAD_SAMPLES && json_array_size(ls) >= SY_HISTORY_LOAD_SAMPLES / 2);
    assert_true(json_integer_value(json_array_get(ls, 0)) <= json_integer_value(json_object_get(json_object_get(j, "load"), "stride")));
    json_decref(j);
    sy_history_destroy(&h);
}

static void test_no_switch_layers(void **s) {
    (void)s;
    sy_history_t *h = NULL;
    assert_int_equal(sy_history_new(0, 0, &h), SY_OK);
    add(h, 1, 1, NULL);
    json_t *j = doc(h);
    assert_int_equal(json_array_size(json_object_get(j, "columns")), 13);
    assert_int_equal(json_array_size(json_array_get(json_object_get(j, "rows"), 0)), 13);
    json_decref(j);
    sy_history_destroy(&h);
    assert_int_not_equal(sy_history_new(-1, 4, &h), SY_OK);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_columns_imbalance_and_shares),
        cmocka_unit_test(test_replayed_steps_replace),
        cmocka_unit_test(test_bounded_and_whole_run),
        cmocka_unit_test(test_no_switch_layers),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
