/* Checkpoints of the coordinator (coord_internal.h): the CheckpointPart of every rank of a step
 * is checked and merged; once all are in and cover dense + every expert, the commit goes to the
 * committer thread (committer.h) with the manifest's extra fields. Its result, polled by the
 * reactor, updates the latest checkpoint, ends the run after the final one, re-runs a final
 * checkpoint that failed, and makes due membership changes at a committed checkpoint.
 * Thread: the reactor's. */
#include <inttypes.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "coordinator/committer.h"
#include "proto/protocol.h"
#include "storage/ckpt.h"
#include "storage/ckpt_run.h"
#include "storage/store.h"
#include "coord_internal.h"

static void commit_part(sy_coord_t *c, int k);
static bool parts_cover(sy_coord_t *c, const json_t *files, char *missing, size_t cap);
static json_t *manifest_extra(sy_coord_t *c, int64_t step);
static void on_commit_result(sy_coord_t *c, const sy_commit_result *r);
static void after_commit(sy_coord_t *c, int64_t step, uint64_t gen, bool committed);
static bool membership_change_due(sy_coord_t *c);

/* ---------------------------------------------------------------------------------------- */
/* Parts from the ranks                                                                     */

void sy_coord_on_checkpoint_part(sy_coord_t *c, worker *w, const Sy__CheckpointPart *cp) {
    int64_t step = (int64_t)cp->step;
    if (step < 1 || step > c->end_step || step <= c->restore_step) {
        sy_coord_drop(c, SY_DROP_INVALID, "CheckpointPart from %s: step %" PRId64 " outside this generation", w->id,
                      step);
        return;
    }
    if (step <= c->latest_ckpt) return; /* already committed (e.g. forced + periodic) */
    for (size_t i = 0; i < cp->n_objects; i++) {
        const Sy__ObjectInfo *o = cp->objects[i];
        const char *nm = o->name, *h = o->sha256;
        bool ok = nm && *nm && strlen(nm) < 128 && !strchr(nm, '/') && sy_store_key_valid(nm) && h &&
                  strlen(h) == 64 && strcmp(nm, SY_CKPT_MANIFEST) != 0 && o->size <= (uint64_t)INT64_MAX;
        for (const char *q = h; ok && *q; q++) ok = (*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'f');
        /* Fencing: the part's object must be named for this generation and the sender's rank,
         * so the commit lists only objects this generation's members wrote. */
        char want[200];
        if (ok && snprintf(want, sizeof want, "g%" PRIu64 "-r%d.%s", c->gen, w->rank, nm) >= (int)sizeof want) ok = false;
        if (ok && (!o->object || strcmp(o->object, want) != 0)) {
            sy_coord_drop(c, SY_DROP_INVALID, "CheckpointPart from %s step %" PRId64 ": object '%s' of %s is not "
                          "'%s' (written by another generation or rank?)", w->id, step, o->object ? o->object : "",
                          nm, want);
            return;
        }
        if (!ok) {
            sy_coord_drop(c, SY_DROP_INVALID, "CheckpointPart from %s step %" PRId64 ": object %zu is not a valid "
                          "{name, size, sha256}", w->id, step, i);
            return;
        }
    }
    int k = -1;
    for (int i = 0; i < c->nparts; i++)
        if (c->parts[i].step == step) k = i;
    if (k < 0) {
        if (c->nparts == MAX_PENDING) {
            sy_coord_drop(c, SY_DROP_UNEXPECTED, "CheckpointPart from %s: too many checkpoints in flight", w->id);
            return;
        }
        k = c->nparts++;
        cpart *p = &c->parts[k];
        memset(p, 0, sizeof *p);
        p->step = step;
        p->seen = calloc((size_t)c->world, 1);
        p->files = json_array();
        p->first = sy_mono_ms();
    }
    cpart *p = &c->parts[k];
    if (!p->seen || p->seen[w->rank]) {
        sy_coord_drop(c, SY_DROP_UNEXPECTED, "CheckpointPart from %s: step %" PRId64 " reported twice", w->id, step);
        return;
    }
    for (size_t i = 0; i < cp->n_objects; i++) {
        const Sy__ObjectInfo *o = cp->objects[i];
        bool dup = false;
        size_t j;
        json_t *f;
        json_array_foreach(p->files, j, f) if (!strcmp(json_string_value(json_object_get(f, "name")), o->name)) dup = true;
        if (dup) {
            sy_warn("checkpoint step %" PRId64 ": %s listed %s again; keeping the first", step, w->id, o->name);
            continue;
        }
        json_array_append_new(p->files, json_pack("{s:s, s:s, s:I, s:s}", "name", o->name, "object", o->object,
                                                  "size", (json_int_t)o->size, "sha256", o->sha256));
    }
    p->seen[w->rank] = 1;
    if (++p->got == c->world) commit_part(c, k);
}

