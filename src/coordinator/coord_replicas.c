/* Restores from the members' memory (coord_internal.h; docs/fault-tolerance.md "Peer replicas",
 * issue 18). A worker that leaves an aborted or failed generation reports its Holdings: the
 * whole states in its memory (its live state and its copy of the previous step, each dense +
 * its experts; the complete replicas of other workers' experts), each named by its optimizer
 * step. Every state of a step is the same whoever holds it (the run is deterministic and
 * W-invariant, model spec §5), so a recovery may assemble step R from pieces held anywhere: the
 * coordinator picks the newest R that the next generation's members cover whole, and tells each
 * member in its Assign which rank sends dense and which rank sends each expert. Thread: the
 * reactor's. */
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "coord_internal.h"

/* A recovery waits at most this many heartbeats for the survivors' Holdings (a survivor sends
 * them within SY_COMM_ABORT_MS of the Abort; one that does not is taken to hold nothing). */
#define HOLDINGS_WAIT_HEARTBEATS 2

void sy_coord_holdings_clear(worker *w) { w->nheld = 0; }

void sy_coord_on_holdings(sy_coord_t *c, worker *w, const Sy__Envelope *env) {
    const Sy__Holdings *h = env->holdings;
    if (env->generation != c->gen || env->generation == 0) {
        /* expected, not a drop: members also leave a generation closed for a membership change
         * (Abort, then the next Assign), and their Holdings arrive after it opened */
        sy_debug("holdings from %s for generation %" PRIu64 " (current %" PRIu64 "): not needed", w->id,
                 env->generation, c->gen);
        return;
    }
    if (h->n_held > SY_COORD_MAX_HELD) {
        sy_coord_drop(c, SY_DROP_INVALID, "holdings from %s: %zu states (at most %d)", w->id, h->n_held,
                      SY_COORD_MAX_HELD);
        return;
    }
    if (!w->held_ex && c->E > 0) {
        w->held_ex = calloc((size_t)SY_COORD_MAX_HELD * (size_t)c->E, 1);
        if (!w->held_ex) return;
    }
    for (size_t k = 0; k < h->n_held; k++) {
        const Sy__StateHeld *s = h->held[k];
        bool ok = s->step >= 0;
        for (size_t j = 0; ok && j < s->n_experts; j++) ok = s->experts[j] < (uint32_t)c->E;
        if (!ok) {
            sy_coord_drop(c, SY_DROP_INVALID, "holdings from %s: state %zu has step %" PRId64 " or an expert >= %d",
                          w->id, k, (int64_t)s->step, c->E);
            w->nheld = 0;
            return;
        }
    }
    w->nheld = 0;
    for (size_t k = 0; k < h->n_held; k++) {
        const Sy__StateHeld *s = h->held[k];
        w->held_step[k] = s->step;
        w->held_dense[k] = s->dense;
        if (c->E > 0) {
            memset(w->held_ex + k * (size_t)c->E, 0, (size_t)c->E);
            for (size_t j = 0; j < s->n_experts; j++) w->held_ex[k * (size_t)c->E + s->experts[j]] = 1;
        }
    }
    w->nheld = (int)h->n_held;
    w->held_gen = env->generation;
    sy_debug("holdings from %s: %d state(s)", w->id, w->nheld);
    if (!c->gen_open) c->cron_now = true; /* the next generation may wait for these: open it now */
}

bool sy_coord_holdings_pending(sy_coord_t *c) {
    bool recovering = c->nrec && c->rec[c->nrec - 1].duration_ms < 0;
    if (c->cfg.cluster.replicas <= 0 || c->gen_open || (!recovering && !c->regroup_since)) return false;
    int64_t since = recovering ? c->rec[c->nrec - 1].detected : c->regroup_since;
    /* A membership change at an EndAfter step loses nobody: its members send their Holdings once
     * the replicas of that step have crossed (a loaded machine may take longer than two
     * heartbeats), so it waits up to failure_timeout_ms, by which time a member that died
     * meanwhile is declared lost anyway; giving up earlier would restore a step less. */
    int64_t bound = (int64_t)HOLDINGS_WAIT_HEARTBEATS * c->cfg.cluster.heartbeat_ms;
    if (!recovering && bound < c->cfg.cluster.failure_timeout_ms) bound = c->cfg.cluster.failure_timeout_ms;
    if (sy_mono_ms() - since > bound) return false;
    for (int r = 0; r < c->prev_world; r++) {
        int i = c->members[r];
        if (i < 0 || i >= c->nw) continue;
        const worker *w = &c->w[i];
        if (w->state == W_IDLE && w->held_gen != c->gen) return true;
    }
    return false;
}

/* Does worker w hold expert e (e < 0: dense) of step s whole? */
static bool holds(const sy_coord_t *c, const worker *w, int64_t s, int e) {
    for (int k = 0; k < w->nheld; k++) {
        if (w->held_step[k] != s) continue;
        if (e < 0 ? w->held_dense[k] : w->held_ex[k * (size_t)c->E + e] != 0) return true;
    }
    return false;
}

/* A plan of step s over ranks 0..n-1 (dense_source, expert_source), or false. The new owner
 * sends itself what it holds (no transfer); otherwise the lowest rank holding it sends. */
static bool plan_step(sy_coord_t *c, int n, int64_t s) {
    c->dense_source = -1;
    for (int r = 0; r < n && c->dense_source < 0; r++)
        if (holds(c, &c->w[c->members[r]], s, -1)) c->dense_source = r;
    if (c->dense_source < 0) return false;
    for (int e = 0; e < (c->n_switch > 0 ? c->E : 0); e++) { /* a dense model: no expert state */
        int own = (int)c->placement[e];
        c->expert_source[e] = -1;
        if (holds(c, &c->w[c->members[own]], s, e)) c->expert_source[e] = own;
        for (int r = 0; r < n && c->expert_source[e] < 0; r++)
            if (holds(c, &c->w[c->members[r]], s, e)) c->expert_source[e] = r;
        if (c->expert_source[e] < 0) return false;
    }
    if (c->n_switch <= 0)
        for (int e = 0; e < c->E; e++) c->expert_source[e] = (int32_t)c->placement[e];
    return true;
}

bool sy_coord_plan_from_replicas(sy_coord_t *c, int n) {
    if (c->cfg.cluster.replicas <= 0) return false;
    if (!c->expert_source) {
        c->expert_source = calloc((size_t)(c->E > 0 ? c->E : 1), sizeof(int32_t));
        if (!c->expert_source) return false;
    }
    /* candidates: the steps of the dense states held, newest first */
    int64_t best = -1;
    for (;;) {
        int64_t s = -1;
        for (int r = 0; r < n; r++) {
            const worker *w = &c->w[c->members[r]];
            for (int k = 0; k < w->nheld; k++)
                if (w->held_dense[k] && w->held_step[k] > s && (best < 0 || w->held_step[k] < best))
                    s = w->held_step[k];
        }
        /* older than the latest checkpoint: the checkpoint is the better restore point; the
         * run's last step: its final checkpoint must still be written by running it */
        if (s < 0 || s < c->latest_ckpt || s >= c->cfg.run.steps) {
            if (s >= c->cfg.run.steps) {
                best = s;
                continue;
            }
            return false;
        }
        if (plan_step(c, n, s)) {
            c->restore_step = s;
            return true;
        }
        best = s;
    }
}
