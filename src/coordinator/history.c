/* Bounded run history for the dashboard (history.h). */
#include "coordinator/history.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Columns of a step record, in the order of the JSON "columns"; the imbalance of each layer
 * (max / mean tokens per expert) follows them. */
static const char *const COLUMNS[] = {"step", "time", "loss", "ce", "aux", "z", "lr", "grad_norm",
                                      "tokens_per_s", "dropped_frac", "step_ms", "world", "generation"};
#define NCOL ((int)(sizeof COLUMNS / sizeof COLUMNS[0]))

/* A decimating buffer: up to cap records of width doubles each, record[0] the step. */
typedef struct {
    double *v;
    int width, cap, n;
    int64_t stride;
} dbuf;

struct sy_history {
    int layers, experts;
    dbuf steps; /* NCOL + layers */
    dbuf load;  /* 1 + layers * experts: the step, then each expert's share of its layer */
    double val[SY_HISTORY_VAL][2]; /* (step, validation loss), steps increasing */
    int nval;
    uint64_t version;
};

static int dbuf_init(dbuf *b, int width, int cap) {
    b->v = calloc((size_t)width * (size_t)cap, sizeof(double));
    b->width = width;
    b->cap = cap;
    b->n = 0;
    b->stride = 1;
    return b->v != NULL;
}

/* Room for one more record, or NULL when this step is not kept at the current stride. */
static double *dbuf_slot(dbuf *b, int64_t step) {
    /* a step seen again (replayed after a recovery) replaces the records from it on */
    while (b->n > 0 && b->v[(size_t)(b->n - 1) * (size_t)b->width] >= (double)step) b->n--;
    if (step % b->stride != 0) return NULL;
    if (b->n == b->cap) { /* keep the records whose step is a multiple of the doubled stride */
        b->stride *= 2;
        int k = 0;
        for (int i = 0; i < b->n; i++) {
            const double *r = b->v + (size_t)i * (size_t)b->width;
            if ((int64_t)r[0] % b->stride == 0) {
                if (k != i) memmove(b->v + (size_t)k * (size_t)b->width, r, sizeof(double) * (size_t)b->width);
                k++;
            }
        }
        b->n = k;
        if (step % b->stride != 0 || b->n == b->cap) return NULL;
    }
    return b->v + (size_t)(b->n++) * (size_t)b->width;
}

sy_status sy_history_new(int layers, int experts, sy_history_t **out) {
    *out = NULL;
    if (layers < 0 || experts < 0) return sy_err_set(SY_EINVAL, "history: negative layers or experts");
    sy_history_t *h = calloc(1, sizeof *h);
    if (!h) return sy_err_set(SY_ENOMEM, "out of memory");
    h->layers = layers;
    h->experts = experts;
    if (!dbuf_init(&h->steps, NCOL + layers, SY_HISTORY_STEPS) ||
        !dbuf_init(&h->load, 1 + layers * experts, SY_HISTORY_LOAD_SAMPLES)) {
        sy_history_destroy(&h);
        return sy_err_set(SY_ENOMEM, "out of memory");
    }
    *out = h;
    return SY_OK;
}

void sy_history_destroy(sy_history_t **self_p) {
    if (!self_p || !*self_p) return;
    free((*self_p)->steps.v);
    free((*self_p)->load.v);
    free(*self_p);
    *self_p = NULL;
}

void sy_history_add(sy_history_t *self, const sy_history_step *s, const uint64_t *load) {
    const int L = self->layers, E = self->experts;
    self->version++;
    while (self->nval > 0 && self->val[self->nval - 1][0] >= (double)s->step) self->nval--; /* replayed */
    if (!isnan(s->val_loss)) {
        if (self->nval == SY_HISTORY_VAL) { /* keep every other one */
            for (int i = 0; i < SY_HISTORY_VAL / 2; i++) memcpy(self->val[i], self->val[2 * i + 1], sizeof self->val[0]);
            self->nval = SY_HISTORY_VAL / 2;
        }
        self->val[self->nval][0] = (double)s->step;
        self->val[self->nval][1] = s->val_loss;
        self->nval++;
    }
    double *r = dbuf_slot(&self->steps, s->step);
    if (r) {
        const double cols[NCOL] = {(double)s->step, s->time, s->loss, s->ce, s->aux, s->z, s->lr, s->grad_norm,
                                   s->tokens_per_s, s->dropped_frac, s->step_ms, (double)s->world,
                                   (double)s->generation};
        memcpy(r, cols, sizeof cols);
        for (int l = 0; l < L; l++) {
            double sum = 0, mx = 0;
            for (int e = 0; load && e < E; e++) {
                double v = (double)load[l * E + e];
                sum += v;
                if (v > mx) mx = v;
            }
            r[NCOL + l] = load && sum > 0 ? mx / (sum / E) : NAN;
        }
    }
    /* the load history drops this step's replayed successors even when the step has no counts */
    double *q = dbuf_slot(&self->load, s->step);
    if (!q) return;
    if (!load || L == 0 || E == 0) {
        self->load.n--;
        return;
    }
    q[0] = (double)s->step;
    for (int l = 0; l < L; l++) {
        double sum = 0;
        for (int e = 0; e < E; e++) sum += (double)load[l * E + e];
        for (int e = 0; e < E; e++) q[1 + l * E + e] = sum > 0 ? (double)load[l * E + e] / sum : 0;
    }
}

