/* The prefetcher. See data_prefetch.h. */
#include "data/data_prefetch.h"
#include "data_internal.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { SLOT_EMPTY, SLOT_FILLING, SLOT_READY, SLOT_FAILED } slot_state;

typedef struct {
    int64_t step;
    slot_state state;
    uint64_t gen;       /* the plan generation it was filled under */
    int n_mb;           /* micro-batches of this rank in the step */
    uint64_t *wins;     /* [n_mb * b] */
    uint16_t *tok;      /* [n_mb * b][T + 1] */
    size_t cap;         /* windows the buffers hold */
    sy_status st;
    char msg[1024];
} slot_t;

struct sy_prefetch {
    sy_data_t *d;
    int depth;
    int n_slots; /* depth + 1 */
    slot_t *slots;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t wake;   /* the prefetcher: a new plan, a new base, stop */
    pthread_cond_t filled; /* the trainer: a slot changed state */
    int stop;
    int active;            /* a plan is set */
    sy_prefetch_plan_t plan;
    uint64_t gen;
    int64_t base;          /* the step the trainer is on */
    uint64_t served, waited;
};

static int micro_batches_of(const sy_prefetch_plan_t *pl) {
    return pl->rank < pl->M ? (pl->M - pl->rank + pl->world - 1) / pl->world : 0;
}

/* The next step to read (not yet claimed, in [base, base + depth], below the end), or -1. */
static int64_t next_to_fill(const sy_prefetch_t *p) {
    if (!p->active) return -1;
    for (int64_t s = p->base; s <= p->base + p->depth && s < p->plan.end_step; s++) {
        const slot_t *sl = &p->slots[s % p->n_slots];
        if (sl->step != s || sl->gen != p->gen) return s;
    }
    return -1;
}

/* Reads step s into sl (the prefetcher's thread, without the lock). */
static void fill(sy_prefetch_t *p, slot_t *sl, const sy_prefetch_plan_t *pl, int64_t s) {
    int n_mb = micro_batches_of(pl);
    size_t n = (size_t)n_mb * (size_t)pl->b, row = (size_t)sy_data_seq_len(p->d) + 1;
    sl->n_mb = n_mb;
    sl->st = SY_OK;
    sl->msg[0] = 0;
    if (n > sl->cap) {
        free(sl->wins);
        free(sl->tok);
        sl->wins = malloc(n * sizeof *sl->wins);
        sl->tok = malloc(n * row * sizeof *sl->tok);
        sl->cap = sl->wins && sl->tok ? n : 0;
        if (!sl->cap) {
            sl->st = sy_err_set(SY_ENOMEM, "data: out of memory for %zu prefetched windows", n);
            snprintf(sl->msg, sizeof sl->msg, "%s", sy_err_msg());
            return;
        }
    }
    for (int k = 0; k < n_mb; k++)
        for (int j = 0; j < pl->b; j++)
            sl->wins[(size_t)k * pl->b + j] = sy_data_window_of(
                p->d, pl->seed, sy_data_sample_index(s, pl->M, pl->b, pl->rank + k * pl->world, j));
    sl->st = sy_data_read_windows(p->d, sl->wins, n, sl->tok);
    if (sl->st != SY_OK) snprintf(sl->msg, sizeof sl->msg, "%s", sy_err_msg());
}

