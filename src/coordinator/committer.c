#include "coordinator/committer.h"
#include "base/clock.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "storage/ckpt.h"
#include "base/log.h"

typedef struct job {
    struct job *next;
    int64_t step;
    uint64_t gen;
    int64_t since_ms;
    json_t *files, *extra;
    sy_commit_result res;
} job;

struct sy_committer {
    sy_store_t *store;
    char *run;
    int keep_last;
    pthread_t thread;
    bool started;
    pthread_mutex_t mu;
    pthread_cond_t cv;    /* jobs queued, quitting, or a job finished */
    job *todo, **todo_tail;
    job *done, **done_tail;
    bool busy, quit;
    int in_flight;        /* submitted, result not taken (reactor's count) */
    int efd;
};


static void run_job(sy_committer_t *c, job *j) {
    sy_commit_result *r = &j->res;
    r->step = j->step;
    r->generation = j->gen;
    r->since_ms = j->since_ms;
    r->n_files = (int)json_array_size(j->files);
    int64_t t0 = sy_mono_ms();
    r->status = sy_ckpt_commit(c->store, c->run, j->step, j->files, j->extra);
    r->commit_ms = (double)(sy_mono_ms() - t0);
    if (r->status != SY_OK && r->status != SY_EEXIST) snprintf(r->error, sizeof r->error, "%s", sy_err_msg());
    if (r->status == SY_OK && sy_ckpt_retain(c->store, c->run, c->keep_last) != SY_OK) {
        r->retain_failed = true;
        snprintf(r->retain_error, sizeof r->retain_error, "%s", sy_err_msg());
    }
    json_decref(j->files);
    json_decref(j->extra);
    j->files = j->extra = NULL;
}

static void *thread_main(void *arg) {
    sy_committer_t *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->todo && !c->quit) pthread_cond_wait(&c->cv, &c->mu);
        if (!c->todo) break; /* quitting with nothing left */
        job *j = c->todo;
        c->todo = j->next;
        if (!c->todo) c->todo_tail = &c->todo;
        c->busy = true;
        pthread_mutex_unlock(&c->mu);

        run_job(c, j);

        pthread_mutex_lock(&c->mu);
        c->busy = false;
        j->next = NULL;
        *c->done_tail = j;
        c->done_tail = &j->next;
        uint64_t one = 1;
        if (write(c->efd, &one, sizeof one) < 0 && errno != EAGAIN)
            sy_warn("committer: eventfd write: %s", strerror(errno));
        pthread_cond_broadcast(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

sy_status sy_committer_new(sy_store_t *store, const char *run, int keep_last, sy_committer_t **out) {
    *out = NULL;
    sy_committer_t *c = calloc(1, sizeof *c);
    if (!c) return sy_err_set(SY_ENOMEM, "out of memory");
    c->store = store;
    c->keep_last = keep_last;
    c->todo_tail = &c->todo;
    c->done_tail = &c->done;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    c->run = strdup(run);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    sy_status s = SY_OK;
    if (!c->run) s = sy_err_set(SY_ENOMEM, "out of memory");
    else if (c->efd < 0) s = sy_err_set(SY_EIO, "checkpoint committer: eventfd: %s", strerror(errno));
    else if ((errno = pthread_create(&c->thread, NULL, thread_main, c)) != 0)
        s = sy_err_set(SY_EIO, "checkpoint committer: cannot start its thread: %s", strerror(errno));
    else c->started = true;
    if (s != SY_OK) {
        sy_committer_destroy(&c);
        return s;
    }
    *out = c;
    return SY_OK;
}

static void free_list(job *j) {
    while (j) {
        job *n = j->next;
        json_decref(j->files);
        json_decref(j->extra);
        free(j);
        j = n;
    }
}

void sy_committer_destroy(sy_committer_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_committer_t *c = *self_p;
    if (c->started) {
        pthread_mutex_lock(&c->mu);
        c->quit = true;
        pthread_cond_broadcast(&c->cv);
        pthread_mutex_unlock(&c->mu);
        pthread_join(c->thread, NULL);
    }
    free_list(c->todo);
    free_list(c->done);
    if (c->efd >= 0) close(c->efd);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c->run);
    free(c);
    *self_p = NULL;
}

sy_status sy_committer_submit(sy_committer_t *c, int64_t step, uint64_t generation, int64_t since_ms,
                              json_t **files, json_t **extra) {
    job *j = calloc(1, sizeof *j);
    if (!j) return sy_err_set(SY_ENOMEM, "out of memory");
    j->step = step;
    j->gen = generation;
    j->since_ms = since_ms;
    j->files = *files;
    j->extra = *extra;
    *files = *extra = NULL;
    pthread_mutex_lock(&c->mu);
    *c->todo_tail = j;
    c->todo_tail = &j->next;
    c->in_flight++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    return SY_OK;
}

int sy_committer_fd(const sy_committer_t *c) { return c->efd; }

bool sy_committer_next(sy_committer_t *c, sy_commit_result *out) {
    pthread_mutex_lock(&c->mu);
    job *j = c->done;
    if (j) {
        c->done = j->next;
        if (!c->done) c->done_tail = &c->done;
        c->in_flight--;
    }
    if (!c->done) { /* nothing left: make the fd quiet (the thread writes under the lock) */
        uint64_t v;
        if (read(c->efd, &v, sizeof v) < 0 && errno != EAGAIN)
            sy_warn("committer: eventfd read: %s", strerror(errno));
    }
    pthread_mutex_unlock(&c->mu);
    if (!j) return false;
    *out = j->res;
    free(j);
    return true;
}

int sy_committer_in_flight(const sy_committer_t *c) { return c->in_flight; }

void sy_committer_wait(sy_committer_t *c) {
    pthread_mutex_lock(&c->mu);
    while (c->todo || c->busy) pthread_cond_wait(&c->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
}
