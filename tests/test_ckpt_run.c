/* Run ownership in a checkpoint store (src/storage/ckpt_run.h, issue 16 #4): a fresh claim refuses a
 * run with committed checkpoints, --overwrite moves it aside (still loadable under the new
 * name), a writer whose claim was taken over is fenced off (its commit fails with SY_ECONFLICT
 * instead of "already committed; keeping it"), a step committed by another writer is a
 * conflict, a broken step a resume falls back from is retired and rewritten, and the final
 * read-back names a foreign writer. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "storage/ckpt.h"
#include "storage/ckpt_run.h"
#include "storage/store.h"

#define SY_TESTDIR_PREFIX "/tmp/sy-ckptrun-test-"
#include "sy_test.h"

#define RUN "r"

static sy_store_t *open_store(void) {
    char url[300];
    snprintf(url, sizeof url, "file://%s/store", tmpdir);
    sy_store_t *s = NULL;
    assert_int_equal(sy_store_open(url, &s), SY_OK);
    return s;
}

/* Saves checkpoint `step` of RUN (one small tensor whose values encode `value`) as `writer`. */
static sy_status save(sy_store_t *st, int64_t step, const char *writer, float value) {
    float v[8];
    for (int i = 0; i < 8; i++) v[i] = value + (float)i;
    sy_tensor_ref t = {.name = "w", .ndim = 1, .shape = {8}, .data = v};
    sy_ckpt_group g = {.file = "dense.safetensors", .tensors = &t, .n = 1};
    json_t *ex = json_pack("{s:s}", "writer", writer);
    sy_status s = sy_ckpt_save(st, RUN, step, &g, 1, ex);
    json_decref(ex);
    return s;
}

static float load(sy_store_t *st, const char *run, int64_t step) {
    float v[8] = {0};
    sy_tensor_ref t = {.name = "w", .ndim = 1, .shape = {8}, .data = v};
    sy_ckpt_group g = {.file = "dense.safetensors", .tensors = &t, .n = 1};
    assert_int_equal(sy_ckpt_load_group(st, run, step, &g), SY_OK);
    return v[0];
}

static void test_fresh_refuses_committed_run(void **state) {
    (void)state;
    sy_store_t *st = open_store();
    char a[SY_RUN_WRITER_HEX + 1], b[SY_RUN_WRITER_HEX + 1];
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, a, NULL, 0), SY_OK);
    assert_int_equal(strlen(a), SY_RUN_WRITER_HEX);
    assert_int_equal(save(st, 10, a, 1.0f), SY_OK);
    /* a second fresh run of the same name: refused, naming both ways out */
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, b, NULL, 0), SY_EEXIST);
    assert_non_null(strstr(sy_err_msg(), "--resume"));
    assert_non_null(strstr(sy_err_msg(), "--overwrite"));
    assert_non_null(strstr(sy_err_msg(), "step 10"));
    /* the refused claim did not take the run over: A still commits */
    assert_int_equal(save(st, 20, a, 2.0f), SY_OK);
    assert_int_equal(sy_run_verify_checkpoint(st, RUN, 20, a), SY_OK);
    sy_store_destroy(&st);
}

static void test_overwrite_moves_run_aside(void **state) {
    (void)state;
    sy_store_t *st = open_store();
    char a[SY_RUN_WRITER_HEX + 1], b[SY_RUN_WRITER_HEX + 1], moved[300];
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, a, NULL, 0), SY_OK);
    assert_int_equal(save(st, 10, a, 1.0f), SY_OK);
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_OVERWRITE, b, moved, sizeof moved), SY_OK);
    assert_non_null(strstr(moved, RUN ".replaced-"));
    /* the run's name is free and empty; the old run loads under its new name */
    int64_t latest = -1;
    assert_int_equal(sy_ckpt_latest(st, RUN, &latest), SY_ENOTFOUND);
    assert_int_equal(sy_ckpt_latest(st, moved, &latest), SY_OK);
    assert_int_equal(latest, 10);
    assert_true(load(st, moved, 10) == 1.0f);
    /* the new run commits; the old writer is fenced off */
    assert_int_equal(save(st, 10, b, 5.0f), SY_OK);
    assert_int_equal(save(st, 20, a, 2.0f), SY_ECONFLICT);
    assert_non_null(strstr(sy_err_msg(), a));
    assert_true(load(st, RUN, 10) == 5.0f);
    sy_store_destroy(&st);
}

