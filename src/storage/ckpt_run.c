/* Run ownership in a checkpoint store; see ckpt_run.h. */
#include "storage/ckpt_run.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "storage/ckpt.h"
#include "base/clock.h"
#include "base/log.h"

#define KEY_MAX 1024

static sy_status run_key(char *buf, size_t cap, const char *run, const char *rest) {
    int k = snprintf(buf, cap, "%s/%s", run ? run : "", rest);
    if (!run || !run[0] || k < 0 || (size_t)k >= cap || !sy_store_key_valid(buf))
        return sy_err_set(SY_EINVAL, "run '%s': not a valid run name for a store key", run ? run : "(null)");
    return SY_OK;
}

static void utc_now(char *buf, size_t cap, const char *fmt) {
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(buf, cap, fmt, &tm);
}

static const char *str_or(const json_t *j, const char *k) {
    const char *v = json_string_value(json_object_get(j, k));
    return v ? v : "?";
}

static sy_status new_writer_id(char out[SY_RUN_WRITER_HEX + 1]) {
    unsigned char b[SY_RUN_WRITER_HEX / 2];
    if (getrandom(b, sizeof b, 0) != (ssize_t)sizeof b) {
        /* no entropy source: time and pid still tell two writers apart */
        uint64_t x = (uint64_t)(sy_wall_s() * 1e6) ^ ((uint64_t)getpid() << 32), y = x * 0x9e3779b97f4a7c15ull;
        memcpy(b, &x, 8);
        memcpy(b + 8, &y, 8);
    }
    for (size_t i = 0; i < sizeof b; i++) snprintf(out + 2 * i, 3, "%02x", b[i]);
    return SY_OK;
}

/* The writer id RUN.json names (*writer: malloc'ed); SY_ENOTFOUND if there is no RUN.json. */
static sy_status read_writer(sy_store_t *st, const char *run, char **writer) {
    char key[KEY_MAX];
    void *buf = NULL;
    size_t len = 0;
    json_error_t jerr;
    *writer = NULL;
    SY_CHECK(run_key(key, sizeof key, run, SY_RUN_OBJECT));
    SY_CHECK(sy_store_get(st, key, &buf, &len));
    json_t *j = json_loadb(buf, len, 0, &jerr);
    free(buf);
    const json_t *f = j ? json_object_get(j, "format") : NULL, *w = j ? json_object_get(j, "writer") : NULL;
    sy_status rc = SY_OK;
    if (!j || !json_is_string(f) || strcmp(json_string_value(f), SY_RUN_FORMAT) || !json_is_string(w))
        rc = sy_err_set(SY_ECORRUPT, "run lock %s in %s: not a %s object with a writer", key, sy_store_url(st),
                        SY_RUN_FORMAT);
    else if (!(*writer = strdup(json_string_value(w))))
        rc = sy_err_set(SY_ENOMEM, "out of memory");
    json_decref(j);
    return rc;
}

sy_status sy_run_check_writer(sy_store_t *st, const char *run, const char *writer) {
    char *have = NULL;
    sy_status rc = read_writer(st, run, &have);
    if (rc == SY_ENOTFOUND)
        return sy_err_set(SY_ECONFLICT, "run %s in %s: its lock %s/%s is gone (the run was moved or deleted by "
                          "someone else); this writer (%s) stops committing", run, sy_store_url(st), run,
                          SY_RUN_OBJECT, writer);
    if (rc != SY_OK) return rc;
    if (strcmp(have, writer))
        rc = sy_err_set(SY_ECONFLICT, "run %s in %s is now owned by writer %s, not by this writer %s: another "
                        "process claimed the run (a second trainer or coordinator, or --overwrite); this one stops "
                        "instead of committing over it", run, sy_store_url(st), have, writer);
    free(have);
    return rc;
}

sy_status sy_run_verify_checkpoint(sy_store_t *st, const char *run, int64_t step, const char *writer) {
    json_t *m = NULL;
    SY_CHECK(sy_ckpt_read_manifest(st, run, step, &m));
    sy_status rc = sy_ckpt_check_files(st, m);
    const json_t *w = json_object_get(m, "writer");
    if (rc == SY_OK && writer && (!json_is_string(w) || strcmp(json_string_value(w), writer)))
        rc = sy_err_set(SY_ECONFLICT, "checkpoint %s step %" PRId64 " in %s was committed by writer %s, not by this "
                        "writer %s", run, step, sy_store_url(st), json_is_string(w) ? json_string_value(w) : "(none)",
                        writer);
    json_decref(m);
    if (rc != SY_OK) sy_err_prefix(rc, "reading back checkpoint %s step %" PRId64, run, step);
    return rc;
}

static int is_manifest(const char *key) {
    size_t n = strlen(key), m = strlen(SY_CKPT_MANIFEST);
    return n > m && key[n - m - 1] == '/' && !strcmp(key + n - m, SY_CKPT_MANIFEST);
}

/* Copies one object to its new run name; a manifest gets its "run" field rewritten. */
static sy_status copy_object(sy_store_t *st, const char *key, size_t strip, const char *to) {
    char dst[KEY_MAX];
    void *buf = NULL;
    size_t len = 0;
    int k = snprintf(dst, sizeof dst, "%s/%s", to, key + strip);
    if (k < 0 || (size_t)k >= sizeof dst) return sy_err_set(SY_EINVAL, "moving %s: key too long", key);
    SY_CHECK(sy_store_get(st, key, &buf, &len));
    sy_status rc = SY_OK;
    if (is_manifest(key)) {
        json_t *m = json_loadb(buf, len, 0, NULL);
        char *text = NULL;
        if (m && json_is_object(m) && !json_object_set_new(m, "run", json_string(to)) &&
            (text = json_dumps(m, JSON_INDENT(2) | JSON_PRESERVE_ORDER))) {
            free(buf);
            buf = text;
            len = strlen(text);
        } /* a manifest that does not parse is copied as it is (it was broken already) */
        json_decref(m);
    }
    rc = sy_store_put(st, dst, buf, len);
    free(buf);
    return rc;
}

