/* Asynchronous checkpoint saver: host snapshot + one background upload thread; see ckpt_async.h. */
#include "worker/ckpt_async.h"
#include "base/clock.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "storage/ckpt.h"
#include "base/log.h"
#include "model/model_ckpt.h"

#define MSG_MAX 1024

struct sy_ckpt_saver {
    sy_store_t *store;
    char *run;
    int keep_last;
    sy_ckpt_onbusy on_busy;
    int delay_ms; /* SY_CKPT_TEST_DELAY_MS test hook */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    int thread_started;
    int quit;
    int busy;      /* a save is queued or running: the snapshot belongs to the thread */
    int job_ready; /* queued, not yet taken by the thread */

    /* the job (owned by the thread while busy) */
    int64_t job_step;
    json_t *job_extra;

    /* the snapshot: allocated once by prepare */
    size_t numel;
    int n_params;
    float *params, *m, *v;
    int plan_optim; /* which plan is built */
    sy_model_ckpt_plan plan;
    int have_plan;
    int64_t snap_step, snap_t;
    int snap_valid, snap_optim;

    /* results (under mu) */
    sy_status pending_err; /* not yet returned to the caller */
    char pending_msg[MSG_MAX];
    sy_status last_err;
    char last_msg[MSG_MAX];
    sy_ckpt_saver_stats stats;
};


static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* The background save of the snapshot: every file, then the manifest, then retention. */
static sy_status do_save(sy_ckpt_saver_t *s, int64_t step, const json_t *extra) {
    json_t *files = json_array();
    sy_status rc = SY_OK;
    if (!files) return sy_err_set(SY_ENOMEM, "checkpoint: out of memory");
    /* An existing commit of this step is judged first (ckpt.h): kept if it is this writer's,
     * rewritten if broken, an error if another writer's. */
    SY_CHECK_GOTO(sy_ckpt_prepare_step(s->store, s->run, step, extra), rc, out);
    /* Normally one write_part of every file (it writes several at once); with the test delay,
     * one file at a time with a pause before each. */
    int per_call = s->delay_ms > 0 ? 1 : s->plan.n;
    for (int i = 0; i < s->plan.n; i += per_call) {
        if (s->delay_ms > 0) sleep_ms(s->delay_ms);
        json_t *part = NULL;
        int k = s->plan.n - i < per_call ? s->plan.n - i : per_call;
        SY_CHECK_GOTO(sy_ckpt_write_part(s->store, s->run, step, &s->plan.groups[i], k, &part), rc, out);
        rc = json_array_extend(files, part) ? sy_err_set(SY_ENOMEM, "checkpoint: out of memory") : SY_OK;
        json_decref(part);
        if (rc != SY_OK) goto out;
    }
    SY_CHECK_GOTO(sy_ckpt_commit(s->store, s->run, step, files, extra), rc, out);
    if (s->keep_last >= 1) rc = sy_ckpt_retain(s->store, s->run, s->keep_last);
out:
    json_decref(files);
    return rc;
}

static void *saver_thread(void *arg) {
    sy_ckpt_saver_t *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->job_ready && !s->quit) pthread_cond_wait(&s->cv, &s->mu);
        if (!s->job_ready) break; /* quit with nothing queued */
        s->job_ready = 0;
        int64_t step = s->job_step;
        json_t *extra = s->job_extra;
        s->job_extra = NULL;
        pthread_mutex_unlock(&s->mu);

        double t0 = (sy_mono_s() * 1e3);
        sy_status rc = do_save(s, step, extra);
        if (rc == SY_EEXIST) {
            sy_warn("checkpoint %s step %" PRId64 " already committed; keeping it", s->run, step);
            rc = SY_OK;
        }
        double ms = (sy_mono_s() * 1e3) - t0;
        char msg[MSG_MAX];
        if (rc != SY_OK) {
            snprintf(msg, sizeof msg, "checkpoint %s step %" PRId64 " not saved: %s", s->run, step, sy_err_msg());
            sy_error("%s", msg); /* logged once, here */
        } else {
            sy_debug("checkpoint %s step %" PRId64 " committed in %.0f ms (background)", s->run, step, ms);
        }
        json_decref(extra);

        pthread_mutex_lock(&s->mu);
        s->stats.last_step = step;
        s->stats.last_upload_ms = ms;
        if (rc == SY_OK) {
            s->stats.saves_done++;
        } else {
            s->stats.failed++;
            s->pending_err = s->last_err = rc;
            snprintf(s->pending_msg, sizeof s->pending_msg, "%s", msg);
            snprintf(s->last_msg, sizeof s->last_msg, "%s", msg);
        }
        s->busy = 0;
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

