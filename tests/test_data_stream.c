/* The streaming reader's parts that need no S3 server: the store's pinned range read (local
 * backend), the on-disk range cache (hits, keys,
 * torn and foreign entries, a dead writer's tmp file, the LRU bound) and the prefetcher (the
 * same tokens as reading in the step, for every rank of several worlds, across plan changes and
 * a step going back as after a restore). The S3 side is tests/py/test_data_stream.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define SY_TESTDIR_PREFIX "/tmp/sy-data-stream-test-"
#include "sy_test.h"

#include "data/data.h"
#include "data/data_cache.h"
#include "storage/store.h"

#define URL "s3://bucket/corpus/train_000001.bin"
#define ETAG "\"0123456789abcdef\""

static int n_files_named(const char *root, const char *needle);

static void fill_bytes(uint8_t *b, size_t n, unsigned seed) {
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)(seed * 31u + i * 7u);
}

/* The single entry file under the cache (there is one in these tests). */
static char found[1024];
static int find_entry(const char *p, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    if (type == FTW_F && ftw->level == 4) snprintf(found, sizeof found, "%s", p);
    return 0;
}

static void test_cache_round_trip(void **state) {
    (void)state;
    sy_data_cache_t *c = NULL;
    assert_int_equal(sy_data_cache_open(tmpdir, 1u << 20, &c), SY_OK);
    uint8_t a[258], b[258];
    fill_bytes(a, sizeof a, 1);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 1024, sizeof a, b), 0);
    sy_data_cache_put(c, URL, ETAG, 1024, sizeof a, a);
    memset(b, 0, sizeof b);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 1024, sizeof a, b), 1);
    assert_memory_equal(a, b, sizeof a);
    /* another ETag (the object changed), offset, length or URL is another key */
    assert_int_equal(sy_data_cache_get(c, URL, "\"other\"", 1024, sizeof a, b), 0);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 1026, sizeof a, b), 0);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 1024, sizeof a - 2, b), 0);
    assert_int_equal(sy_data_cache_get(c, URL "x", ETAG, 1024, sizeof a, b), 0);
    sy_data_cache_stats st;
    sy_data_cache_get_stats(c, &st);
    assert_int_equal(st.hits, 1);
    assert_int_equal(st.misses, 5);
    assert_int_equal(st.bytes_written, sizeof a);
    sy_data_cache_destroy(&c);
    /* a second process (here: a second open) sees the entry */
    assert_int_equal(sy_data_cache_open(tmpdir, 1u << 20, &c), SY_OK);
    assert_true(sy_data_cache_bytes(c) >= sizeof a);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 1024, sizeof a, b), 1);
    sy_data_cache_destroy(&c);
    sy_data_cache_destroy(&c); /* safe twice */
}

/* A torn entry (shorter: a crash before its data reached the disk) and a corrupt one (a flipped
 * byte) are misses, counted and deleted; a put afterwards serves again. */
static void test_cache_rejects_torn_and_corrupt(void **state) {
    (void)state;
    sy_data_cache_t *c = NULL;
    assert_int_equal(sy_data_cache_open(tmpdir, 1u << 20, &c), SY_OK);
    uint8_t a[258], b[258];
    fill_bytes(a, sizeof a, 2);
    for (int kind = 0; kind < 2; kind++) {
        sy_data_cache_put(c, URL, ETAG, 4096, sizeof a, a);
        found[0] = 0;
        nftw(tmpdir, find_entry, 16, FTW_PHYS);
        assert_true(found[0]);
        if (kind == 0) {
            assert_int_equal(truncate(found, 32 + 100), 0);
        } else {
            int fd = open(found, O_RDWR);
            assert_true(fd >= 0);
            uint8_t x = 0x5a;
            assert_int_equal(pwrite(fd, &x, 1, 32 + 17), 1);
            close(fd);
        }
        assert_int_equal(sy_data_cache_get(c, URL, ETAG, 4096, sizeof a, b), 0);
        assert_int_not_equal(access(found, F_OK), 0); /* deleted */
    }
    sy_data_cache_stats st;
    sy_data_cache_get_stats(c, &st);
    assert_int_equal(st.rejected, 2);
    sy_data_cache_put(c, URL, ETAG, 4096, sizeof a, a);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 4096, sizeof a, b), 1);
    assert_memory_equal(a, b, sizeof a);
    sy_data_cache_destroy(&c);
}

/* A writer killed mid-entry leaves a tmp file only: no read trusts it, and the next open
 * removes it once its pid is gone. */
