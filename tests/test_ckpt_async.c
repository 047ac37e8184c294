/* Asynchronous checkpoint saver and the distributed-save API: async == sync bit for bit,
 * snapshot semantics, on_busy skip / wait, background failures, retention after commit, and
 * two "ranks" writing disjoint parts + one commit. A store wrapper (sy_store_wrap over a local
 * store) delays, blocks or fails puts on demand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend/backend.h"
#include "storage/ckpt.h"
#include "worker/ckpt_async.h"
#include "base/config.h"
#include "model/model.h"
#include "model/model_ckpt.h"
#include "model/optim.h"
#include "storage/store.h"

#define SY_TESTDIR_PREFIX "/tmp/sy-ckpt-async-"
#include "sy_test.h"

/* ---------------------------------------------------------------- a controllable store */

typedef struct {
    sy_store_t *inner;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int blocked;        /* puts wait while set */
    int in_put;         /* puts currently waiting/running */
    int delay_ms;       /* sleep before each put */
    char fail_sub[64];  /* puts of keys containing this fail with SY_EIO */
    int puts;
} ctl_store;

static void ms_sleep(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static sy_status ctl_put(void *impl, const char *key, const void *buf, size_t len, int if_absent) {
    ctl_store *c = impl;
    pthread_mutex_lock(&c->mu);
    c->in_put++;
    pthread_cond_broadcast(&c->cv);
    while (c->blocked) pthread_cond_wait(&c->cv, &c->mu);
    int delay = c->delay_ms, fail = c->fail_sub[0] && strstr(key, c->fail_sub);
    c->puts++;
    pthread_mutex_unlock(&c->mu);
    if (delay) ms_sleep(delay);
    sy_status rc = fail ? sy_err_set(SY_EIO, "injected put failure on %s", key)
                        : if_absent ? sy_store_put_if_absent(c->inner, key, buf, len)
                                    : sy_store_put(c->inner, key, buf, len);
    pthread_mutex_lock(&c->mu);
    c->in_put--;
    pthread_mutex_unlock(&c->mu);
    return rc;
}
static sy_status ctl_get(void *impl, const char *key, void **buf, size_t *len) {
    return sy_store_get(((ctl_store *)impl)->inner, key, buf, len);
}
static sy_status ctl_get_range(void *impl, const char *key, uint64_t off, size_t len, void *buf) {
    return sy_store_get_range(((ctl_store *)impl)->inner, key, off, len, buf);
}
static sy_status ctl_head(void *impl, const char *key, uint64_t *size) {
    return sy_store_head(((ctl_store *)impl)->inner, key, size);
}
static sy_status ctl_list(void *impl, const char *prefix, char ***keys, size_t *n) {
    return sy_store_list(((ctl_store *)impl)->inner, prefix, keys, n);
}
static sy_status ctl_del(void *impl, const char *key) { return sy_store_delete(((ctl_store *)impl)->inner, key); }
static void ctl_destroy(void *impl) {
    ctl_store *c = impl;
    sy_store_destroy(&c->inner);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c);
}
static const sy_store_ops ctl_ops = {.put = ctl_put, .get = ctl_get, .get_range = ctl_get_range, .head = ctl_head,
                                     .list = ctl_list, .del = ctl_del, .destroy = ctl_destroy}; /* no putv: the front end concatenates */

static sy_store_t *open_plain(const char *sub) {
    char url[400];
    snprintf(url, sizeof url, "%s/%s", tmpdir, sub);
    sy_store_t *s = NULL;
    assert_int_equal(sy_store_open(url, &s), SY_OK);
    return s;
}

static sy_store_t *open_ctl(const char *sub, ctl_store **ctl) {
    ctl_store *c = calloc(1, sizeof *c);
    assert_non_null(c);
    c->inner = open_plain(sub);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    sy_store_t *s = NULL;
    assert_int_equal(sy_store_wrap(&ctl_ops, c, "ctl://test", &s), SY_OK);
    *ctl = c;
    return s;
}