sy_status sy_ckpt_saver_new(sy_store_t *store, const char *run, int keep_last, sy_ckpt_onbusy on_busy,
                            sy_ckpt_saver_t **out) {
    if (!store || !run || !out || (on_busy != SY_ONBUSY_WAIT && on_busy != SY_ONBUSY_SKIP))
        return sy_err_set(SY_EINVAL, "checkpoint saver: bad arguments");
    *out = NULL;
    if (!sy_store_key_valid(run))
        return sy_err_set(SY_EINVAL, "checkpoint saver: invalid run name '%s'", run);
    sy_ckpt_saver_t *s = calloc(1, sizeof *s);
    if (!s) return sy_err_set(SY_ENOMEM, "checkpoint saver: out of memory");
    s->store = store;
    s->run = strdup(run);
    s->keep_last = keep_last;
    s->on_busy = on_busy;
    s->stats.last_step = -1;
    const char *d = getenv("SY_CKPT_TEST_DELAY_MS");
    if (d && *d) {
        s->delay_ms = atoi(d);
        if (s->delay_ms > 0) sy_warn("SY_CKPT_TEST_DELAY_MS=%d: checkpoint uploads slowed (test hook)", s->delay_ms);
    }
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    if (!s->run) {
        sy_ckpt_saver_destroy(&s);
        return sy_err_set(SY_ENOMEM, "checkpoint saver: out of memory");
    }
    if (pthread_create(&s->thread, NULL, saver_thread, s) != 0) {
        sy_ckpt_saver_destroy(&s);
        return sy_err_set(SY_EINTERNAL, "checkpoint saver: cannot start the upload thread");
    }
    s->thread_started = 1;
    *out = s;
    return SY_OK;
}

static void wait_idle_locked(sy_ckpt_saver_t *s) {
    while (s->busy) pthread_cond_wait(&s->cv, &s->mu);
}

void sy_ckpt_saver_destroy(sy_ckpt_saver_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_ckpt_saver_t *s = *self_p;
    if (s->thread_started) {
        pthread_mutex_lock(&s->mu);
        wait_idle_locked(s);
        s->quit = 1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->thread, NULL);
    }
    json_decref(s->job_extra);
    if (s->have_plan) sy_model_ckpt_plan_free(&s->plan);
    free(s->params);
    free(s->m);
    free(s->v);
    free(s->run);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
    *self_p = NULL;
}

/* Allocates and touches (page faults now, not during the first copy) one snapshot buffer. */
static float *alloc_touched(size_t n) {
    float *p = malloc(n * sizeof(float) + 1);
    if (p) memset(p, 0, n * sizeof(float));
    return p;
}

/* Called with no save in flight (the thread does not touch the snapshot). */
static sy_status prepare_idle(sy_ckpt_saver_t *s, const sy_model_t *model, const sy_adamw_t *opt) {
    size_t numel = sy_model_numel(model);
    int np = sy_model_n_params(model);
    if (s->params && (numel != s->numel || np != s->n_params))
        return sy_err_set(SY_EINVAL,
                          "checkpoint saver: the model changed size (%zu parameters in %d tensors, the snapshot "
                          "holds %zu in %d)",
                          numel, np, s->numel, s->n_params);
    if (!s->params) {
        s->params = alloc_touched(numel);
        if (!s->params) return sy_err_set(SY_ENOMEM, "checkpoint saver: out of memory (snapshot of %zu floats)", numel);
        s->numel = numel;
        s->n_params = np;
    }
    int optim = opt != NULL;
    if (optim && !s->m) {
        s->m = alloc_touched(numel);
        s->v = alloc_touched(numel);
        if (!s->m || !s->v) {
            free(s->m), free(s->v);
            s->m = s->v = NULL;
            return sy_err_set(SY_ENOMEM, "checkpoint saver: out of memory (moments snapshot of %zu floats)", numel);
        }
    }
    if (!s->have_plan || s->plan_optim != optim) {
        if (s->have_plan) sy_model_ckpt_plan_free(&s->plan);
        s->have_plan = 0;
        SY_CHECK(sy_model_ckpt_plan_new(model, s->params, optim ? s->m : NULL, optim ? s->v : NULL, NULL, &s->plan));
        s->have_plan = 1;
        s->plan_optim = optim;
    }
    return SY_OK;
}

sy_status sy_ckpt_saver_prepare(sy_ckpt_saver_t *s, const sy_model_t *model, const sy_adamw_t *opt) {
    if (!s || !model) return sy_err_set(SY_EINVAL, "checkpoint saver: bad arguments");
    pthread_mutex_lock(&s->mu);
    wait_idle_locked(s);
    pthread_mutex_unlock(&s->mu);
    return prepare_idle(s, model, opt);
}

/* Takes the not-yet-returned background error (under mu). */
static sy_status take_pending_locked(sy_ckpt_saver_t *s, char *msg, size_t cap) {
    sy_status rc = s->pending_err;
    if (rc != SY_OK) snprintf(msg, cap, "%s", s->pending_msg);
    s->pending_err = SY_OK;
    s->pending_msg[0] = 0;
    return rc;
}