static void test_cache_dead_writer(void **state) {
    (void)state;
    sy_data_cache_t *c = NULL;
    assert_int_equal(sy_data_cache_open(tmpdir, 1u << 20, &c), SY_OK);
    sy_data_cache_destroy(&c);
    pid_t pid = fork();
    if (pid == 0) {
        setenv("SY_DATA_CACHE_TEST_CRASH", "1", 1);
        sy_data_cache_t *cc = NULL;
        uint8_t a[258];
        fill_bytes(a, sizeof a, 3);
        if (sy_data_cache_open(tmpdir, 1u << 20, &cc) == SY_OK) sy_data_cache_put(cc, URL, ETAG, 0, sizeof a, a);
        _exit(0); /* not reached: the hook kills the process mid-entry */
    }
    int ws = 0;
    assert_int_equal(waitpid(pid, &ws, 0), pid);
    assert_true(WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL);
    char name[32];
    snprintf(name, sizeof name, "%ld.", (long)pid);
    assert_int_equal(n_files_named(tmpdir, name), 1); /* the half-written tmp file */
    assert_int_equal(sy_data_cache_open(tmpdir, 1u << 20, &c), SY_OK);
    uint8_t b[258];
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 0, sizeof b, b), 0);
    assert_int_equal(n_files_named(tmpdir, name), 0); /* removed by the open */
    sy_data_cache_destroy(&c);
}

/* The bound: entries past it are evicted least recently used first (a hit refreshes). */
static void test_cache_lru_bound(void **state) {
    (void)state;
    sy_data_cache_t *c = NULL;
    const size_t len = 1000, file = len + 32;
    assert_int_equal(sy_data_cache_open(tmpdir, 10 * file, &c), SY_OK);
    uint8_t a[1000], b[1000];
    fill_bytes(a, sizeof a, 4);
    for (int i = 0; i < 30; i++) {
        sy_data_cache_put(c, URL, ETAG, (uint64_t)i * 4096, len, a);
        struct timespec ts = {0, 2000000}; /* distinct mtimes */
        nanosleep(&ts, NULL);
        assert_int_equal(sy_data_cache_get(c, URL, ETAG, 0, len, b), 1); /* entry 0 stays hot */
        nanosleep(&ts, NULL);
    }
    sy_data_cache_trim(c); /* the eviction thread may still be walking: one more, here */
    assert_true(sy_data_cache_bytes(c) <= 10 * file);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 0, len, b), 1);
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 29 * 4096, len, b), 1); /* the newest */
    assert_int_equal(sy_data_cache_get(c, URL, ETAG, 1 * 4096, len, b), 0);  /* an old one went */
    sy_data_cache_stats st;
    sy_data_cache_get_stats(c, &st);
    assert_true(st.evicted >= 20);
    sy_data_cache_destroy(&c);
}

/* ------------------------------------------------------------------ store pin */

/* sy_store_get_range_obj on the local backend: the size and a tag from the same read; a rewrite
 * (same size, other bytes) changes the tag, as a new ETag does on S3. */
static void test_store_range_obj_local(void **state) {
    (void)state;
    sy_store_t *st = NULL;
    assert_int_equal(sy_store_open(tmpdir, &st), SY_OK);
    uint8_t a[300], b[16];
    fill_bytes(a, sizeof a, 5);
    assert_int_equal(sy_store_put(st, "x/obj", a, sizeof a), SY_OK);
    sy_store_obj o1, o2;
    assert_int_equal(sy_store_get_range_obj(st, "x/obj", 10, sizeof b, b, &o1), SY_OK);
    assert_memory_equal(b, a + 10, sizeof b);
    assert_int_equal(o1.size, sizeof a);
    assert_true(o1.etag[0]);
    struct timespec ts = {0, 5000000};
    nanosleep(&ts, NULL);
    fill_bytes(a, sizeof a, 6);
    assert_int_equal(sy_store_put(st, "x/obj", a, sizeof a), SY_OK);
    assert_int_equal(sy_store_get_range_obj(st, "x/obj", 10, sizeof b, b, &o2), SY_OK);
    assert_int_equal(o2.size, sizeof a);
    assert_string_not_equal(o1.etag, o2.etag);
    assert_int_equal(sy_store_get_range_obj(st, "x/obj", 290, sizeof b, b, &o2), SY_EINVAL); /* past the end */
    assert_int_equal(sy_store_get_range_obj(st, "x/none", 0, sizeof b, b, &o2), SY_ENOTFOUND);
    sy_store_destroy(&st);
}

/* ------------------------------------------------------------------ prefetcher */

#define T 16
static int write_shards(char paths[3][512]) {
    const uint64_t counts[3] = {T * 37 + 5, T * 3 + 1, T * 61 + 9};
    for (int s = 0; s < 3; s++) {
        uint16_t *t = malloc(counts[s] * sizeof *t);
        if (!t) return -1;
        for (uint64_t i = 0; i < counts[s]; i++) t[i] = (uint16_t)((i * 13 + (uint64_t)s * 101) % 256);
        snprintf(paths[s], 512, "%s/train_%06d.bin", tmpdir, s);
        sy_status st = sy_data_write_shard(paths[s], t, counts[s]);
        free(t);
        if (st != SY_OK) return -1;
    }
    return 0;
}

/* Steps of one rank, as a worker runs them: plan, then its micro-batches; tokens compared with
 * a reader that reads each batch in the call. */