static void ctl_set_blocked(ctl_store *c, int b) {
    pthread_mutex_lock(&c->mu);
    c->blocked = b;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
}
static void ctl_wait_in_put(ctl_store *c) {
    pthread_mutex_lock(&c->mu);
    while (c->in_put == 0) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

/* ---------------------------------------------------------------- a small model */

typedef struct {
    sy_config_t cfg;
    sy_backend_t *be;
    sy_model_t *m;
    sy_adamw_t *opt;
} small_model;

static void fill_seeded(float *x, size_t n, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 - 0.5);
    }
}
/* fill_seeded into a backend buffer (by upload). */
static void upload_seeded(sy_backend_t *be, float *buf, size_t n, uint64_t seed) {
    float *x = malloc(n * sizeof(float));
    assert_non_null(x);
    fill_seeded(x, n, seed);
    be->upload(be, buf, x, n * sizeof(float));
    free(x);
}

static void small_new(small_model *sm, uint64_t seed) {
    memset(sm, 0, sizeof *sm);
    assert_int_equal(sy_config_defaults(&sm->cfg), SY_OK);
    const char *sets[] = {"model.d_model=32", "model.n_layers=2", "model.d_ff=64", "model.seq_len=16",
                          "model.n_experts=4", "model.n_heads=4", "train.micro_batch_seqs=2",
                          "train.global_batch_seqs=4", "train.threads=1"};
    for (size_t i = 0; i < sizeof sets / sizeof sets[0]; i++) assert_int_equal(sy_config_set(&sm->cfg, sets[i]), SY_OK);
    assert_int_equal(sy_config_validate(&sm->cfg), SY_OK);
    assert_int_equal(sy_backend_cpu_new(1, false, &sm->be), SY_OK);
    sy_model_dims d = sy_model_dims_from_config(&sm->cfg);
    assert_int_equal(sy_model_new(&d, sm->be, &sm->m), SY_OK);
    assert_int_equal(sy_adamw_new(sm->m, &sm->cfg, &sm->opt), SY_OK);
    size_t n = sy_model_numel(sm->m);
    upload_seeded(sm->be, sy_model_params(sm->m), n, seed);
    upload_seeded(sm->be, sy_adamw_m(sm->opt), n, seed + 1);
    upload_seeded(sm->be, sy_adamw_v(sm->opt), n, seed + 2);
    sy_adamw_set_t_count(sm->opt, (int64_t)(seed % 1000) + 3);
}

static void small_free(small_model *sm) {
    sy_adamw_destroy(&sm->opt);
    sy_model_destroy(&sm->m);
    sy_backend_destroy(&sm->be);
    sy_config_free(&sm->cfg);
}

/* Copies of the three state buffers, to compare after loads. */
typedef struct {
    float *p, *m, *v;
    size_t n;
    int64_t t;
} state_copy;

static state_copy copy_state(small_model *sm) {
    state_copy c;
    c.n = sy_model_numel(sm->m);
    c.p = malloc(c.n * 4), c.m = malloc(c.n * 4), c.v = malloc(c.n * 4);
    assert_true(c.p && c.m && c.v);
    sy_test_download(sm->be, c.p, sy_model_params(sm->m), c.n * 4);
    sy_test_download(sm->be, c.m, sy_adamw_m(sm->opt), c.n * 4);
    sy_test_download(sm->be, c.v, sy_adamw_v(sm->opt), c.n * 4);
    c.t = sy_adamw_t_count(sm->opt);
    return c;
}
static void free_state(state_copy *c) { free(c->p), free(c->m), free(c->v); }

/* Loads checkpoint `step` into a fresh model and checks it equals `want` bit for bit. */
static void assert_ckpt_equals(sy_store_t *st, const char *run, int64_t step, const state_copy *want) {
    small_model f;
    small_new(&f, 999);
    assert_int_equal(sy_model_ckpt_load(st, run, step, f.m, f.opt, NULL), SY_OK);
    assert_int_equal(sy_model_numel(f.m), want->n);
    state_copy got = copy_state(&f);
    assert_memory_equal(got.p, want->p, want->n * 4);
    assert_memory_equal(got.m, want->m, want->n * 4);
    assert_memory_equal(got.v, want->v, want->n * 4);
    assert_int_equal(got.t, want->t);
    free_state(&got);
    small_free(&f);
}

