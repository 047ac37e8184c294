/* /v1/status and /metrics of the coordinator, built from its state (coord_internal.h); the
 * reactor publishes both through http.h. */
#include <math.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "coord_internal.h"

json_t *sy_coord_status_json(sy_coord_t *c) {
    int64_t now = sy_mono_ms();
    json_t *j = json_object();
    char inc[24];
    snprintf(inc, sizeof inc, "%016" PRIx64, c->incarnation);
    json_object_set_new(j, "run", json_string(c->cfg.run.name));
    json_object_set_new(j, "state", json_string(sy_coord_rstate[c->state]));
    json_object_set_new(j, "step", json_integer(c->step));
    json_object_set_new(j, "total_steps", json_integer(c->cfg.run.steps));
    json_object_set_new(j, "generation", json_integer((json_int_t)c->gen));
    json_object_set_new(j, "world", json_integer(c->gen_open ? c->world : 0));
    json_object_set_new(j, "incarnation", json_string(inc));
    json_object_set_new(j, "uptime_s", json_real((now - c->t0_mono) / 1e3));
    json_t *ws = json_array();
    for (int i = 0; i < c->nw; i++) {
        const worker *w = &c->w[i];
        json_array_append_new(ws, json_pack("{s:s, s:s, s:i, s:i, s:s, s:s, s:I, s:I, s:o, s:s, s:s, s:{s:I, s:I}}",
                                            "id", w->id, "host", w->host, "pid", (int)w->pid, "rank", w->rank,
                                            "state", sy_coord_wstate[w->state], "activity", w->activity,
                                            "last_heartbeat_ms", (json_int_t)(now - w->last_seen), "step",
                                            (json_int_t)w->step, "step_ms", jnum(w->step_ms), "backend", w->backend,
                                            "data_endpoint", w->data_ep, "dataplane", "dropped",
                                            (json_int_t)w->dp_dropped, "refused", (json_int_t)w->dp_refused));
    }
    json_object_set_new(j, "workers", ws);
    json_t *pl = json_array();
    for (int e = 0; c->gen_open && e < c->E; e++) json_array_append_new(pl, json_integer(c->placement[e]));
    json_object_set_new(j, "placement", pl);
    json_object_set_new(j, "latest_checkpoint",
                        c->latest_ckpt >= 0 ? json_pack("{s:I, s:f, s:f}", "step", (json_int_t)c->latest_ckpt,
                                                        "committed_at", c->latest_ckpt_time, "seconds",
                                                        c->ckpt_seconds)
                                            : json_null());
    json_object_set_new(j, "checkpoint_commits_in_flight", json_integer(sy_committer_in_flight(c->committer)));
    bool have = c->nhist > 0;
    json_object_set_new(j, "loss", have ? jnum(c->loss) : json_null());
    json_object_set_new(j, "ce", have ? jnum(c->ce) : json_null());
    json_object_set_new(j, "aux", have ? jnum(c->aux) : json_null());
    json_object_set_new(j, "z", have ? jnum(c->z) : json_null());
    json_object_set_new(j, "lr", have ? jnum(c->lr) : json_null());
    json_object_set_new(j, "grad_norm", have ? jnum(c->grad_norm) : json_null());
    json_object_set_new(j, "val_loss", !isnan(c->val_loss) ? jnum(c->val_loss) : json_null());
    json_object_set_new(j, "val_step", !isnan(c->val_loss) ? json_integer((json_int_t)c->val_step) : json_null());
    json_t *rl = json_array();
    for (int i = 0; i < c->nhist; i++)
        json_array_append_new(rl, json_pack("{s:I, s:o}", "step", (json_int_t)c->hist[i].step, "loss", jnum(c->hist[i].loss)));
    json_object_set_new(j, "recent_loss", rl);
    json_object_set_new(j, "tokens_per_second", json_real(c->tps));
    json_object_set_new(j, "dropped_fraction", json_real(c->dropped_frac));
    json_t *layers = json_array();
    for (int l = 0; c->load_valid && l < c->n_switch; l++) {
        json_t *row = json_array();
        for (int e = 0; e < c->E; e++) json_array_append_new(row, json_integer((json_int_t)c->load[l * c->E + e]));
        json_array_append_new(layers, row);
    }
    json_object_set_new(j, "expert_load", json_pack("{s:o, s:o}", "step",
                                                    c->load_valid ? json_integer(c->load_step) : json_null(),
                                                    "layers", layers));
    json_t *rs = json_array();
    for (int i = 0; i < c->nrec; i++) {
        const recovery *r = &c->rec[i];
        json_t *ph = r->duration_ms >= 0
                         ? json_pack("{s:f, s:f, s:f, s:f}", "detect", r->detect_ms, "reconfigure",
                                     r->reconfigure_ms, "restore", r->restore_ms, "first_step", r->first_step_ms)
                         : json_null();
        json_array_append_new(rs, json_pack("{s:I, s:s, s:O, s:I, s:s, s:o, s:o}", "generation",
                                            (json_int_t)r->generation, "reason", r->reason, "lost", r->lost,
                                            "restore_step", (json_int_t)r->restore_step, "restore_source",
                                            r->restore_source, "duration_ms",
                                            r->duration_ms >= 0 ? json_real(r->duration_ms) : json_null(),
                                            "phases_ms", ph));
    }
    json_object_set_new(j, "recoveries", rs);
    json_t *dm = json_object();
    for (int k = 1; k < SY_DROP__COUNT; k++)
        json_object_set_new(dm, sy_proto_drop_name((sy_proto_drop)k), json_integer((json_int_t)c->drops[k]));
    json_object_set_new(j, "dropped_messages", dm);
    json_object_set_new(j, "security",
                        json_pack("{s:b, s:b, s:i, s:I, s:I, s:I}", "curve", c->zap != NULL, "insecure",
                                  c->cfg.cluster.insecure, "authorized_keys",
                                  sy_zap_authorized(c->zap), "accepted", (json_int_t)sy_zap_accepted(c->zap),
                                  "refused_keys", (json_int_t)sy_zap_refused(c->zap), "failed_handshakes",
                                  (json_int_t)c->hs_failed));
    double elapsed = c->first_open ? (double)(now - c->first_open) : 0;
    double gp = elapsed > 0 ? c->useful_ms / elapsed : 0;
    json_object_set_new(j, "goodput", json_real(gp > 1 ? 1 : gp < 0 ? 0 : gp));
    json_object_set_new(j, "events", json_deep_copy(c->events));
    return j;
}