static void *prefetch_main(void *arg) {
    sy_prefetch_t *p = arg;
    pthread_setname_np(pthread_self(), "sy-prefetch"); /* named for profilers and bench/data_stream_bench.py */
    pthread_mutex_lock(&p->lock);
    while (!p->stop) {
        int64_t s = next_to_fill(p);
        if (s < 0) {
            pthread_cond_wait(&p->wake, &p->lock);
            continue;
        }
        slot_t *sl = &p->slots[s % p->n_slots];
        sy_prefetch_plan_t pl = p->plan;
        uint64_t gen = p->gen;
        sl->step = s;
        sl->gen = gen;
        sl->state = SLOT_FILLING;
        pthread_mutex_unlock(&p->lock);
        fill(p, sl, &pl, s);
        pthread_mutex_lock(&p->lock);
        if (sl->gen == gen && p->gen == gen)
            sl->state = sl->st == SY_OK ? SLOT_READY : SLOT_FAILED;
        else /* the plan changed while it was read: nobody will ask for it */
            sl->state = SLOT_EMPTY, sl->step = -1;
        pthread_cond_broadcast(&p->filled);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

sy_status sy_prefetch_new(sy_data_t *d, int depth, sy_prefetch_t **out) {
    *out = NULL;
    sy_prefetch_t *p = calloc(1, sizeof *p);
    if (!p) return sy_err_set(SY_ENOMEM, "data: out of memory");
    p->d = d;
    p->depth = depth;
    p->n_slots = depth + 1;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->filled, NULL);
    if (!(p->slots = calloc((size_t)p->n_slots, sizeof *p->slots))) {
        sy_prefetch_destroy(&p);
        return sy_err_set(SY_ENOMEM, "data: out of memory");
    }
    for (int i = 0; i < p->n_slots; i++) p->slots[i].step = -1;
    if (pthread_create(&p->thread, NULL, prefetch_main, p) != 0) {
        sy_prefetch_destroy(&p);
        return sy_err_set(SY_EIO, "data: cannot start the prefetch thread");
    }
    p->started = 1;
    *out = p;
    return SY_OK;
}

void sy_prefetch_destroy(sy_prefetch_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_prefetch_t *p = *self_p;
    if (p->started) {
        pthread_mutex_lock(&p->lock);
        p->stop = 1;
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->lock);
        pthread_join(p->thread, NULL);
    }
    for (int i = 0; p->slots && i < p->n_slots; i++) {
        free(p->slots[i].wins);
        free(p->slots[i].tok);
    }
    free(p->slots);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->filled);
    pthread_mutex_destroy(&p->lock);
    free(p);
    *self_p = NULL;
}

static int same_plan(const sy_prefetch_plan_t *a, const sy_prefetch_plan_t *b) {
    return a->seed == b->seed && a->end_step == b->end_step && a->M == b->M && a->b == b->b && a->rank == b->rank &&
           a->world == b->world;
}

void sy_prefetch_plan(sy_prefetch_t *p, const sy_prefetch_plan_t *plan, int64_t step) {
    pthread_mutex_lock(&p->lock);
    if (!p->active || !same_plan(&p->plan, plan) || step < p->base || step > p->base + p->depth) {
        p->gen++; /* drops every slot: a filled one no longer matches, a filling one is discarded */
        for (int i = 0; i < p->n_slots; i++)
            if (p->slots[i].state != SLOT_FILLING) p->slots[i].state = SLOT_EMPTY, p->slots[i].step = -1;
        p->plan = *plan;
        p->active = 1;
    }
    p->base = step;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
}

int sy_prefetch_take(sy_prefetch_t *p, uint64_t seed, int64_t step, int M, int b, int m, int32_t *tokens,
                     sy_status *st) {
    pthread_mutex_lock(&p->lock);
    const sy_prefetch_plan_t *pl = &p->plan;
    if (!p->active || pl->seed != seed || pl->M != M || pl->b != b || m % pl->world != pl->rank || step < p->base ||
        step > p->base + p->depth || step >= pl->end_step) {
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    slot_t *sl = &p->slots[step % p->n_slots];
    int waited = 0;
    while (!(sl->step == step && sl->gen == p->gen && (sl->state == SLOT_READY || sl->state == SLOT_FAILED))) {
        waited = 1;
        pthread_cond_wait(&p->filled, &p->lock);
    }
    p->served++;
    p->waited += (uint64_t)waited;
    if (sl->state == SLOT_FAILED) {
        *st = sy_err_set(sl->st, "%s", sl->msg);
        sl->state = SLOT_EMPTY, sl->step = -1; /* a retry of the step reads it again */
        pthread_cond_broadcast(&p->wake);
        pthread_mutex_unlock(&p->lock);
        return 1;
    }
    pthread_mutex_unlock(&p->lock);
    /* READY and step >= base: the prefetcher does not touch the slot until the trainer moves on */
    size_t row = (size_t)sy_data_seq_len(p->d) + 1, k = (size_t)(m / pl->world);
    const uint16_t *src = sl->tok + k * (size_t)b * row;
    for (size_t i = 0; i < (size_t)b * row; i++) tokens[i] = src[i];
    *st = SY_OK;
    return 1;
}

void sy_prefetch_counts(sy_prefetch_t *p, uint64_t *served, uint64_t *waited) {
    pthread_mutex_lock(&p->lock);
    *served = p->served;
    *waited = p->waited;
    pthread_mutex_unlock(&p->lock);
}