static int committed(sy_store_t *st, const char *run, int64_t step) {
    char key[512];
    assert_int_equal(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST), SY_OK);
    return sy_store_head(st, key, NULL) == SY_OK;
}

/* ---------------------------------------------------------------- tests */

static void test_async_equals_sync(void **state) {
    (void)state;
    small_model sm;
    small_new(&sm, 1);
    state_copy want = copy_state(&sm);
    sy_store_t *a = open_plain("eq-async"), *b = open_plain("eq-sync");
    sy_ckpt_saver_t *sv = NULL;
    assert_int_equal(sy_ckpt_saver_new(a, "run", 3, SY_ONBUSY_WAIT, &sv), SY_OK);
    json_t *extra = json_pack("{s:s}", "note", "x");
    double stall = -1;
    assert_int_equal(sy_ckpt_saver_submit(sv, 7, sm.m, sm.opt, extra, &stall), SY_OK);
    assert_true(stall >= 0);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    assert_int_equal(sy_model_ckpt_save(b, "run", 7, sm.m, sm.opt, extra), SY_OK);
    json_decref(extra);

    json_t *ma = NULL, *mb = NULL;
    assert_int_equal(sy_ckpt_read_manifest(a, "run", 7, &ma), SY_OK);
    assert_int_equal(sy_ckpt_read_manifest(b, "run", 7, &mb), SY_OK);
    /* same files, same sizes, same checksums; every object byte-identical */
    assert_true(json_equal(json_object_get(ma, "files"), json_object_get(mb, "files")));
    assert_int_equal(json_array_size(json_object_get(ma, "files")), 2 * (4 + 1));
    assert_int_equal(json_integer_value(json_object_get(ma, "optimizer_step")), want.t);
    assert_string_equal(json_string_value(json_object_get(ma, "note")), "x");
    const json_t *fl = json_object_get(ma, "files");
    for (size_t i = 0; i < json_array_size(fl); i++) {
        char key[512];
        void *ba, *bb;
        size_t la, lb;
        assert_int_equal(sy_ckpt_key(key, sizeof key, "run", 7, json_string_value(json_object_get(json_array_get(fl, i), "name"))), SY_OK);
        assert_int_equal(sy_store_get(a, key, &ba, &la), SY_OK);
        assert_int_equal(sy_store_get(b, key, &bb, &lb), SY_OK);
        assert_int_equal(la, lb);
        assert_memory_equal(ba, bb, la);
        free(ba), free(bb);
    }
    json_decref(ma), json_decref(mb);
    assert_ckpt_equals(a, "run", 7, &want);

    sy_ckpt_saver_stats s;
    sy_ckpt_saver_get_stats(sv, &s);
    assert_int_equal(s.saves_done, 1);
    assert_int_equal(s.skipped, 0);
    assert_int_equal(s.last_step, 7);
    assert_true(s.last_upload_ms > 0);
    sy_ckpt_saver_destroy(&sv);
    assert_null(sv);
    sy_store_destroy(&a), sy_store_destroy(&b);
    free_state(&want);
    small_free(&sm);
}