static void test_second_writer_is_fenced(void **state) {
    (void)state;
    sy_store_t *st = open_store();
    char a[SY_RUN_WRITER_HEX + 1], b[SY_RUN_WRITER_HEX + 1];
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, a, NULL, 0), SY_OK);
    /* B takes the run over (a resume, or a second fresh trainer before any commit) */
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, b, NULL, 0), SY_OK);
    assert_string_not_equal(a, b);
    assert_int_equal(sy_run_check_writer(st, RUN, a), SY_ECONFLICT);
    assert_int_equal(save(st, 10, a, 1.0f), SY_ECONFLICT); /* loudly, nothing committed */
    sy_ckpt_step_info *steps = NULL;
    size_t n = 0;
    assert_int_equal(sy_ckpt_list(st, RUN, &steps, &n), SY_OK);
    for (size_t i = 0; i < n; i++) assert_false(steps[i].committed);
    free(steps);
    assert_int_equal(save(st, 10, b, 2.0f), SY_OK);
    /* the same step again: this writer's own commit is kept, another writer's is a conflict */
    assert_int_equal(save(st, 10, b, 2.0f), SY_EEXIST);
    char c[SY_RUN_WRITER_HEX + 1];
    /* the read-back names a checkpoint that is not this writer's */
    assert_int_equal(sy_run_verify_checkpoint(st, RUN, 10, a), SY_ECONFLICT);
    assert_int_equal(sy_run_verify_checkpoint(st, RUN, 10, b), SY_OK);
    /* C takes over; B (fenced) can no longer commit; C rewrites the step B left behind (the
     * owner's history wins, B's manifest is kept aside) */
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_RESUME, c, NULL, 0), SY_OK);
    assert_int_equal(save(st, 20, b, 9.0f), SY_ECONFLICT);
    assert_non_null(strstr(sy_err_msg(), "now owned by writer"));
    assert_int_equal(save(st, 10, c, 3.0f), SY_OK);
    assert_true(load(st, RUN, 10) == 3.0f);
    char key[512];
    uint64_t size = 0;
    assert_int_equal(sy_ckpt_key(key, sizeof key, RUN, 10, "MANIFEST.retired.json"), SY_OK);
    assert_int_equal(sy_store_head(st, key, &size), SY_OK);
    sy_store_destroy(&st);
}

static void test_broken_step_is_retired_and_rewritten(void **state) {
    (void)state;
    sy_store_t *st = open_store();
    char a[SY_RUN_WRITER_HEX + 1], b[SY_RUN_WRITER_HEX + 1], key[512];
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, a, NULL, 0), SY_OK);
    assert_int_equal(save(st, 10, a, 1.0f), SY_OK);
    assert_int_equal(save(st, 20, a, 2.0f), SY_OK);
    /* step 20 loses its data file: committed but broken */
    assert_int_equal(sy_ckpt_key(key, sizeof key, RUN, 20, "dense.safetensors"), SY_OK);
    assert_int_equal(sy_store_delete(st, key), SY_OK);
    int64_t latest = -1;
    assert_int_equal(sy_ckpt_latest(st, RUN, &latest), SY_OK);
    assert_int_equal(latest, 10);
    /* a resume retires it: no longer listed as committed, its manifest kept aside */
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_RESUME, b, NULL, 0), SY_OK);
    sy_ckpt_step_info *steps = NULL;
    size_t n = 0;
    assert_int_equal(sy_ckpt_list(st, RUN, &steps, &n), SY_OK);
    for (size_t i = 0; i < n; i++)
        if (steps[i].step == 20) assert_false(steps[i].committed);
    free(steps);
    uint64_t size = 0;
    assert_int_equal(sy_ckpt_key(key, sizeof key, RUN, 20, "MANIFEST.retired.json"), SY_OK);
    assert_int_equal(sy_store_head(st, key, &size), SY_OK);
    /* reaching step 20 again rewrites it */
    assert_int_equal(save(st, 20, b, 7.0f), SY_OK);
    assert_int_equal(sy_run_verify_checkpoint(st, RUN, 20, b), SY_OK);
    assert_true(load(st, RUN, 20) == 7.0f);
    sy_store_destroy(&st);
}

static void test_broken_step_met_without_resume_is_rewritten(void **state) {
    (void)state;
    sy_store_t *st = open_store();
    char a[SY_RUN_WRITER_HEX + 1], key[512];
    assert_int_equal(sy_run_claim(st, RUN, SY_RUN_FRESH, a, NULL, 0), SY_OK);
    assert_int_equal(save(st, 20, a, 2.0f), SY_OK);
    assert_int_equal(sy_ckpt_key(key, sizeof key, RUN, 20, SY_CKPT_MANIFEST), SY_OK);
    assert_int_equal(sy_store_put(st, key, "{not json", 9), SY_OK);
    assert_int_equal(save(st, 20, a, 4.0f), SY_OK); /* not "already committed; keeping it" */
    assert_true(load(st, RUN, 20) == 4.0f);
    sy_store_destroy(&st);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_fresh_refuses_committed_run, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_overwrite_moves_run_aside, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_second_writer_is_fenced, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_broken_step_is_retired_and_rewritten, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_broken_step_met_without_resume_is_rewritten, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