sy_status sy_ckpt_saver_submit(sy_ckpt_saver_t *s, int64_t step, sy_model_t *model, sy_adamw_t *opt,
                               const json_t *extra, double *stall_ms) {
    if (stall_ms) *stall_ms = 0.0;
    if (!s || !model || step < 0 || (extra && !json_is_object(extra)))
        return sy_err_set(SY_EINVAL, "checkpoint saver: bad arguments to submit (step %" PRId64 ")", step);
    double t0 = (sy_mono_s() * 1e3);
    char prev_msg[MSG_MAX] = "";
    sy_status prev = SY_OK, rc = SY_OK;

    pthread_mutex_lock(&s->mu);
    if (s->busy && s->on_busy == SY_ONBUSY_SKIP) {
        int64_t inflight = s->job_step;
        s->stats.skipped++;
        prev = take_pending_locked(s, prev_msg, sizeof prev_msg);
        pthread_mutex_unlock(&s->mu);
        sy_warn("checkpoint %s step %" PRId64 " skipped: step %" PRId64 " is still uploading (checkpoint.on_busy = skip)",
                s->run, step, inflight);
        if (prev != SY_OK) return sy_err_set(prev, "%s", prev_msg);
        return SY_OK;
    }
    wait_idle_locked(s);
    prev = take_pending_locked(s, prev_msg, sizeof prev_msg);
    pthread_mutex_unlock(&s->mu);

    /* No save in flight: the snapshot is ours until we queue the job. */
    json_t *ex = NULL;
    rc = prepare_idle(s, model, opt);
    if (rc == SY_OK) {
        ex = sy_model_ckpt_extra(extra, opt ? sy_adamw_t_count(opt) : 0);
        if (!ex) rc = sy_err_set(SY_ENOMEM, "checkpoint saver: out of memory");
    }
    if (rc == SY_OK) {
        /* the backend's download (parallel chunked copies on the CPU) */
        sy_backend_t *be = sy_model_backend(model);
        be->download(be, s->params, sy_model_params(model), s->numel * sizeof(float));
        if (opt) {
            be->download(be, s->m, sy_adamw_m(opt), s->numel * sizeof(float));
            be->download(be, s->v, sy_adamw_v(opt), s->numel * sizeof(float));
        }
        pthread_mutex_lock(&s->mu);
        s->snap_step = step;
        s->snap_t = opt ? sy_adamw_t_count(opt) : 0;
        s->snap_optim = opt != NULL;
        s->snap_valid = 1;
        s->job_step = step;
        s->job_extra = ex;
        s->busy = 1;
        s->job_ready = 1;
        double ms = (sy_mono_s() * 1e3) - t0;
        s->stats.last_stall_ms = ms;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        if (stall_ms) *stall_ms = ms;
    } else {
        char own[MSG_MAX];
        snprintf(own, sizeof own, "%s", sy_err_msg());
        if (prev == SY_OK) return sy_err_set(rc, "%s", own);
        sy_error("checkpoint %s step %" PRId64 " not submitted: %s", s->run, step, own);
    }
    if (prev != SY_OK) return sy_err_set(prev, "%s", prev_msg);
    return rc;
}

sy_status sy_ckpt_saver_wait(sy_ckpt_saver_t *s) {
    if (!s) return sy_err_set(SY_EINVAL, "checkpoint saver: NULL");
    char msg[MSG_MAX] = "";
    pthread_mutex_lock(&s->mu);
    wait_idle_locked(s);
    sy_status rc = take_pending_locked(s, msg, sizeof msg);
    pthread_mutex_unlock(&s->mu);
    if (rc != SY_OK) return sy_err_set(rc, "%s", msg);
    return SY_OK;
}

sy_status sy_ckpt_saver_last_error(sy_ckpt_saver_t *s, char *msg, size_t cap) {
    if (!s) return SY_EINVAL;
    pthread_mutex_lock(&s->mu);
    sy_status rc = s->last_err;
    if (msg && cap) snprintf(msg, cap, "%s", s->last_msg);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

void sy_ckpt_saver_get_stats(sy_ckpt_saver_t *s, sy_ckpt_saver_stats *out) {
    if (!s || !out) return;
    pthread_mutex_lock(&s->mu);
    *out = s->stats;
    pthread_mutex_unlock(&s->mu);
}

sy_status sy_ckpt_saver_snapshot(sy_ckpt_saver_t *s, int64_t *step, const float **params, const float **m,
                                 const float **v, int64_t *t) {
    if (!s) return sy_err_set(SY_EINVAL, "checkpoint saver: NULL");
    pthread_mutex_lock(&s->mu);
    int valid = s->snap_valid;
    if (valid) {
        if (step) *step = s->snap_step;
        if (params) *params = s->params;
        if (m) *m = s->snap_optim ? s->m : NULL;
        if (v) *v = s->snap_optim ? s->v : NULL;
        if (t) *t = s->snap_t;
    }
    pthread_mutex_unlock(&s->mu);
    if (!valid) return sy_err_set(SY_ENOTFOUND, "checkpoint saver %s: no snapshot taken yet", s->run);
    return SY_OK;
}