/* Every rank's part of checkpoint parts[k] is in: hand its commit to the committer thread. */
static void commit_part(sy_coord_t *c, int k) {
    cpart *p = &c->parts[k];
    int64_t step = p->step;
    char missing[64];
    bool submitted = false;
    if (!parts_cover(c, p->files, missing, sizeof missing)) {
        sy_coord_event(c, "checkpoint_failed", json_pack("{s:I, s:s}", "step", (json_int_t)step, "error",
                                                         "parts of every rank arrived but do not cover the model"));
        sy_error("checkpoint step %" PRId64 ": no rank sent %s", step, missing);
    } else {
        json_t *ex = manifest_extra(c, step);
        if (sy_committer_submit(c->committer, step, c->gen, p->first, &p->files, &ex) == SY_OK) {
            submitted = true;
        } else {
            json_decref(ex);
            sy_coord_event(c, "checkpoint_failed",
                           json_pack("{s:I, s:s}", "step", (json_int_t)step, "error", sy_err_msg()));
        }
    }
    /* This step and older ones are settled. */
    int keep = 0;
    for (int i = 0; i < c->nparts; i++) {
        if (c->parts[i].step <= step) {
            free(c->parts[i].seen);
            json_decref(c->parts[i].files);
        } else {
            c->parts[keep++] = c->parts[i];
        }
    }
    c->nparts = keep;
    if (!submitted) after_commit(c, step, c->gen, false);
}

/* Dense and every expert's weights are among the files (optimizer files are not checked). */
static bool parts_cover(sy_coord_t *c, const json_t *files, char *missing, size_t cap) {
    char want[64];
    int n = c->n_switch > 0 ? c->E : 0;
    for (int k = -1; k < n; k++) {
        if (k < 0) sy_ckpt_file_dense(want, sizeof want, 0);
        else sy_ckpt_file_expert(want, sizeof want, k, 0);
        bool found = false;
        size_t i;
        json_t *f;
        json_array_foreach(files, i, f) {
            const char *nm = json_string_value(json_object_get(f, "name"));
            if (nm && !strcmp(nm, want)) found = true;
        }
        if (!found) {
            snprintf(missing, cap, "%s", want);
            return false;
        }
    }
    return true;
}

static json_t *manifest_extra(sy_coord_t *c, int64_t step) {
    json_t *ex = json_object();
    json_object_set_new(ex, "writer", json_string(c->writer));
    json_object_set_new(ex, "config", sy_config_to_json(&c->cfg));
    json_object_set_new(ex, "data_position",
                        json_pack("{s:I, s:I}", "next_step", (json_int_t)(step + 1), "first_sample",
                                  (json_int_t)(step * c->cfg.train.global_batch_seqs)));
    json_object_set_new(ex, "rng", json_pack("{s:s, s:I}", "kind", "splitmix64-keyed", "seed",
                                             (json_int_t)c->cfg.run.seed));
    json_object_set_new(ex, "world", json_integer(c->world));
    json_object_set_new(ex, "generation", json_integer((json_int_t)c->gen));
    json_object_set_new(ex, "optimizer_step", json_integer(step));
    json_t *pl = json_array();
    for (int e = 0; e < c->E; e++) json_array_append_new(pl, json_integer(c->placement[e]));
    json_object_set_new(ex, "placement", pl);
    return ex;
}

/* ---------------------------------------------------------------------------------------- */
/* Commit results                                                                           */

void sy_coord_drain_commits(sy_coord_t *c) {
    sy_commit_result r;
    while (sy_committer_next(c->committer, &r)) on_commit_result(c, &r);
}