static void test_snapshot_semantics(void **state) {
    (void)state;
    small_model sm;
    small_new(&sm, 2);
    state_copy want = copy_state(&sm);
    ctl_store *c;
    sy_store_t *st = open_ctl("snap", &c);
    c->delay_ms = 20; /* the upload takes a while: we change the model meanwhile */
    sy_ckpt_saver_t *sv = NULL;
    assert_int_equal(sy_ckpt_saver_new(st, "run", 0, SY_ONBUSY_WAIT, &sv), SY_OK);
    const float *sp;
    int64_t sstep;
    assert_int_equal(sy_ckpt_saver_snapshot(sv, &sstep, &sp, NULL, NULL, NULL), SY_ENOTFOUND);
    assert_int_equal(sy_ckpt_saver_submit(sv, 3, sm.m, sm.opt, NULL, NULL), SY_OK);
    /* training goes on: the live state changes while the upload runs */
    upload_seeded(sm.be, sy_model_params(sm.m), want.n, 77);
    upload_seeded(sm.be, sy_adamw_m(sm.opt), want.n, 78);
    upload_seeded(sm.be, sy_adamw_v(sm.opt), want.n, 79);
    sy_adamw_set_t_count(sm.opt, 12345);
    const float *sm_, *sv_;
    int64_t st_t;
    assert_int_equal(sy_ckpt_saver_snapshot(sv, &sstep, &sp, &sm_, &sv_, &st_t), SY_OK);
    assert_int_equal(sstep, 3);
    assert_int_equal(st_t, want.t);
    assert_memory_equal(sp, want.p, want.n * 4);
    assert_memory_equal(sm_, want.m, want.n * 4);
    assert_memory_equal(sv_, want.v, want.n * 4);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    assert_ckpt_equals(st, "run", 3, &want);
    sy_ckpt_saver_destroy(&sv);
    sy_store_destroy(&st);
    free_state(&want);
    small_free(&sm);
}

static void *unblock_later(void *arg) {
    ms_sleep(200);
    ctl_set_blocked(arg, 0);
    return NULL;
}

static void test_on_busy(void **state) {
    (void)state;
    small_model sm;
    small_new(&sm, 3);
    ctl_store *c;
    sy_store_t *st = open_ctl("busy", &c);
    sy_ckpt_saver_t *sv = NULL;

    /* skip: a submit while a save is in flight is counted and not saved */
    assert_int_equal(sy_ckpt_saver_new(st, "run", 0, SY_ONBUSY_SKIP, &sv), SY_OK);
    ctl_set_blocked(c, 1);
    assert_int_equal(sy_ckpt_saver_submit(sv, 1, sm.m, sm.opt, NULL, NULL), SY_OK);
    ctl_wait_in_put(c); /* the upload of step 1 is stuck in the store */
    double stall = -1;
    assert_int_equal(sy_ckpt_saver_submit(sv, 2, sm.m, sm.opt, NULL, &stall), SY_OK);
    assert_true(stall >= 0 && stall < 100);
    sy_ckpt_saver_stats s;
    sy_ckpt_saver_get_stats(sv, &s);
    assert_int_equal(s.skipped, 1);
    assert_int_equal(s.saves_done, 0);
    assert_false(committed(st, "run", 1));
    ctl_set_blocked(c, 0);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    assert_true(committed(st, "run", 1));
    assert_false(committed(st, "run", 2));
    sy_ckpt_saver_get_stats(sv, &s);
    assert_int_equal(s.saves_done, 1);
    assert_int_equal(s.skipped, 1);
    sy_ckpt_saver_destroy(&sv);

    /* wait: the second submit blocks until the first is done, and the stall shows it */
    assert_int_equal(sy_ckpt_saver_new(st, "run", 0, SY_ONBUSY_WAIT, &sv), SY_OK);
    ctl_set_blocked(c, 1);
    assert_int_equal(sy_ckpt_saver_submit(sv, 3, sm.m, sm.opt, NULL, NULL), SY_OK);
    ctl_wait_in_put(c);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, unblock_later, c), 0);
    assert_int_equal(sy_ckpt_saver_submit(sv, 4, sm.m, sm.opt, NULL, &stall), SY_OK);
    assert_true(stall >= 150);
    assert_true(committed(st, "run", 3)); /* done before the second snapshot was taken */
    pthread_join(th, NULL);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    assert_true(committed(st, "run", 4));
    sy_ckpt_saver_get_stats(sv, &s);
    assert_int_equal(s.saves_done, 2);
    assert_int_equal(s.skipped, 0);
    sy_ckpt_saver_destroy(&sv);
    sy_store_destroy(&st);
    small_free(&sm);
}

