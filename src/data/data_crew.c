/* The fetch crew. See data_crew.h. */
#include "data/data_crew.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

struct sy_crew {
    pthread_mutex_t run_lock; /* one run at a time */
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    pthread_t *threads;
    int n_threads;
    int stop;
    uint64_t job;          /* bumped per run: helpers join each job once */
    sy_crew_fn fn;
    void *arg;
    size_t n, next, finished;
};

/* Claims and runs items of the current job until none is left. Called with lock held; returns
 * with it held. */
static void drain(sy_crew_t *c) {
    while (c->next < c->n) {
        size_t i = c->next++;
        pthread_mutex_unlock(&c->lock);
        c->fn(c->arg, i);
        pthread_mutex_lock(&c->lock);
        if (++c->finished == c->n) pthread_cond_broadcast(&c->done);
    }
}

static void *helper(void *arg) {
    sy_crew_t *c = arg;
    pthread_setname_np(pthread_self(), "sy-fetch"); /* named for profilers and bench/data_stream_bench.py */
    uint64_t seen = 0;
    pthread_mutex_lock(&c->lock);
    for (;;) {
        while (!c->stop && (c->job == seen || c->next >= c->n)) pthread_cond_wait(&c->work, &c->lock);
        if (c->stop) break;
        seen = c->job;
        drain(c);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

sy_status sy_crew_new(int threads, sy_crew_t **out) {
    *out = NULL;
    sy_crew_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "data: out of memory");
    pthread_mutex_init(&c->run_lock, NULL);
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->done, NULL);
    int helpers = threads > 1 ? threads - 1 : 0;
    if (helpers && !(c->threads = calloc((size_t)helpers, sizeof *c->threads))) {
        sy_crew_destroy(&c);
        return sy_err_set(SY_ENOMEM, "data: out of memory");
    }
    for (int i = 0; i < helpers; i++) {
        if (pthread_create(&c->threads[i], NULL, helper, c) != 0) {
            sy_crew_destroy(&c);
            return sy_err_set(SY_EIO, "data: cannot start fetch thread %d of %d", i + 1, helpers);
        }
        c->n_threads = i + 1;
    }
    *out = c;
    return SY_OK;
}

void sy_crew_destroy(sy_crew_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_crew_t *c = *self_p;
    pthread_mutex_lock(&c->lock);
    c->stop = 1;
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->lock);
    for (int i = 0; i < c->n_threads; i++) pthread_join(c->threads[i], NULL);
    free(c->threads);
    pthread_cond_destroy(&c->work);
    pthread_cond_destroy(&c->done);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->run_lock);
    free(c);
    *self_p = NULL;
}

void sy_crew_run(sy_crew_t *c, sy_crew_fn fn, void *arg, size_t n) {
    if (n == 0) return;
    pthread_mutex_lock(&c->run_lock);
    pthread_mutex_lock(&c->lock);
    c->fn = fn;
    c->arg = arg;
    c->n = n;
    c->next = 0;
    c->finished = 0;
    c->job++;
    if (n > 1) pthread_cond_broadcast(&c->work);
    drain(c);
    while (c->finished < c->n) pthread_cond_wait(&c->done, &c->lock);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_unlock(&c->run_lock);
}
