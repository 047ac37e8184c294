/* Step aggregation of the coordinator (coord_internal.h): every rank's StepDone of a step is
 * summed (losses, tokens, drops, expert counts), and the complete step goes to metrics.jsonl,
 * the loss history, the goodput clock and the recovery record; a non-finite loss fails the run.
 * Thread: the reactor's. */
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/owners.h"
#include "proto/protocol.h"
#include "coord_internal.h"

/* Steps whose times are kept for goodput (8 bytes each). */
#define GOODPUT_MAX_STEPS ((int64_t)1 << 26)

static void step_complete(sy_coord_t *c, agg *a);
static void record_step_ms(sy_coord_t *c, int64_t step, double ms);
static int step_micro_batches(const sy_coord_t *c);
static bool owner_index(sy_coord_t *c);

void sy_coord_on_step_done(sy_coord_t *c, worker *w, const Sy__StepDone *sd) {
    int64_t step = (int64_t)sd->step;
    if (step < c->start_step || step > c->end_step) {
        sy_coord_drop(c, SY_DROP_INVALID, "StepDone from %s: step %" PRId64 " outside %" PRId64 "..%" PRId64, w->id,
                      step, c->start_step, c->end_step);
        return;
    }
    w->step = step;
    w->step_ms = sd->step_ms;
    if (step > c->max_reported) c->max_reported = step;
    int k = -1;
    for (int i = 0; i < c->npend; i++)
        if (c->pend[i].step == step) k = i;
    if (k < 0) {
        if (step <= c->step && step >= c->start_step) {
            sy_coord_drop(c, SY_DROP_UNEXPECTED, "StepDone from %s: step %" PRId64 " already aggregated", w->id, step);
            return;
        }
        if (c->npend == MAX_PENDING) {
            sy_coord_drop(c, SY_DROP_UNEXPECTED, "StepDone from %s: too many steps in flight", w->id);
            return;
        }
        k = c->npend++;
        agg *a = &c->pend[k];
        memset(a, 0, sizeof *a);
        a->step = step;
        a->seen = calloc((size_t)c->world, 1);
        a->counts = calloc((size_t)(c->n_switch * c->E > 0 ? c->n_switch * c->E : 1), sizeof(uint64_t));
        a->counts_ok = c->n_switch > 0;
        a->terms = calloc(3 * (size_t)step_micro_batches(c), sizeof(double));
        a->val_loss = NAN;
    }
    agg *a = &c->pend[k];
    if (!a->seen || !a->counts || !a->terms || a->seen[w->rank]) {
        sy_coord_drop(c, SY_DROP_UNEXPECTED, "StepDone from %s: step %" PRId64 " reported twice", w->id, step);
        return;
    }
    a->seen[w->rank] = 1;
    a->got++;
    a->ce += sd->ce, a->aux += sd->aux, a->z += sd->z;
    a->tokens += sd->tokens, a->dropped += sd->dropped, a->routed += sd->routed;
    if (sd->step_ms > a->step_ms) a->step_ms = sd->step_ms;
    a->grad_norm = sd->grad_norm, a->lr = sd->lr;
    if (sd->val_batches > 0) a->val_loss = sd->val_loss; /* every rank computes the same value */
    /* micro-batch m ran on rank m % W as its (m / W)-th */
    const int M = step_micro_batches(c);
    if (sd->n_micro_terms == 3 * (size_t)sd->micro_batches) {
        for (uint32_t k = 0; k < sd->micro_batches; k++) {
            int64_t m = (int64_t)k * c->world + w->rank;
            if (m >= M) break;
            memcpy(a->terms + 3 * m, sd->micro_terms + 3 * k, 3 * sizeof(double));
            a->nterms++;
        }
    }
    if ((int)sd->n_expert_counts != c->n_switch) {
        a->counts_ok = false;
    } else if (sd->counts_owned) { /* the whole step's counts of the sender's experts */
        if (!owner_index(c)) {
            a->counts_ok = false;
        } else {
            const int32_t *mine = c->own_exp + c->own_off[w->rank];
            const int nm = c->own_off[w->rank + 1] - c->own_off[w->rank];
            for (int l = 0; l < c->n_switch && a->counts_ok; l++) {
                const Sy__LayerCounts *lc = sd->expert_counts[l];
                if ((int)lc->n_counts != nm) {
                    a->counts_ok = false;
                    break;
                }
                for (int i = 0; i < nm; i++) a->counts[l * c->E + mine[i]] += lc->counts[i];
            }
        }
    } else {
        for (int l = 0; l < c->n_switch && a->counts_ok; l++) {
            const Sy__LayerCounts *lc = sd->expert_counts[l];
            if ((int)lc->n_counts != c->E) {
                a->counts_ok = false;
                break;
            }
            for (int e = 0; e < c->E; e++) a->counts[l * c->E + e] += lc->counts[e];
        }
    }
    if (a->got < c->world) return;
    if (a->nterms == M) { /* the single process's order: micro-batch 0, 1, ... */
        a->ce = a->aux = a->z = 0.0;
        for (int m = 0; m < M; m++) a->ce += a->terms[3 * m], a->aux += a->terms[3 * m + 1], a->z += a->terms[3 * m + 2];
    }
    agg done = *a;
    c->pend[k] = c->pend[--c->npend];
    step_complete(c, &done);
    free(done.seen);
    free(done.counts);
    free(done.terms);
}