typedef struct {
    char *buf;
    size_t len, cap;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(b->buf ? b->buf + b->len : NULL, b->buf ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (b->buf && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t nc = (b->cap ? b->cap * 2 : 4096) + (size_t)n;
        char *nb = realloc(b->buf, nc);
        if (!nb) return;
        b->buf = nb;
        b->cap = nc;
    }
}

/* A label value with '\\', '"' and newlines escaped (exposition format); cap >= 2 * strlen + 1. */
static const char *prom_label(char *out, size_t cap, const char *v) {
    size_t o = 0;
    for (; *v && o + 3 < cap; v++) {
        if (*v == '\\' || *v == '"') out[o++] = '\\', out[o++] = *v;
        else if (*v == '\n') out[o++] = '\\', out[o++] = 'n';
        else out[o++] = *v;
    }
    out[o] = 0;
    return out;
}

static void prom_head(sbuf *b, const char *name, const char *type, const char *help) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void prom_gauge(sbuf *b, const char *name, const char *help, double v) {
    prom_head(b, name, "gauge", help);
    if (isfinite(v)) sb_printf(b, "%s %.17g\n", name, v);
    else sb_printf(b, "%s NaN\n", name);
}

char *sy_coord_metrics_text(sy_coord_t *c) {
    sbuf b = {0};
    bool have = c->nhist > 0;
    prom_gauge(&b, "switchyard_step", "Last completed optimizer step.", (double)c->step);
    prom_gauge(&b, "switchyard_total_steps", "Optimizer steps in the run.", (double)c->cfg.run.steps);
    prom_gauge(&b, "switchyard_loss", "Training loss (ce + aux + z) of the last step.", have ? c->loss : NAN);
    prom_gauge(&b, "switchyard_ce", "Cross-entropy of the last step.", have ? c->ce : NAN);
    prom_gauge(&b, "switchyard_aux", "Load-balancing loss (weighted) of the last step.", have ? c->aux : NAN);
    prom_gauge(&b, "switchyard_z", "Router z-loss (weighted) of the last step.", have ? c->z : NAN);
    prom_gauge(&b, "switchyard_learning_rate", "Learning rate of the last step.", have ? c->lr : NAN);
    prom_gauge(&b, "switchyard_grad_norm", "Global gradient norm (before clipping) of the last step.",
               have ? c->grad_norm : NAN);
    prom_gauge(&b, "switchyard_val_loss", "Validation loss of the last validation (train.eval_every).", c->val_loss);
    prom_gauge(&b, "switchyard_tokens_per_second", "Training throughput of the last step.", c->tps);
    prom_gauge(&b, "switchyard_generation", "Current generation.", (double)c->gen);
    prom_gauge(&b, "switchyard_world", "Workers in the current generation.", (double)(c->gen_open ? c->world : 0));
    prom_head(&b, "switchyard_workers", "gauge", "Registered workers by state.");
    int cnt[W__COUNT] = {0};
    for (int i = 0; i < c->nw; i++) cnt[c->w[i].state]++;
    for (int s = 0; s < W__COUNT; s++) sb_printf(&b, "switchyard_workers{state=\"%s\"} %d\n", sy_coord_wstate[s], cnt[s]);
    /* per layer: the most and fewest tokens an expert got, and max / mean (1 = balanced) */
    const char *sum_name[3] = {"switchyard_layer_tokens_max", "switchyard_layer_tokens_min", "switchyard_layer_imbalance"};
    const char *sum_help[3] = {"Most tokens routed to one expert of each Switch layer in the last step.",
                               "Fewest tokens routed to one expert of each Switch layer in the last step.",
                               "Expert load imbalance of each Switch layer in the last step: max / mean tokens per expert."};
    for (int k = 0; k < 3; k++) {
        prom_head(&b, sum_name[k], "gauge", sum_help[k]);
        for (int l = 0; c->load_valid && l < c->n_switch && c->E > 0; l++) {
            const uint64_t *ld = c->load + (size_t)l * c->E;
            uint64_t mx = ld[0], mn = ld[0], sum = 0;
            for (int e = 0; e < c->E; e++) mx = ld[e] > mx ? ld[e] : mx, mn = ld[e] < mn ? ld[e] : mn, sum += ld[e];
            if (k < 2)
                sb_printf(&b, "%s{layer=\"%d\"} %" PRIu64 "\n", sum_name[k], l, k == 0 ? mx : mn);
            else if (sum)
                sb_printf(&b, "%s{layer=\"%d\"} %.17g\n", sum_name[k], l, (double)mx * c->E / (double)sum);
            else
                sb_printf(&b, "%s{layer=\"%d\"} NaN\n", sum_name[k], l);
        }
    }
    /* every expert, when that is few enough series for a scraper (status.metrics_expert_series) */
    prom_head(&b, "switchyard_expert_tokens", "gauge", "Tokens routed to each expert in the last step (all ranks).");
    const bool per_expert = (int64_t)c->n_switch * c->E <= c->cfg.status.metrics_expert_series;
    for (int l = 0; per_expert && c->load_valid && l < c->n_switch; l++)
        for (int e = 0; e < c->E; e++)
            sb_printf(&b, "switchyard_expert_tokens{layer=\"%d\",expert=\"%d\"} %" PRIu64 "\n", l, e, c->load[l * c->E + e]);
    prom_gauge(&b, "switchyard_dropped_fraction", "Fraction of routed tokens dropped by capacity in the last step.",
               c->dropped_frac);
    prom_gauge(&b, "switchyard_checkpoint_step", "Step of the latest committed checkpoint (-1: none).",
               (double)c->latest_ckpt);
    prom_gauge(&b, "switchyard_checkpoint_seconds", "Seconds from the first part to the commit of the latest checkpoint.",
               c->ckpt_seconds);
    prom_head(&b, "switchyard_recoveries_total", "counter", "Recoveries (generations aborted by a failure).");
    sb_printf(&b, "switchyard_recoveries_total %d\n", c->nrec);
    double last_rec = 0;
    for (int i = 0; i < c->nrec; i++)
        if (c->rec[i].duration_ms >= 0) last_rec = c->rec[i].duration_ms / 1e3;
    prom_gauge(&b, "switchyard_recovery_seconds", "Duration of the last completed recovery.", last_rec);
    prom_head(&b, "switchyard_dropped_messages_total", "counter", "Control-plane messages dropped, by reason.");
    for (int k = 1; k < SY_DROP__COUNT; k++)
        sb_printf(&b, "switchyard_dropped_messages_total{reason=\"%s\"} %" PRIu64 "\n",
                  sy_proto_drop_name((sy_proto_drop)k), c->drops[k]);
    prom_head(&b, "switchyard_curve_refused_total", "counter",
              "Control-plane connections refused: unlisted CURVE keys (ZAP) and failed handshakes.");
    sb_printf(&b, "switchyard_curve_refused_total{reason=\"key\"} %" PRIu64 "\n", sy_zap_refused(c->zap));
    sb_printf(&b, "switchyard_curve_refused_total{reason=\"handshake\"} %" PRIu64 "\n", c->hs_failed);
    char lab[2 * ID_MAX + 1];
    prom_head(&b, "switchyard_dataplane_dropped_total", "counter",
              "Data-plane messages a worker dropped (older generation, malformed, or from another rank's key).");
    /* a worker's series appears once its count is not 0 (10,000 zeros would be 1.2 MB) */
    for (int i = 0; i < c->nw; i++)
        if (c->w[i].dp_dropped)
            sb_printf(&b, "switchyard_dataplane_dropped_total{worker=\"%s\"} %" PRIu64 "\n",
                      prom_label(lab, sizeof lab, c->w[i].id), c->w[i].dp_dropped);
    prom_head(&b, "switchyard_dataplane_refused_total", "counter",
              "CURVE handshakes a worker's data plane refused (a key not of the generation's members).");
    for (int i = 0; i < c->nw; i++)
        if (c->w[i].dp_refused)
            sb_printf(&b, "switchyard_dataplane_refused_total{worker=\"%s\"} %" PRIu64 "\n",
                      prom_label(lab, sizeof lab, c->w[i].id), c->w[i].dp_refused);
    double elapsed = c->first_open ? (double)(sy_mono_ms() - c->first_open) : 0;
    double gp = elapsed > 0 ? c->useful_ms / elapsed : 0;
    prom_gauge(&b, "switchyard_goodput", "Step time of kept steps / wall time since the first generation.",
               gp > 1 ? 1 : gp < 0 ? 0 : gp);
    return b.buf;
}