static void run_rank(sy_data_t *ref, sy_data_t *pre, int64_t from, int64_t to, int64_t end, int M, int b, int rank,
                     int world) {
    int32_t *x = malloc(sizeof(int32_t) * (size_t)b * (T + 1)), *y = malloc(sizeof(int32_t) * (size_t)b * (T + 1));
    assert_non_null(x);
    assert_non_null(y);
    for (int64_t s = from; s < to; s++) {
        assert_int_equal(sy_data_plan(pre, 77, s, end, M, b, rank, world), SY_OK);
        for (int m = rank; m < M; m += world) {
            assert_int_equal(sy_data_train_batch(ref, 77, s, M, b, m, x), SY_OK);
            assert_int_equal(sy_data_train_batch(pre, 77, s, M, b, m, y), SY_OK);
            assert_memory_equal(x, y, sizeof(int32_t) * (size_t)b * (T + 1));
        }
    }
    free(x);
    free(y);
}

static void test_prefetch_same_tokens(void **state) {
    (void)state;
    char paths[3][512];
    assert_int_equal(write_shards(paths), 0);
    const char *pat[1];
    char glob[600];
    snprintf(glob, sizeof glob, "%s/train_*.bin", tmpdir);
    pat[0] = glob;
    sy_data_t *ref = NULL, *pre = NULL;
    assert_int_equal(sy_data_open(pat, 1, 256, T, &ref), SY_OK);
    sy_data_options o;
    sy_data_options_default(&o);
    o.prefetch_steps = 3;
    o.fetch_threads = 3;
    assert_int_equal(sy_data_open_with(pat, 1, 256, T, &o, &pre), SY_OK);
    const int M = 6, b = 4;
    /* worlds 1, 2, 4 (rank 3 of 4 has one micro-batch a step, rank 5 of 8 none past M) */
    run_rank(ref, pre, 0, 12, 40, M, b, 0, 1);
    run_rank(ref, pre, 12, 25, 40, M, b, 1, 2);
    run_rank(ref, pre, 25, 31, 40, M, b, 3, 4);
    /* back to an earlier step (a restore), another world: the reader re-derives from the step */
    run_rank(ref, pre, 20, 40, 40, M, b, 2, 3);
    /* a batch outside the plan (other seed) is read in the call */
    int32_t x[4 * (T + 1)], y[4 * (T + 1)];
    assert_int_equal(sy_data_train_batch(ref, 5, 3, M, b, 0, x), SY_OK);
    assert_int_equal(sy_data_train_batch(pre, 5, 3, M, b, 0, y), SY_OK);
    assert_memory_equal(x, y, sizeof x);
    sy_data_stats st;
    sy_data_get_stats(pre, &st);
    assert_true(st.prefetched > 0);
    assert_true(st.used_bytes > 0);
    assert_int_equal(st.fetched_bytes, 0); /* local shards: nothing from object storage */
    sy_data_destroy(&pre);
    sy_data_destroy(&ref);
}

/* A local shard truncated while the prefetcher reads ahead: the step that needs it fails with
 * the file named, never other tokens. */
static void test_prefetch_truncated_shard(void **state) {
    (void)state;
    char paths[3][512];
    assert_int_equal(write_shards(paths), 0);
    const char *pat[3] = {paths[0], paths[1], paths[2]};
    sy_data_t *pre = NULL;
    sy_data_options o;
    sy_data_options_default(&o);
    o.prefetch_steps = 2;
    assert_int_equal(sy_data_open_with(pat, 3, 256, T, &o, &pre), SY_OK);
    assert_int_equal(truncate(paths[2], 1024 + 2 * T * 10), 0);
    int32_t y[4 * (T + 1)];
    sy_status st = SY_OK;
    for (int64_t s = 0; s < 20 && st == SY_OK; s++) {
        assert_int_equal(sy_data_plan(pre, 77, s, 20, 2, 4, 0, 1), SY_OK);
        for (int m = 0; m < 2 && st == SY_OK; m++) st = sy_data_train_batch(pre, 77, s, 2, 4, m, y);
    }
    assert_int_equal(st, SY_EIO);
    assert_non_null(strstr(sy_err_msg(), paths[2]));
    sy_data_destroy(&pre);
}

/* ------------------------------------------------------------------ helpers */

static const char *g_needle;
static int g_count;
static int count_named(const char *p, const struct stat *sb, int type, struct FTW *ftw) {
    (void)sb;
    if (type == FTW_F && !strncmp(p + ftw->base, g_needle, strlen(g_needle))) g_count++;
    return 0;
}
static int n_files_named(const char *root, const char *needle) {
    g_needle = needle;
    g_count = 0;
    nftw(root, count_named, 16, FTW_PHYS);
    return g_count;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_cache_round_trip, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_cache_rejects_torn_and_corrupt, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_cache_dead_writer, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_cache_lru_bound, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_store_range_obj_local, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_prefetch_same_tokens, setup_dir, teardown_dir),
        cmocka_unit_test_setup_teardown(test_prefetch_truncated_shard, setup_dir, teardown_dir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
