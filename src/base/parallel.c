#include "base/parallel.h"

#include <pthread.h>
#include <stdio.h>

typedef struct {
    sy_status (*fn)(void *ctx, size_t i);
    void *ctx;
    size_t n, next;
    bool stop_on_error;
    pthread_mutex_t mu;
    sy_status st; /* the first error */
    char msg[1024];
} loop;

static void *loop_main(void *arg) {
    loop *l = arg;
    for (;;) {
        pthread_mutex_lock(&l->mu);
        const bool open = l->next < l->n && (!l->stop_on_error || l->st == SY_OK);
        const size_t i = open ? l->next++ : 0;
        pthread_mutex_unlock(&l->mu);
        if (!open) break;
        sy_status st = l->fn(l->ctx, i);
        if (st != SY_OK) {
            pthread_mutex_lock(&l->mu);
            if (l->st == SY_OK) {
                l->st = st;
                snprintf(l->msg, sizeof l->msg, "%s", sy_err_msg());
            }
            pthread_mutex_unlock(&l->mu);
        }
    }
    return NULL;
}

sy_status sy_parallel_for(int threads, size_t n, bool stop_on_error, sy_status (*fn)(void *ctx, size_t i),
                          void *ctx) {
    if (!fn) return sy_err_set(SY_EINVAL, "parallel loop: no function");
    loop l = {.fn = fn, .ctx = ctx, .n = n, .stop_on_error = stop_on_error, .st = SY_OK};
    pthread_mutex_init(&l.mu, NULL);
    pthread_t th[SY_PARALLEL_MAX_THREADS];
    int want = threads < SY_PARALLEL_MAX_THREADS ? threads : SY_PARALLEL_MAX_THREADS, n_th = 0;
    if ((size_t)want > n) want = (int)n;
    for (int k = 1; k < want; k++)
        if (pthread_create(&th[n_th], NULL, loop_main, &l) == 0) n_th++;
    loop_main(&l); /* the caller works too */
    for (int k = 0; k < n_th; k++) pthread_join(th[k], NULL);
    pthread_mutex_destroy(&l.mu);
    if (l.st != SY_OK) return sy_err_set(l.st, "%s", l.msg);
    return SY_OK;
}