uint64_t sy_history_version(const sy_history_t *self) { return self->version; }

typedef struct {
    char *buf;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    if (b->oom) return;
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->buf ? b->buf + b->len : NULL, b->buf ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = 1;
            return;
        }
        if (b->buf && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t nc = (b->cap ? b->cap * 2 : 65536) + (size_t)n;
        char *nb = realloc(b->buf, nc);
        if (!nb) {
            b->oom = 1;
            return;
        }
        b->buf = nb;
        b->cap = nc;
    }
}

/* A JSON number (shortest round-trip form is not needed for a chart: 7 significant digits),
 * or null when not finite. */
static void sb_num(sbuf *b, double v, int last) {
    if (isfinite(v)) sb_printf(b, "%.7g%s", v, last ? "" : ",");
    else sb_printf(b, "null%s", last ? "" : ",");
}

char *sy_history_json(const sy_history_t *self) {
    sbuf b = {0};
    const int L = self->layers, E = self->experts;
    sb_printf(&b, "{\"layers\":%d,\"experts\":%d,\"stride\":%" PRId64 ",\"columns\":[", L, E, self->steps.stride);
    for (int i = 0; i < NCOL; i++) sb_printf(&b, "\"%s\",", COLUMNS[i]);
    for (int l = 0; l < L; l++) sb_printf(&b, "\"imbalance_%d\"%s", l, l + 1 < L ? "," : "");
    if (L == 0) b.len--; /* the trailing comma of the last fixed column */
    sb_printf(&b, "],\"rows\":[");
    for (int i = 0; i < self->steps.n; i++) {
        const double *r = self->steps.v + (size_t)i * (size_t)self->steps.width;
        sb_printf(&b, "%s[", i ? "," : "");
        sb_printf(&b, "%" PRId64 ",%.3f,", (int64_t)r[0], r[1]); /* step, Unix time */
        for (int k = 2; k < self->steps.width; k++) sb_num(&b, r[k], k + 1 == self->steps.width);
        sb_printf(&b, "]");
    }
    sb_printf(&b, "],\"val\":[");
    for (int i = 0; i < self->nval; i++) {
        sb_printf(&b, "%s[%" PRId64 ",", i ? "," : "", (int64_t)self->val[i][0]);
        sb_num(&b, self->val[i][1], 1);
        sb_printf(&b, "]");
    }
    sb_printf(&b, "],\"load\":{\"stride\":%" PRId64 ",\"steps\":[", self->load.stride);
    for (int i = 0; i < self->load.n; i++)
        sb_printf(&b, "%s%" PRId64, i ? "," : "", (int64_t)self->load.v[(size_t)i * (size_t)self->load.width]);
    sb_printf(&b, "],\"shares\":[");
    for (int i = 0; i < self->load.n; i++) {
        const double *q = self->load.v + (size_t)i * (size_t)self->load.width + 1;
        sb_printf(&b, "%s[", i ? "," : "");
        for (int l = 0; l < L; l++) {
            sb_printf(&b, "%s[", l ? "," : "");
            for (int e = 0; e < E; e++) sb_printf(&b, "%.4f%s", q[l * E + e], e + 1 < E ? "," : "");
            sb_printf(&b, "]");
        }
        sb_printf(&b, "]");
    }
    sb_printf(&b, "]}}\n");
    if (b.oom) {
        free(b.buf);
        return NULL;
    }
    return b.buf;
}