sy_status sy_run_move_aside(sy_store_t *st, const char *run, char *moved_to, size_t cap) {
    char prefix[KEY_MAX], to[KEY_MAX], stamp[32];
    char **keys = NULL;
    size_t n = 0;
    sy_status rc = SY_OK;
    if (moved_to && cap) moved_to[0] = 0;
    SY_CHECK(run_key(prefix, sizeof prefix, run, SY_RUN_OBJECT)); /* validates the name */
    snprintf(prefix, sizeof prefix, "%s/", run);
    utc_now(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ");
    int k = snprintf(to, sizeof to, "%s.replaced-%s", run, stamp);
    if (k < 0 || (size_t)k >= sizeof to || !sy_store_key_valid(to) || strlen(to) > 255)
        return sy_err_set(SY_EINVAL, "run %s: cannot move it aside: '%s' is too long for a run name", run, to);
    SY_CHECK(sy_store_list(st, prefix, &keys, &n));
    if (n == 0) return SY_OK;
    size_t strip = strlen(prefix);
    /* data first, manifests last: an interrupted move leaves debris, never a broken checkpoint */
    for (int pass = 0; pass < 2 && rc == SY_OK; pass++)
        for (size_t i = 0; i < n && rc == SY_OK; i++)
            if (is_manifest(keys[i]) == pass) rc = copy_object(st, keys[i], strip, to);
    for (size_t i = 0; i < n && rc == SY_OK; i++)
        if (is_manifest(keys[i])) rc = sy_store_delete(st, keys[i]);
    if (rc == SY_OK) rc = sy_store_delete_prefix(st, prefix);
    sy_store_keys_free(keys, n);
    if (rc != SY_OK) return sy_err_prefix(rc, "moving run %s aside to %s", run, to);
    sy_warn("run %s in %s: moved the old run aside to %s (%zu objects)", run, sy_store_url(st), to, n);
    if (moved_to && cap) snprintf(moved_to, cap, "%s", to);
    return SY_OK;
}

sy_status sy_run_claim(sy_store_t *st, const char *run, sy_run_mode mode, char writer[SY_RUN_WRITER_HEX + 1],
                       char *moved_to, size_t moved_cap) {
    char key[KEY_MAX], when[32], host[256] = "";
    if (moved_to && moved_cap) moved_to[0] = 0;
    SY_CHECK(run_key(key, sizeof key, run, SY_RUN_OBJECT));
    if (mode == SY_RUN_OVERWRITE) SY_CHECK(sy_run_move_aside(st, run, moved_to, moved_cap));
    if (mode == SY_RUN_RESUME) {
        int64_t latest = -1;
        sy_status rc = sy_ckpt_latest(st, run, &latest);
        if (rc == SY_ENOTFOUND) latest = -1;
        else if (rc != SY_OK) return rc; /* every committed one broken: an error, not a silent restart */
        SY_CHECK(sy_ckpt_retire_broken(st, run, latest));
    } else {
        sy_ckpt_step_info *steps = NULL;
        size_t n = 0;
        SY_CHECK(sy_ckpt_list(st, run, &steps, &n));
        int64_t newest = -1;
        for (size_t i = 0; i < n && newest < 0; i++)
            if (steps[i].committed) newest = steps[i].step;
        free(steps);
        if (newest >= 0)
            return sy_err_set(SY_EEXIST, "run %s in %s already has committed checkpoints (newest: step %" PRId64 "); "
                              "a new run would lose them or be mixed with them. Use --resume to continue it, "
                              "--overwrite to move the old run aside (to %s.replaced-<time>) and start again, or "
                              "another run.name", run, sy_store_url(st), newest, run);
    }
    if (mode == SY_RUN_FRESH) { /* a claim without a checkpoint: a crashed start, or a writer still starting */
        void *buf = NULL;
        size_t len = 0;
        if (sy_store_get(st, key, &buf, &len) == SY_OK) {
            json_t *j = json_loadb(buf, len, 0, NULL);
            sy_warn("run %s in %s was claimed by writer %s (host %s, pid %" JSON_INTEGER_FORMAT ", %s) and has no "
                    "committed checkpoint: taking it over; that writer fails at its first checkpoint if it still runs",
                    run, sy_store_url(st), str_or(j, "writer"), str_or(j, "host"),
                    json_integer_value(json_object_get(j, "pid")), str_or(j, "claimed"));
            json_decref(j);
            free(buf);
        }
    }
    new_writer_id(writer);
    gethostname(host, sizeof host - 1);
    utc_now(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ");
    static const char *const names[] = {"fresh", "resume", "overwrite"};
    json_t *j = json_pack("{s:s, s:i, s:s, s:s, s:s, s:I, s:s, s:s}", "format", SY_RUN_FORMAT, "version", 1, "run",
                          run, "writer", writer, "host", host, "pid", (json_int_t)getpid(), "mode", names[mode],
                          "claimed", when);
    char *text = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
    json_decref(j);
    if (!text) return sy_err_set(SY_ENOMEM, "out of memory");
    sy_status rc = sy_store_put(st, key, text, strlen(text));
    free(text);
    if (rc != SY_OK) return sy_err_prefix(rc, "run %s: cannot write its lock %s", run, key);
    /* read it back: a store that acknowledges writes it did not keep is caught here, at start */
    rc = sy_run_check_writer(st, run, writer);
    if (rc != SY_OK) return sy_err_prefix(rc, "run %s: its lock did not read back", run);
    return SY_OK;
}