static void on_commit_result(sy_coord_t *c, const sy_commit_result *r) {
    sy_status s = r->status;
    if (s == SY_EEXIST) { /* only when this coordinator's writer committed it (ckpt.h) */
        sy_warn("checkpoint step %" PRId64 " was already committed by this run; keeping it", r->step);
        s = SY_OK;
    }
    if (s != SY_OK) {
        sy_coord_event(c, "checkpoint_failed", json_pack("{s:I, s:s}", "step", (json_int_t)r->step, "error", r->error));
        sy_error("checkpoint step %" PRId64 ": %s", r->step, r->error);
        if (s == SY_ECONFLICT && !c->done) { /* fenced off: another writer owns the run now */
            sy_coord_finish(c, R_FAILED, r->error);
            return;
        }
    } else {
        if (r->step > c->latest_ckpt) c->latest_ckpt = r->step;
        c->latest_ckpt_time = sy_wall_s();
        if (r->retain_failed) sy_warn("checkpoint retention: %s", r->retain_error);
        c->ckpt_seconds = (sy_mono_ms() - r->since_ms) / 1e3;
        sy_coord_event(c, "checkpoint_committed",
                       json_pack("{s:I, s:i, s:f, s:f, s:I}", "step", (json_int_t)r->step, "files", r->n_files,
                                 "seconds", c->ckpt_seconds, "commit_ms", r->commit_ms, "generation",
                                 (json_int_t)r->generation));
    }
    if (!c->done) after_commit(c, r->step, r->generation, s == SY_OK);
}

/* After a commit attempt of `step` (made in generation `gen`): the run may end, a failed final
 * checkpoint is re-run, and a due membership change happens at a committed checkpoint. */
static void after_commit(sy_coord_t *c, int64_t step, uint64_t gen, bool committed) {
    bool current = c->gen_open && gen == c->gen;
    if (current && c->latest_ckpt < step && step == c->end_step) {
        /* Workers wait after their last step: without its checkpoint the run cannot end, so
         * it is re-run from the latest committed checkpoint (bounded by the recovery limit). */
        sy_coord_begin_recovery(c, "the final checkpoint could not be committed", NULL);
        return;
    }
    sy_coord_maybe_finish(c);
    /* Not while a newer commit is in flight: the new generation restores the latest one. */
    if (!c->done && current && committed && c->latest_ckpt == step && step < c->end_step &&
        sy_committer_in_flight(c->committer) == 0 && membership_change_due(c)) {
        char why[128];
        /* With replicas (W > 1) the members hold a newer whole state than the checkpoint: the
         * generation ends at a step boundary two steps ahead of the furthest report (no rank can
         * have finished it yet: EndAfter), and the next one restores that step from their
         * memory, so nothing is cut short or run again. Too close to the end: at once. */
        int64_t at = c->max_reported + 2;
        if (c->cfg.cluster.replicas > 0 && c->world > 1 && c->end_after == 0 && at < c->end_step) {
            c->end_after = at;
            Sy__Envelope env;
            Sy__EndAfter ea = SY__END_AFTER__INIT;
            sy_proto_init(&env, c->cfg.run.name, c->incarnation, c->gen);
            ea.step = (uint64_t)at;
            env.body_case = SY__ENVELOPE__BODY_END_AFTER;
            env.end_after = &ea;
            sy_coord_send_members(c, &env);
            sy_info("membership change at checkpoint %" PRId64 ": generation %" PRIu64 " ends after step %" PRId64,
                    step, c->gen, at);
        } else if (c->end_after == 0) {
            snprintf(why, sizeof why, "membership change at checkpoint %" PRId64, step);
            sy_coord_regroup(c, why);
        }
    }
}

void sy_coord_regroup(sy_coord_t *c, const char *why) {
    sy_coord_close_generation(c, why);
    /* With replicas the members hold a newer whole state than the checkpoint (the steps run
     * since it): the next generation restores that, once their Holdings are in (the cron opens
     * it; bounded like a recovery's wait), instead of re-running the steps since the checkpoint
     * and loading the store. */
    if (c->cfg.cluster.replicas > 0) {
        c->regroup_since = sy_mono_ms();
        c->cron_now = true; /* the Holdings may all be in already (EndAfter) */
    } else {
        sy_coord_open_generation(c);
    }
}

static bool membership_change_due(sy_coord_t *c) {
    int idle = 0;
    for (int i = 0; i < c->nw; i++) {
        if (c->w[i].state == W_DRAINING) return true;
        if (c->w[i].state == W_IDLE) idle++;
    }
    return idle > 0 && c->world < c->cfg.cluster.max_workers;
}

void sy_coord_maybe_finish(sy_coord_t *c) {
    if (!c->done && c->step >= c->cfg.run.steps && c->latest_ckpt >= c->cfg.run.steps) {
        /* finished only once the final checkpoint reads back from the store as this run's */
        if (sy_run_verify_checkpoint(c->store, c->cfg.run.name, c->cfg.run.steps, c->writer) != SY_OK) {
            char why[600];
            snprintf(why, sizeof why, "final checkpoint: %s", sy_err_msg());
            sy_error("%s", why);
            sy_coord_finish(c, R_FAILED, why);
            return;
        }
        sy_coord_finish(c, R_FINISHED, "all steps done");
    }
}