static void wait_failed(sy_ckpt_saver_t *sv, int64_t n) {
    sy_ckpt_saver_stats s;
    for (int i = 0; i < 2000; i++) {
        sy_ckpt_saver_get_stats(sv, &s);
        if (s.failed >= n) return;
        ms_sleep(5);
    }
    fail_msg("background save did not fail in time");
}

static void test_failing_store(void **state) {
    (void)state;
    small_model sm;
    small_new(&sm, 4);
    state_copy want = copy_state(&sm);
    ctl_store *c;
    sy_store_t *st = open_ctl("fail", &c);
    sy_ckpt_saver_t *sv = NULL;
    assert_int_equal(sy_ckpt_saver_new(st, "run", 2, SY_ONBUSY_WAIT, &sv), SY_OK);

    /* error returned by wait, naming the object; no manifest */
    snprintf(c->fail_sub, sizeof c->fail_sub, "expert-0002.optim");
    assert_int_equal(sy_ckpt_saver_submit(sv, 5, sm.m, sm.opt, NULL, NULL), SY_OK);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_EIO);
    assert_non_null(strstr(sy_err_msg(), "expert-0002.optim"));
    assert_non_null(strstr(sy_err_msg(), "step 5"));
    assert_false(committed(st, "run", 5));
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK); /* returned once */
    char msg[1024];
    assert_int_equal(sy_ckpt_saver_last_error(sv, msg, sizeof msg), SY_EIO);
    assert_non_null(strstr(msg, "expert-0002.optim"));

    /* error returned by the next submit, which still saves */
    assert_int_equal(sy_ckpt_saver_submit(sv, 6, sm.m, sm.opt, NULL, NULL), SY_OK);
    wait_failed(sv, 2);
    c->fail_sub[0] = 0;
    assert_int_equal(sy_ckpt_saver_submit(sv, 7, sm.m, sm.opt, NULL, NULL), SY_EIO);
    assert_non_null(strstr(sy_err_msg(), "step 6"));
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    assert_false(committed(st, "run", 6));
    assert_true(committed(st, "run", 7));
    assert_ckpt_equals(st, "run", 7, &want);
    int64_t latest = -1;
    assert_int_equal(sy_ckpt_latest(st, "run", &latest), SY_OK);
    assert_int_equal(latest, 7);

    /* a failing manifest put (the commit itself) leaves no manifest either */
    snprintf(c->fail_sub, sizeof c->fail_sub, "MANIFEST");
    assert_int_equal(sy_ckpt_saver_submit(sv, 8, sm.m, sm.opt, NULL, NULL), SY_OK);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_EIO);
    assert_false(committed(st, "run", 8));
    sy_ckpt_saver_stats s;
    sy_ckpt_saver_get_stats(sv, &s);
    assert_int_equal(s.failed, 3);
    assert_int_equal(s.saves_done, 1);
    sy_ckpt_saver_destroy(&sv);
    sy_store_destroy(&st);
    free_state(&want);
    small_free(&sm);
}

static void test_retention(void **state) {
    (void)state;
    small_model sm;
    small_new(&sm, 5);
    sy_store_t *st = open_plain("retain");
    sy_ckpt_saver_t *sv = NULL;
    assert_int_equal(sy_ckpt_saver_new(st, "run", 2, SY_ONBUSY_WAIT, &sv), SY_OK);
    state_copy last = {0};
    for (int64_t step = 10; step <= 50; step += 10) {
        upload_seeded(sm.be, sy_model_params(sm.m), sy_model_numel(sm.m), (uint64_t)step);
        if (step == 50) last = copy_state(&sm);
        assert_int_equal(sy_ckpt_saver_submit(sv, step, sm.m, sm.opt, NULL, NULL), SY_OK);
    }
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    sy_ckpt_step_info *steps = NULL;
    size_t n = 0;
    assert_int_equal(sy_ckpt_list(st, "run", &steps, &n), SY_OK);
    assert_int_equal(n, 2);
    assert_int_equal(steps[0].step, 50);
    assert_int_equal(steps[1].step, 40);
    assert_true(steps[0].committed && steps[1].committed);
    free(steps);
    assert_ckpt_equals(st, "run", 50, &last);
    sy_ckpt_saver_destroy(&sv);
    sy_store_destroy(&st);
    free_state(&last);
    small_free(&sm);
}