/* The open generation's placement grouped by owner (c->own_off, c->own_exp), built once a
 * generation; false when out of memory (or a placement naming a rank outside the world). */
static bool owner_index(sy_coord_t *c) {
    if (c->own_gen == c->gen && c->own_off) return true;
    int32_t *off = realloc(c->own_off, sizeof(int32_t) * (size_t)(c->world + 1));
    if (!off) return false;
    c->own_off = off;
    if (!c->own_exp && !(c->own_exp = malloc(sizeof(int32_t) * (size_t)(c->E > 0 ? c->E : 1)))) return false;
    if (sy_owners_group(c->placement, c->E, c->world, off, c->own_exp) >= 0) return false; /* not a placement of it */
    c->own_gen = c->gen;
    return true;
}

static int step_micro_batches(const sy_coord_t *c) {
    int b = c->cfg.train.micro_batch_seqs;
    return b > 0 ? c->cfg.train.global_batch_seqs / b : 0;
}

static void step_complete(sy_coord_t *c, agg *a) {
    double loss = a->ce + a->aux + a->z;
    double tps = a->step_ms > 0 ? a->tokens / (a->step_ms / 1e3) : 0;
    double dfrac = a->routed ? (double)a->dropped / (double)a->routed : 0;
    c->step = a->step;
    c->loss = loss, c->ce = a->ce, c->aux = a->aux, c->z = a->z, c->tps = tps, c->dropped_frac = dfrac;
    c->lr = a->lr, c->grad_norm = a->grad_norm;
    if (!isnan(a->val_loss)) c->val_loss = a->val_loss, c->val_step = a->step;
    if (a->counts_ok && c->load) {
        memcpy(c->load, a->counts, sizeof(uint64_t) * (size_t)(c->n_switch * c->E));
        c->load_valid = true;
        c->load_step = a->step;
    }
    if (c->nhist == LOSS_HISTORY) {
        memmove(c->hist, c->hist + 1, sizeof c->hist[0] * (LOSS_HISTORY - 1));
        c->nhist--;
    }
    c->hist[c->nhist].step = a->step;
    c->hist[c->nhist].loss = loss;
    c->nhist++;
    record_step_ms(c, a->step, a->step_ms);
    double now_s = sy_wall_s();
    sy_history_add(c->history,
                   &(sy_history_step){.step = a->step, .time = now_s, .loss = loss, .ce = a->ce, .aux = a->aux,
                                      .z = a->z, .lr = a->lr, .grad_norm = a->grad_norm, .tokens_per_s = tps,
                                      .dropped_frac = dfrac, .step_ms = a->step_ms, .world = c->world,
                                      .generation = c->gen, .val_loss = a->val_loss},
                   a->counts_ok ? a->counts : NULL);
    json_t *j = json_pack("{s:I, s:o, s:o, s:o, s:o, s:o, s:o, s:f, s:f, s:i, s:I, s:f, s:f}", "step",
                          (json_int_t)a->step, "loss", jnum(loss), "ce", jnum(a->ce), "aux", jnum(a->aux), "z",
                          jnum(a->z), "lr", jnum(a->lr), "grad_norm", jnum(a->grad_norm), "tokens_per_s", tps,
                          "dropped_frac", dfrac, "world", c->world, "generation", (json_int_t)c->gen, "step_ms",
                          a->step_ms, "time", now_s);
    if (j && !isnan(a->val_loss)) json_object_set_new(j, "val_loss", jnum(a->val_loss));
    char *line = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (line && c->metrics_f) {
        fprintf(c->metrics_f, "%s\n", line);
        fflush(c->metrics_f);
    }
    free(line);
    json_decref(j);
    if (!isnan(a->val_loss))
        sy_info("step %" PRId64 ": validation loss %.4f", a->step, a->val_loss);
    if (c->cfg.run.log_every > 0 && (a->step % c->cfg.run.log_every == 0 || a->step == c->cfg.run.steps))
        sy_info("step %" PRId64 "/%" PRId64 " | loss %.4f | %.0f tok/s | world %d | generation %" PRIu64, a->step,
                (int64_t)c->cfg.run.steps, loss, tps, c->world, c->gen);
    if (c->state == R_RECOVERING && c->nrec && c->rec[c->nrec - 1].duration_ms < 0) {
        recovery *r = &c->rec[c->nrec - 1];
        int64_t now = sy_mono_ms();
        r->duration_ms = (double)(now - r->detected);
        r->restore_step = c->restore_step;
        /* Phases: detect = last heard from the lost worker → declared lost (an upper bound of the
         * detection delay); reconfigure = → new generation opened; restore = → every member
         * restored its state; first step = → the first step of the new generation completed. */
        int64_t restored = r->restored ? r->restored : now;
        r->detect_ms = r->last_heard ? (double)(r->detected - r->last_heard) : 0.0;
        r->reconfigure_ms = r->opened ? (double)(r->opened - r->detected) : 0.0;
        r->restore_ms = r->opened ? (double)(restored - r->opened) : 0.0;
        r->first_step_ms = (double)(now - restored);
        sy_coord_event(c, "restore_done",
                       json_pack("{s:I, s:I, s:s, s:I, s:f, s:{s:f, s:f, s:f, s:f}}", "generation",
                                 (json_int_t)c->gen, "restore_step", (json_int_t)c->restore_step, "restore_source",
                                 r->restore_source, "step", (json_int_t)a->step,
                                 "recovery_ms", r->duration_ms, "phases_ms", "detect", r->detect_ms,
                                 "reconfigure", r->reconfigure_ms, "restore", r->restore_ms, "first_step",
                                 r->first_step_ms));
    }
    c->state = R_RUNNING;
    if (a->step > c->furthest) {
        c->furthest = a->step;
        c->fruitless = 0;
        c->accusations = 0;
        for (int i = 0; i < c->nw; i++) c->w[i].accused = 0, c->w[i].quarantined = false;
    }
    c->dirty = true;
    if (!isfinite(loss)) {
        char why[128];
        snprintf(why, sizeof why, "step %" PRId64 ": loss is not finite (diverged)", a->step);
        sy_error("%s", why);
        sy_coord_finish(c, R_FAILED, why);
        return;
    }
    sy_coord_maybe_finish(c);
    if (!c->done && c->gen_open && c->end_after > 0 && a->step >= c->end_after) { /* EndAfter: every member did it */
        char why[128];
        snprintf(why, sizeof why, "membership change after step %" PRId64, a->step);
        sy_coord_regroup(c, why);
    }
}

