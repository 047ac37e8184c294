/* The coordinator's checkpoint committer thread (src/coordinator/committer.h): commits in submission
 * order off the calling thread, results through the eventfd, retention after each good commit,
 * errors carried back with their message, EEXIST for a step committed twice, and destroy
 * finishing queued work. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage/ckpt.h"
#include "coordinator/committer.h"
#include "storage/store.h"

#define RUN "crun"

#define SY_TESTDIR_PREFIX "/tmp/sy-committer-test-"
#include "sy_test.h"

static sy_store_t *open_store(const char *sub) {
    char url[300];
    snprintf(url, sizeof url, "file://%s/%s", tmpdir, sub);
    sy_store_t *s = NULL;
    assert_int_equal(sy_store_open(url, &s), SY_OK);
    return s;
}

/* Writes the data file of checkpoint `step` (one tensor whose values encode the step) and
 * returns its file list. */
static json_t *write_part(sy_store_t *st, int64_t step) {
    float v[16];
    for (int i = 0; i < 16; i++) v[i] = (float)(step * 100 + i);
    int64_t shape[1] = {16};
    sy_tensor_ref t = {.name = "w", .data = v, .ndim = 1};
    memcpy(t.shape, shape, sizeof shape);
    sy_ckpt_group g = {.file = "dense.safetensors", .tensors = &t, .n = 1};
    json_t *files = NULL;
    assert_int_equal(sy_ckpt_write_part(st, RUN, step, &g, 1, &files), SY_OK);
    return files;
}

static void submit(sy_committer_t *cm, sy_store_t *st, int64_t step, json_t *files) {
    json_t *ex = json_pack("{s:I}", "optimizer_step", (json_int_t)step);
    if (!files) files = write_part(st, step);
    assert_int_equal(sy_committer_submit(cm, step, 7, 1000 + step, &files, &ex), SY_OK);
    assert_null(files);
    assert_null(ex);
}

/* Waits (bounded) for the eventfd and takes one result. */
static sy_commit_result take(sy_committer_t *cm) {
    sy_commit_result r;
    for (int i = 0; i < 200; i++) {
        if (sy_committer_next(cm, &r)) return r;
        struct pollfd p = {.fd = sy_committer_fd(cm), .events = POLLIN};
        poll(&p, 1, 50);
    }
    fail_msg("no commit result within 10 s");
    return r;
}

static void test_order_results_retention(void **state) {
    (void)state;
    sy_store_t *st = open_store("a");
    sy_committer_t *cm = NULL;
    assert_int_equal(sy_committer_new(st, RUN, 2, &cm), SY_OK);
    assert_int_equal(sy_committer_in_flight(cm), 0);
    sy_commit_result r;
    assert_false(sy_committer_next(cm, &r)); /* nothing yet: returns at once */
    for (int64_t s = 5; s <= 20; s += 5) submit(cm, st, s, NULL);
    assert_int_equal(sy_committer_in_flight(cm), 4);
    for (int64_t s = 5; s <= 20; s += 5) {
        r = take(cm);
        assert_int_equal(r.step, s); /* submission order */
        assert_int_equal(r.status, SY_OK);
        assert_int_equal(r.generation, 7);
        assert_int_equal(r.since_ms, 1000 + s);
        assert_int_equal(r.n_files, 1);
        assert_false(r.retain_failed);
        assert_true(r.commit_ms >= 0);
    }
    assert_int_equal(sy_committer_in_flight(cm), 0);
    /* the fd is quiet once every result is taken */
    struct pollfd p = {.fd = sy_committer_fd(cm), .events = POLLIN};
    assert_int_equal(poll(&p, 1, 0), 0);
    /* committed, verified, and retention kept the newest 2 */
    int64_t latest = -1;
    assert_int_equal(sy_ckpt_latest(st, RUN, &latest), SY_OK);
    assert_int_equal(latest, 20);
    sy_ckpt_step_info *info = NULL;
    size_t n = 0;
    assert_int_equal(sy_ckpt_list(st, RUN, &info, &n), SY_OK);
    assert_int_equal(n, 2);
    assert_int_equal(info[0].step, 20);
    assert_int_equal(info[1].step, 15);
    free(info);
    json_t *m = NULL;
    assert_int_equal(sy_ckpt_read_manifest(st, RUN, 15, &m), SY_OK);
    assert_int_equal(json_integer_value(json_object_get(m, "optimizer_step")), 15);
    json_decref(m);

    /* the same step again (its files as listed by the manifest): EEXIST, the first commit stands */
    assert_int_equal(sy_ckpt_read_manifest(st, RUN, 20, &m), SY_OK);
    json_t *again = json_deep_copy(json_object_get(m, "files"));
    json_decref(m);
    submit(cm, st, 20, again);
    r = take(cm);
    assert_int_equal(r.status, SY_EEXIST);
    sy_committer_destroy(&cm);
    assert_null(cm);
    sy_committer_destroy(&cm);
    sy_store_destroy(&st);
}

static void test_errors_come_back(void **state) {
    (void)state;
    sy_store_t *st = open_store("b");
    sy_committer_t *cm = NULL;
    assert_int_equal(sy_committer_new(st, RUN, 3, &cm), SY_OK);
    /* a file list naming an object nobody wrote: the commit fails and says which */
    json_t *files = json_pack("[{s:s, s:I, s:s}]", "name", "expert-0003.safetensors", "size", (json_int_t)64,
                              "sha256", "0000000000000000000000000000000000000000000000000000000000000000");
    submit(cm, st, 5, files);
    sy_commit_result r = take(cm);
    assert_int_not_equal(r.status, SY_OK);
    assert_int_not_equal(r.status, SY_EEXIST);
    assert_non_null(strstr(r.error, "expert-0003.safetensors"));
    int64_t latest = -1;
    assert_int_equal(sy_ckpt_latest(st, RUN, &latest), SY_ENOTFOUND);
    sy_committer_destroy(&cm);
    sy_store_destroy(&st);
}

static void test_destroy_finishes_queued(void **state) {
    (void)state;
    sy_store_t *st = open_store("c");
    sy_committer_t *cm = NULL;
    assert_int_equal(sy_committer_new(st, RUN, 10, &cm), SY_OK);
    for (int64_t s = 1; s <= 6; s++) submit(cm, st, s, NULL);
    sy_committer_destroy(&cm); /* results dropped, but every queued commit is made */
    sy_ckpt_step_info *info = NULL;
    size_t n = 0;
    assert_int_equal(sy_ckpt_list(st, RUN, &info, &n), SY_OK);
    assert_int_equal(n, 6);
    for (size_t i = 0; i < n; i++) assert_true(info[i].committed);
    free(info);
    /* wait() returns once everything submitted is done */
    assert_int_equal(sy_committer_new(st, RUN, 10, &cm), SY_OK);
    submit(cm, st, 7, NULL);
    sy_committer_wait(cm);
    assert_int_equal(sy_committer_in_flight(cm), 1);
    struct pollfd p = {.fd = sy_committer_fd(cm), .events = POLLIN};
    assert_int_equal(poll(&p, 1, 0), 1);
    sy_commit_result r;
    assert_true(sy_committer_next(cm, &r));
    assert_int_equal(r.step, 7);
    assert_int_equal(r.status, SY_OK);
    sy_committer_destroy(&cm);
    sy_store_destroy(&st);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_order_results_retention, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_errors_come_back, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_destroy_finishes_queued, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