static void test_two_ranks_commit(void **state) {
    (void)state;
    small_model sm;
    small_new(&sm, 6);
    state_copy want = copy_state(&sm);
    sy_store_t *st = open_plain("ranks");
    const int E = 4;
    bool mask0[4] = {true, true, false, false}, mask1[4] = {false, false, true, true};
    /* rank 0 writes dense + experts 0-1, rank 1 writes experts 2-3 (its plan without dense) */
    sy_model_ckpt_plan p0, p1;
    /* a plan reads host buffers: the downloaded state */
    assert_int_equal(sy_model_ckpt_plan_new(sm.m, want.p, want.m, want.v, mask0, &p0), SY_OK);
    assert_int_equal(sy_model_ckpt_plan_new(sm.m, want.p, want.m, want.v, mask1, &p1), SY_OK);
    assert_int_equal(p0.n, 2 + 2 * 2);
    assert_int_equal(p1.n, 2 + 2 * 2);
    assert_string_equal(p1.groups[0].file, "dense.safetensors"); /* dense always included... */
    json_t *f0 = NULL, *f1 = NULL;
    assert_int_equal(sy_ckpt_write_part(st, "run", 9, p0.groups, p0.n, &f0), SY_OK);
    assert_int_equal(sy_ckpt_write_part(st, "run", 9, p1.groups + 2, p1.n - 2, &f1), SY_OK); /* ...rank 1 skips it */
    assert_int_equal(json_array_size(f0), 6);
    assert_int_equal(json_array_size(f1), 4);
    assert_false(committed(st, "run", 9)); /* parts alone are not a checkpoint */
    int64_t latest;
    assert_int_equal(sy_ckpt_latest(st, "run", &latest), SY_ENOTFOUND);

    json_t *all = json_array();
    json_array_extend(all, f0);
    json_array_extend(all, f1);
    json_t *extra = sy_model_ckpt_extra(NULL, want.t);

    /* listing a file nobody wrote is refused, and commits nothing */
    json_t *bogus = json_deep_copy(all);
    json_array_append_new(bogus, json_pack("{s:s,s:i,s:s}", "name", "expert-0009.safetensors", "size", 10, "sha256",
                                           "0000000000000000000000000000000000000000000000000000000000000000"));
    assert_int_equal(sy_ckpt_commit(st, "run", 9, bogus, extra), SY_ENOTFOUND);
    assert_non_null(strstr(sy_err_msg(), "expert-0009"));
    assert_false(committed(st, "run", 9));
    json_decref(bogus);
    /* a wrong size is refused too */
    bogus = json_deep_copy(all);
    json_object_set_new(json_array_get(bogus, 0), "size", json_integer(1));
    assert_int_equal(sy_ckpt_commit(st, "run", 9, bogus, extra), SY_ECORRUPT);
    assert_false(committed(st, "run", 9));
    json_decref(bogus);
    /* a file named twice is refused */
    bogus = json_deep_copy(all);
    json_array_append(bogus, json_array_get(bogus, 0));
    assert_int_equal(sy_ckpt_commit(st, "run", 9, bogus, extra), SY_EINVAL);
    json_decref(bogus);

    assert_int_equal(sy_ckpt_commit(st, "run", 9, all, extra), SY_OK);
    assert_true(committed(st, "run", 9));
    assert_int_equal(sy_ckpt_commit(st, "run", 9, all, extra), SY_EEXIST);
    json_t *f2 = NULL;
    assert_int_equal(sy_ckpt_write_part(st, "run", 9, p0.groups, 1, &f2), SY_EEXIST);
    assert_null(f2);
    json_t *man = NULL;
    assert_int_equal(sy_ckpt_read_manifest(st, "run", 9, &man), SY_OK);
    assert_int_equal(json_array_size(json_object_get(man, "files")), 2 * (E + 1));
    json_decref(man);
    assert_int_equal(sy_ckpt_latest(st, "run", &latest), SY_OK);
    assert_int_equal(latest, 9);
    assert_ckpt_equals(st, "run", 9, &want);
    /* and a rank that owns experts 2-3 can restore just those */
    small_model r;
    small_new(&r, 1234);
    assert_int_equal(sy_model_ckpt_load(st, "run", 9, r.m, r.opt, mask1), SY_OK);
    state_copy got = copy_state(&r);
    for (int i = 0; i < sy_model_n_params(r.m); i++) {
        const sy_param_t *p = sy_model_param(r.m, i);
        int same = !memcmp(got.p + p->offset, want.p + p->offset, p->numel * 4);
        assert_int_equal(same, p->expert < 0 || mask1[p->expert]);
    }
    free_state(&got);
    small_free(&r);

    json_decref(extra);
    json_decref(all);
    json_decref(f0);
    json_decref(f1);
    sy_model_ckpt_plan_free(&p0);
    sy_model_ckpt_plan_free(&p1);
    sy_store_destroy(&st);
    free_state(&want);
    small_free(&sm);
}