void sy_coord_history_reload(sy_coord_t *c, const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return; /* no file yet: nothing to show */
    char *line = NULL;
    size_t cap = 0;
    int n = 0, bad = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *j = json_loads(line, 0, NULL);
        json_t *st = json_object_get(j, "step");
        if (!json_is_integer(st) || json_integer_value(st) < 1) { /* a torn last line, or not ours */
            bad += j != NULL || line[0] != '\n';
            json_decref(j);
            continue;
        }
#define NUM(k) (json_is_number(json_object_get(j, k)) ? json_number_value(json_object_get(j, k)) : NAN)
        sy_history_step h = {.step = json_integer_value(st), .time = NUM("time"), .loss = NUM("loss"),
                             .ce = NUM("ce"), .aux = NUM("aux"), .z = NUM("z"), .lr = NUM("lr"),
                             .grad_norm = NUM("grad_norm"), .tokens_per_s = NUM("tokens_per_s"),
                             .dropped_frac = NUM("dropped_frac"), .step_ms = NUM("step_ms"),
                             .world = (int)json_integer_value(json_object_get(j, "world")),
                             .generation = (uint64_t)json_integer_value(json_object_get(j, "generation")),
                             .val_loss = NUM("val_loss")};
#undef NUM
        sy_history_add(c->history, &h, NULL); /* expert counts are not in metrics.jsonl */
        n++;
        json_decref(j);
    }
    free(line);
    fclose(f);
    if (n || bad) sy_info("history: %d step(s) of %s for the dashboard%s", n, path, bad ? " (unreadable lines skipped)" : "");
}

static void record_step_ms(sy_coord_t *c, int64_t step, double ms) {
    if (step > GOODPUT_MAX_STEPS) return;
    if (step >= c->ms_cap) {
        int64_t cap = c->ms_cap ? c->ms_cap : 1024;
        while (cap <= step) cap *= 2;
        double *n = realloc(c->ms_by_step, sizeof(double) * (size_t)cap);
        if (!n) return;
        memset(n + c->ms_cap, 0, sizeof(double) * (size_t)(cap - c->ms_cap));
        c->ms_by_step = n;
        c->ms_cap = cap;
    }
    c->useful_ms += ms - c->ms_by_step[step];
    c->ms_by_step[step] = ms;
}