static void test_bad_args(void **state) {
    (void)state;
    sy_store_t *st = open_plain("args");
    sy_ckpt_saver_t *sv = NULL;
    assert_int_equal(sy_ckpt_saver_new(st, "bad run", 1, SY_ONBUSY_WAIT, &sv), SY_EINVAL);
    assert_null(sv);
    assert_int_equal(sy_ckpt_saver_new(st, "run", 1, (sy_ckpt_onbusy)7, &sv), SY_EINVAL);
    assert_int_equal(sy_ckpt_saver_new(st, "run", 1, SY_ONBUSY_WAIT, &sv), SY_OK);
    small_model a, b;
    small_new(&a, 1);
    assert_int_equal(sy_ckpt_saver_submit(sv, 1, a.m, a.opt, NULL, NULL), SY_OK);
    /* a model of another size is refused, nothing submitted */
    memset(&b, 0, sizeof b);
    assert_int_equal(sy_config_defaults(&b.cfg), SY_OK);
    assert_int_equal(sy_config_set(&b.cfg, "model.d_model=64"), SY_OK);
    assert_int_equal(sy_backend_cpu_new(1, false, &b.be), SY_OK);
    sy_model_dims d = sy_model_dims_from_config(&b.cfg);
    assert_int_equal(sy_model_new(&d, b.be, &b.m), SY_OK);
    assert_int_equal(sy_ckpt_saver_submit(sv, 2, b.m, NULL, NULL, NULL), SY_EINVAL);
    assert_non_null(strstr(sy_err_msg(), "changed size"));
    json_t *notobj = json_integer(1);
    assert_int_equal(sy_ckpt_saver_submit(sv, 2, a.m, a.opt, notobj, NULL), SY_EINVAL);
    json_decref(notobj);
    assert_int_equal(sy_ckpt_saver_wait(sv), SY_OK);
    assert_false(committed(st, "run", 2));
    sy_ckpt_saver_destroy(&sv);
    sy_ckpt_saver_destroy(&sv); /* NULL-safe */
    sy_model_destroy(&b.m);
    sy_backend_destroy(&b.be);
    sy_config_free(&b.cfg);
    small_free(&a);
    sy_store_destroy(&st);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_async_equals_sync), cmocka_unit_test(test_snapshot_semantics),
        cmocka_unit_test(test_on_busy),           cmocka_unit_test(test_failing_store),
        cmocka_unit_test(test_retention),         cmocka_unit_test(test_two_ranks_commit),
        cmocka_unit_test(test_bad_args),
    };
    return cmocka_run_group_tests(tests, setup_dir, teardown_dir);
}
