/* Checkpoint save / find / load / retention on top of sy_store_t; see ckpt.h. */
#include "storage/ckpt.h"

#include <inttypes.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "storage/ckpt_run.h"
#include "base/log.h"
#include "base/parallel.h"
#include "base/safetensors.h"

#define KEY_MAX 1024
#define STEP_DIGITS 9 /* step-%09lld: zero-padded so store listings sort by step */
#define SHA256_HEX 64

static const char *const reserved_keys[] = {"format", "version", "run", "step", "created", "files"};

const char *sy_ckpt_file_dense(char *buf, size_t cap, int optim) {
    snprintf(buf, cap, "dense%s.safetensors", optim ? ".optim" : "");
    return buf;
}

const char *sy_ckpt_file_expert(char *buf, size_t cap, int expert, int optim) {
    snprintf(buf, cap, "expert-%04d%s.safetensors", expert, optim ? ".optim" : "");
    return buf;
}

static sy_status check_run(const char *run) {
    if (!run || !sy_store_key_valid(run))
        return sy_err_set(SY_EINVAL, "checkpoint: invalid run name '%s' (allowed: [A-Za-z0-9._/-])",
                          run ? run : "(null)");
    return SY_OK;
}

sy_status sy_ckpt_key(char *buf, size_t cap, const char *run, int64_t step, const char *file) {
    SY_CHECK(check_run(run));
    if (step < 0) return sy_err_set(SY_EINVAL, "checkpoint %s: negative step %" PRId64, run, step);
    if (!file || !file[0] || strchr(file, '/'))
        return sy_err_set(SY_EINVAL, "checkpoint %s: invalid file name '%s'", run, file ? file : "(null)");
    int k = snprintf(buf, cap, "%s/ckpt/step-%0*lld/%s", run, STEP_DIGITS, (long long)step, file);
    if (k < 0 || (size_t)k >= cap) return sy_err_set(SY_EINVAL, "checkpoint %s: key too long", run);
    if (!sy_store_key_valid(buf)) return sy_err_set(SY_EINVAL, "checkpoint: invalid object key '%s'", buf);
    return SY_OK;
}

static sy_status step_prefix(char *buf, size_t cap, const char *run, int64_t step) {
    int k = snprintf(buf, cap, "%s/ckpt/step-%0*lld/", run, STEP_DIGITS, (long long)step);
    if (k < 0 || (size_t)k >= cap) return sy_err_set(SY_EINVAL, "checkpoint %s: key too long", run);
    return SY_OK;
}

static sy_status sha256_hex(const void *buf, size_t len, char out[SHA256_HEX + 1]) {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (EVP_Digest(buf, len, md, &mdlen, EVP_sha256(), NULL) != 1 || mdlen != SHA256_HEX / 2)
        return sy_err_set(SY_EINTERNAL, "checkpoint: SHA-256 failed (libcrypto)");
    for (unsigned i = 0; i < mdlen; i++) snprintf(out + 2 * i, 3, "%02x", md[i]);
    out[SHA256_HEX] = 0;
    return SY_OK;
}

/* ---------------------------------------------------------------- save */

static sy_status check_extra(const char *run, int64_t step, const json_t *extra) {
    if (extra && !json_is_object(extra))
        return sy_err_set(SY_EINVAL, "checkpoint save %s step %" PRId64 ": extra is not a JSON object", run, step);
    for (size_t r = 0; extra && r < sizeof reserved_keys / sizeof reserved_keys[0]; r++)
        if (json_object_get(extra, reserved_keys[r]))
            return sy_err_set(SY_EINVAL, "checkpoint save %s step %" PRId64 ": extra uses the reserved key '%s'", run,
                              step, reserved_keys[r]);
    return SY_OK;
}

/* SY_EEXIST (with a message) if `step` is committed, SY_OK if not, another error if unknown. */
static sy_status check_uncommitted(sy_store_t *st, const char *run, int64_t step) {
    char key[KEY_MAX];
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST));
    sy_status rc = sy_store_head(st, key, NULL);
    if (rc == SY_OK)
        return sy_err_set(SY_EEXIST, "checkpoint %s step %" PRId64 " is already committed (%s)", run, step, key);
    return rc == SY_ENOTFOUND ? SY_OK : rc;
}

/* The object a manifest entry names: "object" when the writer tagged it, else "name". */
static const char *ent_object(const json_t *e) {
    const json_t *o = json_object_get(e, "object");
    return json_is_string(o) ? json_string_value(o) : json_string_value(json_object_get(e, "name"));
}

/* An object name within a step folder: one valid key component, not the manifest's. */
static int object_ok(const char *o) {
    return o && *o && sy_store_key_valid(o) && !strchr(o, '/') && strcmp(o, SY_CKPT_MANIFEST) != 0 &&
           strncmp(o, "MANIFEST", 8) != 0;
}

static sy_status object_name(char *buf, size_t cap, const char *tag, const char *file) {
    int k = tag ? snprintf(buf, cap, "%s.%s", tag, file) : snprintf(buf, cap, "%s", file);
    if (k < 0 || (size_t)k >= cap) return sy_err_set(SY_EINVAL, "checkpoint object name '%s' too long", file);
    return SY_OK;
}

/* write_part's file writers: each takes the next group and puts it (hashing while it writes).
 * Several run at once so one file's hashing overlaps another's upload (and uploads overlap on
 * stores that allow it). */
#define WRITERS_MAX 4

typedef struct {
    sy_store_t *st;
    const char *run;
    int64_t step;
    const sy_ckpt_group *groups;
    int n;
    const char *tag;   /* object names are "<tag>.<file>" (NULL: "<file>") */
    size_t *sizes;
    char (*shas)[SHA256_HEX + 1];
} writer_ctx;

/* SHA-256 fed by the store's tap, i.e. over exactly the bytes handed to the store. */
static sy_status sha_tap(void *arg, const void *p, size_t n) {
    if (EVP_DigestUpdate(arg, p, n) != 1) return sy_err_set(SY_EINTERNAL, "checkpoint: SHA-256 failed (libcrypto)");
    return SY_OK;
}

/* Puts group i as one F32 safetensors object without building the file in memory: the header,
 * then every tensor straight from its buffer (sy_st_header's contract), hashed as it is written. */
static sy_status write_one(void *arg, size_t i) {
    writer_ctx *c = arg;
    const sy_ckpt_group *g = &c->groups[i];
    char key[KEY_MAX];
    void *head = NULL;
    size_t head_len = 0;
    uint64_t data_len = 0;
    sy_store_part *parts = NULL;
    EVP_MD_CTX *md = NULL;
    sy_status rc;
    char obj[KEY_MAX];
    SY_CHECK(object_name(obj, sizeof obj, c->tag, g->file));
    SY_CHECK(sy_ckpt_key(key, sizeof key, c->run, c->step, obj));
    rc = sy_st_header(g->tensors, g->n, SY_ST_F32, &head, &head_len, &data_len);
    if (rc != SY_OK) return sy_err_prefix(rc, "checkpoint object %s", key);
    parts = malloc(((size_t)g->n + 1) * sizeof *parts);
    md = EVP_MD_CTX_new();
    if (!parts || !md) {
        rc = sy_err_set(SY_ENOMEM, "checkpoint object %s: %d parts", key, g->n + 1);
        goto out;
    }
    size_t np = 0;
    parts[np++] = (sy_store_part){head, head_len};
    for (int t = 0; t < g->n; t++) {
        size_t bytes = (size_t)sy_tensor_numel(&g->tensors[t]) * sizeof(float);
        if (bytes) parts[np++] = (sy_store_part){g->tensors[t].data, bytes};
    }
    if (EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        rc = sy_err_set(SY_EINTERNAL, "checkpoint object %s: SHA-256 init failed (libcrypto)", key);
        goto out;
    }
    sy_store_tap tap = {sha_tap, md};
    rc = sy_store_putv(c->st, key, parts, np, 0, &tap);
    if (rc != SY_OK) {
        sy_err_prefix(rc, "checkpoint object %s", key);
        goto out;
    }
    unsigned char dig[EVP_MAX_MD_SIZE];
    unsigned int dl = 0;
    if (EVP_DigestFinal_ex(md, dig, &dl) != 1 || dl != SHA256_HEX / 2) {
        rc = sy_err_set(SY_EINTERNAL, "checkpoint object %s: SHA-256 failed (libcrypto)", key);
        goto out;
    }
    for (unsigned k = 0; k < dl; k++) snprintf(c->shas[i] + 2 * k, 3, "%02x", dig[k]);
    c->sizes[i] = head_len + (size_t)data_len;
out:
    EVP_MD_CTX_free(md);
    free(parts);
    free(head);
    return rc;
}

sy_status sy_ckpt_write_part(sy_store_t *st, const char *run, int64_t step, const sy_ckpt_group *groups,
                             int n_groups, json_t **files_out) {
    return sy_ckpt_write_part_tagged(st, run, step, NULL, groups, n_groups, files_out);
}

sy_status sy_ckpt_part_tag(char *buf, size_t cap, uint64_t generation, int rank) {
    int k = snprintf(buf, cap, "g%" PRIu64 "-r%d", generation, rank);
    if (k < 0 || (size_t)k >= cap || rank < 0) return sy_err_set(SY_EINVAL, "checkpoint part tag: bad arguments");
    return SY_OK;
}

sy_status sy_ckpt_write_part_tagged(sy_store_t *st, const char *run, int64_t step, const char *tag,
                                    const sy_ckpt_group *groups, int n_groups, json_t **files_out) {
    sy_status rc = SY_OK;
    json_t *files = NULL;
    char key[KEY_MAX];
    if (!st || !files_out || n_groups < 0 || (n_groups > 0 && !groups))
        return sy_err_set(SY_EINVAL, "checkpoint write: bad arguments");
    *files_out = NULL;
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST));
    for (int i = 0; i < n_groups; i++) {
        char obj[KEY_MAX];
        SY_CHECK(object_name(obj, sizeof obj, tag, groups[i].file));
        SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, obj));
        if (!strcmp(groups[i].file, SY_CKPT_MANIFEST))
            return sy_err_set(SY_EINVAL, "checkpoint save: file name '%s' is reserved", groups[i].file);
        for (int j = 0; j < i; j++)
            if (!strcmp(groups[i].file, groups[j].file))
                return sy_err_set(SY_EINVAL, "checkpoint save: file '%s' named twice", groups[i].file);
    }
    /* A committed step is never rewritten: its data files would change under its manifest. */
    SY_CHECK(check_uncommitted(st, run, step));

    writer_ctx c = {.st = st, .run = run, .step = step, .groups = groups, .n = n_groups, .tag = tag};
    c.sizes = calloc((size_t)n_groups + 1, sizeof *c.sizes);
    c.shas = calloc((size_t)n_groups + 1, sizeof *c.shas);
    files = json_array();
    if (!c.sizes || !c.shas || !files) {
        rc = sy_err_set(SY_ENOMEM, "checkpoint save: out of memory");
        goto out;
    }
    /* the first failure stops the others taking files */
    SY_CHECK_GOTO(sy_parallel_for(WRITERS_MAX, (size_t)n_groups, true, write_one, &c), rc, out);
    for (int i = 0; i < n_groups; i++) {
        json_t *e = json_pack("{s:s,s:I,s:s}", "name", groups[i].file, "size", (json_int_t)c.sizes[i], "sha256",
                              c.shas[i]);
        char obj[KEY_MAX];
        if (e && tag && (object_name(obj, sizeof obj, tag, groups[i].file) != SY_OK ||
                         json_object_set_new(e, "object", json_string(obj)))) {
            json_decref(e);
            e = NULL;
        }
        if (!e || json_array_append_new(files, e)) {
            rc = sy_err_set(SY_ENOMEM, "checkpoint save: manifest");
            goto out;
        }
    }
    *files_out = files;
    files = NULL;
out:
    free(c.sizes);
    free(c.shas);
    json_decref(files);
    return rc;
}

static int is_hex64(const char *s);

/* The commit's presence checks: every part's object HEADed (present, with the size its part
 * reported) by up to HEADERS_MAX threads at once (4,098 objects at 2,048 experts: one after
 * another they took 16-20 s on moto). Each check's outcome is kept by index, and the commit
 * reports the first failure in file order, as a serial loop would. */
#define HEADERS_MAX 16
typedef struct {
    sy_store_t *st;
    char (*keys)[KEY_MAX];
    const uint64_t *want;
    sy_status *rc;
    char **msg; /* [n] the failure's message (malloc'ed), NULL when it passed */
} head_ctx;

/* Object i: its verdict kept in h->rc[i] / h->msg[i], so that every object is checked and the
 * first failure in list order is the one reported. */
static sy_status head_one(void *arg, size_t i) {
    head_ctx *h = arg;
    uint64_t size = 0;
    sy_status rc = sy_store_head(h->st, h->keys[i], &size);
    if (rc == SY_OK && size != h->want[i])
        rc = sy_err_set(SY_ECORRUPT, "object %s has %" PRIu64 " bytes, the part says %" PRIu64, h->keys[i], size,
                        h->want[i]);
    else if (rc != SY_OK)
        sy_err_prefix(rc, "object %s", h->keys[i]);
    h->rc[i] = rc;
    if (rc != SY_OK) h->msg[i] = strdup(sy_err_msg());
    return SY_OK;
}

static sy_status head_all(sy_store_t *st, const char *run, int64_t step, char (*keys)[KEY_MAX], const uint64_t *want,
                          size_t n) {
    head_ctx h = {.st = st, .keys = keys, .want = want};
    h.rc = calloc(n ? n : 1, sizeof *h.rc);
    h.msg = calloc(n ? n : 1, sizeof *h.msg);
    if (!h.rc || !h.msg) {
        free(h.rc), free(h.msg);
        return sy_err_set(SY_ENOMEM, "checkpoint commit: out of memory");
    }
    (void)sy_parallel_for(HEADERS_MAX, n, false, head_one, &h); /* head_one never fails */
    sy_status rc = SY_OK;
    for (size_t i = 0; i < n; i++) {
        if (rc == SY_OK && h.rc[i] != SY_OK)
            rc = sy_err_set(h.rc[i], "checkpoint commit %s step %" PRId64 ": %s", run, step, h.msg[i] ? h.msg[i] : "?");
        free(h.msg[i]);
    }
    free(h.rc), free(h.msg);
    return rc;
}

static sy_status exists_verdict(sy_store_t *st, const char *run, int64_t step, const char *writer, int may_retire);

sy_status sy_ckpt_commit(sy_store_t *st, const char *run, int64_t step, const json_t *files,
                         const json_t *extra) {
    sy_status rc = SY_OK;
    json_t *man = NULL, *list = NULL;
    json_t *seen = NULL, *seen_obj = NULL; /* names and objects so far: sets (4,098 files at 2,048 experts) */
    char *text = NULL;
    char key[KEY_MAX];
    char (*keys)[KEY_MAX] = NULL; /* every part's object, HEADed after the checks of the list */
    uint64_t *want = NULL;
    if (!st || !json_is_array(files)) return sy_err_set(SY_EINVAL, "checkpoint commit: bad arguments");
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST));
    SY_CHECK(check_extra(run, step, extra));
    SY_CHECK(sy_ckpt_prepare_step(st, run, step, extra));
    /* A manifest that names its generation and lists tagged parts takes only that generation's. */
    char gen_prefix[40] = "";
    const json_t *gen = extra ? json_object_get(extra, "generation") : NULL;
    bool tagged = false;
    for (size_t i = 0; i < json_array_size(files); i++) tagged |= json_object_get(json_array_get(files, i), "object") != NULL;
    if (tagged && json_is_integer(gen)) snprintf(gen_prefix, sizeof gen_prefix, "g%" JSON_INTEGER_FORMAT "-", json_integer_value(gen));
    list = json_array();
    seen = json_object();
    seen_obj = json_object();
    keys = calloc(json_array_size(files) + 1, sizeof *keys);
    want = calloc(json_array_size(files) + 1, sizeof *want);
    if (!list || !seen || !seen_obj || !keys || !want) {
        rc = sy_err_set(SY_ENOMEM, "checkpoint commit");
        goto out;
    }
    for (size_t i = 0; i < json_array_size(files); i++) {
        const json_t *e = json_array_get(files, i), *n = json_object_get(e, "name"), *z = json_object_get(e, "size"),
                     *h = json_object_get(e, "sha256");
        if (!json_is_string(n) || !json_is_integer(z) || json_integer_value(z) < 0 || !json_is_string(h) ||
            !is_hex64(json_string_value(h))) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": files[%zu] is not {name, size, sha256}",
                            run, step, i);
            goto out;
        }
        const char *name = json_string_value(n);
        if (!strcmp(name, SY_CKPT_MANIFEST)) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit: file name '%s' is reserved", name);
            goto out;
        }
        if (json_object_get(seen, name)) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": file '%s' listed twice", run, step,
                            name);
            goto out;
        }
        if (json_object_set_new(seen, name, json_true()) != 0) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": files[%zu] has an invalid name", run,
                            step, i);
            goto out;
        }
        /* The object that holds it: its name, or the writer's "object" (a part tagged with the
         * generation and rank that wrote it, sy_ckpt_write_part_tagged). */
        const json_t *o = json_object_get(e, "object");
        if (o && (!json_is_string(o) || !object_ok(json_string_value(o)))) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": files[%zu] has an invalid object name",
                            run, step, i);
            goto out;
        }
        const char *object = o ? json_string_value(o) : name;
        if (json_object_get(seen_obj, object)) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": object '%s' listed twice", run, step,
                            object);
            goto out;
        }
        if (json_object_set_new(seen_obj, object, json_true()) != 0) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": files[%zu] has an invalid object name",
                            run, step, i);
            goto out;
        }
        /* Fencing: a commit of generation G takes only parts written by G (their objects are
         * tagged "gG-r<rank>."), so a stale writer of an older generation, whose objects carry
         * its own generation, can never have a part in it. */
        if (gen_prefix[0] && strncmp(object, gen_prefix, strlen(gen_prefix)) != 0) {
            rc = sy_err_set(SY_EINVAL, "checkpoint commit %s step %" PRId64 ": object '%s' was not written by "
                            "generation %" JSON_INTEGER_FORMAT " (a stale writer's part?)", run, step, object,
                            json_integer_value(json_object_get(extra, "generation")));
            goto out;
        }
        /* Every part must be durable (present, with its size) before the commit point: HEADed
         * below, all together. */
        SY_CHECK_GOTO(sy_ckpt_key(keys[i], sizeof keys[i], run, step, object), rc, out);
        want[i] = (uint64_t)json_integer_value(z);
        json_t *le = json_pack("{s:s,s:I,s:s}", "name", name, "size", json_integer_value(z), "sha256",
                               json_string_value(h));
        if (le && o && json_object_set(le, "object", (json_t *)o)) {
            json_decref(le);
            le = NULL;
        }
        if (!le || json_array_append_new(list, le)) {
            rc = sy_err_set(SY_ENOMEM, "checkpoint commit: manifest");
            goto out;
        }
    }
    SY_CHECK_GOTO(head_all(st, run, step, keys, want, json_array_size(files)), rc, out);
    char created[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(created, sizeof created, "%Y-%m-%dT%H:%M:%SZ", &tm);
    man = json_pack("{s:s,s:i,s:s,s:I,s:s,s:O}", "format", SY_CKPT_FORMAT, "version", SY_CKPT_VERSION, "run", run,
                    "step", (json_int_t)step, "created", created, "files", list);
    if (!man) {
        rc = sy_err_set(SY_ENOMEM, "checkpoint commit: manifest");
        goto out;
    }
    if (extra) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)extra, k, v) if (json_object_set(man, k, v)) {
            rc = sy_err_set(SY_ENOMEM, "checkpoint commit: manifest");
            goto out;
        }
    }
    text = json_dumps(man, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (!text) {
        rc = sy_err_set(SY_ENOMEM, "checkpoint commit: manifest text");
        goto out;
    }
    SY_CHECK_GOTO(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST), rc, out);
    const json_t *w = extra ? json_object_get(extra, "writer") : NULL;
    if (json_is_string(w)) SY_CHECK_GOTO(sy_run_check_writer(st, run, json_string_value(w)), rc, out);
    rc = sy_store_put_if_absent(st, key, text, strlen(text));
    if (rc == SY_EEXIST && json_is_string(w)) {
        rc = exists_verdict(st, run, step, json_string_value(w), 0);
        if (rc == SY_OK) rc = sy_err_set(SY_EEXIST, "checkpoint %s step %" PRId64 " was committed meanwhile", run, step);
    } else if (rc == SY_EEXIST) {
        sy_err_set(rc, "checkpoint %s step %" PRId64 " was committed by another writer (%s)", run, step, key);
    }
out:
    free(text);
    free(keys), free(want);
    json_decref(man);
    json_decref(list);
    json_decref(seen);
    json_decref(seen_obj);
    return rc;
}

sy_status sy_ckpt_save(sy_store_t *st, const char *run, int64_t step, const sy_ckpt_group *groups,
                       int n_groups, const json_t *extra) {
    json_t *files = NULL;
    if (!st) return sy_err_set(SY_EINVAL, "checkpoint save: bad arguments");
    SY_CHECK(check_run(run));
    SY_CHECK(check_extra(run, step, extra)); /* before writing anything */
    SY_CHECK(sy_ckpt_prepare_step(st, run, step, extra));
    SY_CHECK(sy_ckpt_write_part(st, run, step, groups, n_groups, &files));
    sy_status rc = sy_ckpt_commit(st, run, step, files, extra);
    json_decref(files);
    return rc;
}

/* ---------------------------------------------------------------- manifests */

static int is_hex64(const char *s) {
    if (!s || strlen(s) != SHA256_HEX) return 0;
    for (int i = 0; i < SHA256_HEX; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return 0;
    return 1;
}

/* Checks the fields the loader relies on. */
static sy_status validate_manifest(const json_t *m, const char *key, const char *run, int64_t step) {
    if (!json_is_object(m)) return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: not a JSON object", key);
    const json_t *f = json_object_get(m, "format"), *v = json_object_get(m, "version"),
                 *r = json_object_get(m, "run"), *s = json_object_get(m, "step"), *fl = json_object_get(m, "files");
    if (!json_is_string(f) || strcmp(json_string_value(f), SY_CKPT_FORMAT))
        return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: format is not \"%s\"", key, SY_CKPT_FORMAT);
    if (!json_is_integer(v))
        return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: no integer version", key);
    if (json_integer_value(v) != SY_CKPT_VERSION)
        return sy_err_set(SY_EFORMAT, "checkpoint manifest %s: version %" JSON_INTEGER_FORMAT " (supported: %d)", key,
                          json_integer_value(v), SY_CKPT_VERSION);
    if (!json_is_string(r) || strcmp(json_string_value(r), run))
        return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: run is not \"%s\"", key, run);
    if (!json_is_integer(s) || json_integer_value(s) != step)
        return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: step is not %" PRId64, key, step);
    if (!json_is_array(fl)) return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: files is not an array", key);
    for (size_t i = 0; i < json_array_size(fl); i++) {
        const json_t *e = json_array_get(fl, i), *n = json_object_get(e, "name"), *z = json_object_get(e, "size"),
                     *h = json_object_get(e, "sha256");
        const json_t *o = json_object_get(e, "object");
        if ((o && (!json_is_string(o) || !object_ok(json_string_value(o)))) ||
            !json_is_string(n) || !sy_store_key_valid(json_string_value(n)) || strchr(json_string_value(n), '/') ||
            !json_is_integer(z) || json_integer_value(z) < 0 || !json_is_string(h) || !is_hex64(json_string_value(h)))
            return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: files[%zu] is not {name, size, sha256}", key, i);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(json_string_value(json_object_get(json_array_get(fl, j), "name")), json_string_value(n)))
                return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: file '%s' listed twice", key,
                                  json_string_value(n));
    }
    return SY_OK;
}

sy_status sy_ckpt_read_manifest(sy_store_t *st, const char *run, int64_t step, json_t **out) {
    char key[KEY_MAX];
    void *buf = NULL;
    size_t len = 0;
    json_error_t jerr;
    if (!st || !out) return sy_err_set(SY_EINVAL, "checkpoint manifest: bad arguments");
    *out = NULL;
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST));
    SY_CHECK(sy_store_get(st, key, &buf, &len));
    json_t *m = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
    free(buf);
    if (!m)
        return sy_err_set(SY_ECORRUPT, "checkpoint manifest %s: invalid JSON at line %d: %s", key, jerr.line,
                          jerr.text);
    sy_status rc = validate_manifest(m, key, run, step);
    if (rc != SY_OK) {
        json_decref(m);
        return rc;
    }
    *out = m;
    return SY_OK;
}

/* Every file of the manifest exists with its recorded size. */
static sy_status check_files_present(sy_store_t *st, const json_t *m, const char *run, int64_t step) {
    const json_t *fl = json_object_get(m, "files");
    if (!json_is_array(fl)) return sy_err_set(SY_ECORRUPT, "checkpoint %s step %" PRId64 ": manifest has no files", run, step);
    char key[KEY_MAX];
    for (size_t i = 0; i < json_array_size(fl); i++) {
        const json_t *e = json_array_get(fl, i);
        uint64_t size = 0;
        SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, ent_object(e)));
        SY_CHECK(sy_store_head(st, key, &size));
        if (size != (uint64_t)json_integer_value(json_object_get(e, "size")))
            return sy_err_set(SY_ECORRUPT, "checkpoint object %s: %" PRIu64 " bytes, manifest says %" JSON_INTEGER_FORMAT,
                              key, size, json_integer_value(json_object_get(e, "size")));
    }
    return SY_OK;
}

sy_status sy_ckpt_check_files(sy_store_t *st, const json_t *m) {
    const json_t *r = json_object_get(m, "run"), *s = json_object_get(m, "step");
    if (!st || !json_is_string(r) || !json_is_integer(s))
        return sy_err_set(SY_EINVAL, "checkpoint check: not a manifest");
    return check_files_present(st, m, json_string_value(r), (int64_t)json_integer_value(s));
}

/* ---------------------------------------------------------------- existing commits */

/* A definite verdict that a checkpoint is broken (as opposed to a store that could not answer). */
static int is_broken_status(sy_status rc) {
    return rc == SY_ECORRUPT || rc == SY_EFORMAT || rc == SY_ENOTFOUND;
}

/* Reads the manifest of `step` and checks its files: SY_OK usable (*m set), a broken status,
 * or a store error. */
static sy_status read_usable(sy_store_t *st, const char *run, int64_t step, json_t **m) {
    *m = NULL;
    sy_status rc = sy_ckpt_read_manifest(st, run, step, m);
    if (rc == SY_OK) rc = check_files_present(st, *m, run, step);
    if (rc != SY_OK) {
        json_decref(*m);
        *m = NULL;
    }
    return rc;
}

sy_status sy_ckpt_retire(sy_store_t *st, const char *run, int64_t step, const char *why) {
    char key[KEY_MAX], aside[KEY_MAX];
    void *buf = NULL;
    size_t len = 0;
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST));
    SY_CHECK(sy_ckpt_key(aside, sizeof aside, run, step, "MANIFEST.retired.json"));
    sy_status rc = sy_store_get(st, key, &buf, &len);
    if (rc == SY_ENOTFOUND) return SY_OK;
    if (rc != SY_OK) return rc;
    rc = sy_store_put(st, aside, buf, len);
    free(buf);
    if (rc == SY_OK) rc = sy_store_delete(st, key);
    if (rc != SY_OK) return sy_err_prefix(rc, "checkpoint %s step %" PRId64 ": retiring its broken manifest", run, step);
    sy_warn("checkpoint %s step %" PRId64 " is retired (%s): its manifest is now %s; the step is no longer listed "
            "as committed and is written again when the run reaches it", run, step, why, aside);
    return SY_OK;
}

/* The step is committed: SY_EEXIST (same writer), SY_ECONFLICT (another writer's usable
 * checkpoint), SY_OK after retiring a broken one (may_retire), or a store error. */
static sy_status exists_verdict(sy_store_t *st, const char *run, int64_t step, const char *writer, int may_retire) {
    json_t *m = NULL;
    sy_status rc = read_usable(st, run, step, &m);
    if (is_broken_status(rc)) {
        char why[512];
        snprintf(why, sizeof why, "%s", sy_err_msg());
        if (!may_retire) return sy_err_set(SY_ECORRUPT, "checkpoint %s step %" PRId64 " was committed meanwhile and is "
                                           "broken: %s", run, step, why);
        return sy_ckpt_retire(st, run, step, why);
    }
    if (rc != SY_OK) return rc;
    const json_t *w = json_object_get(m, "writer");
    if (json_is_string(w) && !strcmp(json_string_value(w), writer)) {
        json_decref(m);
        return sy_err_set(SY_EEXIST, "checkpoint %s step %" PRId64 " is already committed by this writer", run, step);
    }
    if (may_retire) {
        /* The caller owns the run (checked just before): this commit is a fenced-off writer's
         * (one that went on after this writer took the run over and resumed from an older
         * step). The owner's history wins; the stale manifest is kept aside. */
        char why[300];
        snprintf(why, sizeof why, "committed by writer %s, which no longer owns the run",
                 json_is_string(w) ? json_string_value(w) : "(none)");
        json_decref(m);
        return sy_ckpt_retire(st, run, step, why);
    }
    rc = sy_err_set(SY_ECONFLICT, "checkpoint %s step %" PRId64 " in %s is already committed by another writer (%s), "
                    "not by this one (%s): two runs are writing one run name; this one stops instead of keeping "
                    "a checkpoint that is not its own", run, step, sy_store_url(st),
                    json_is_string(w) ? json_string_value(w) : "a writer without an id", writer);
    json_decref(m);
    return rc;
}

sy_status sy_ckpt_prepare_step(sy_store_t *st, const char *run, int64_t step, const json_t *extra) {
    const json_t *w = extra ? json_object_get(extra, "writer") : NULL;
    if (!st) return sy_err_set(SY_EINVAL, "checkpoint: no store");
    if (extra && w && !json_is_string(w)) return sy_err_set(SY_EINVAL, "checkpoint save: extra writer is not a string");
    if (!w) return check_uncommitted(st, run, step);
    SY_CHECK(sy_run_check_writer(st, run, json_string_value(w)));
    sy_status rc = check_uncommitted(st, run, step);
    if (rc != SY_EEXIST) return rc;
    return exists_verdict(st, run, step, json_string_value(w), 1);
}

/* ---------------------------------------------------------------- listing steps */

typedef sy_ckpt_step_info step_info;

typedef struct {
    step_info *v;
    size_t n;
} step_list;

static int cmp_step_desc(const void *a, const void *b) {
    int64_t x = ((const step_info *)a)->step, y = ((const step_info *)b)->step;
    return x < y ? 1 : x > y ? -1 : 0;
}

/* Parses "step-<digits>/<rest>" into step and rest; 0 if not canonical (step-%09lld). */
static int parse_step_key(const char *s, int64_t *step, const char **rest) {
    if (strncmp(s, "step-", 5)) return 0;
    s += 5;
    const char *slash = strchr(s, '/');
    size_t nd = slash ? (size_t)(slash - s) : 0;
    if (!slash || nd < STEP_DIGITS || nd > 18) return 0;
    long long v = 0;
    for (size_t i = 0; i < nd; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        v = v * 10 + (s[i] - '0');
    }
    char canon[32];
    snprintf(canon, sizeof canon, "%0*lld", STEP_DIGITS, v);
    if (strlen(canon) != nd || strncmp(canon, s, nd)) return 0;
    *step = v;
    *rest = slash + 1;
    return 1;
}

/* Every step folder of the run, newest first. */
static sy_status list_steps(sy_store_t *st, const char *run, step_list *out) {
    char prefix[KEY_MAX];
    char **keys = NULL;
    size_t n = 0;
    out->v = NULL;
    out->n = 0;
    int k = snprintf(prefix, sizeof prefix, "%s/ckpt/", run);
    if (k < 0 || (size_t)k >= sizeof prefix) return sy_err_set(SY_EINVAL, "checkpoint %s: run name too long", run);
    SY_CHECK(sy_store_list(st, prefix, &keys, &n));
    step_info *v = calloc(n ? n : 1, sizeof *v);
    if (!v) {
        sy_store_keys_free(keys, n);
        return sy_err_set(SY_ENOMEM, "checkpoint %s: listing", run);
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        int64_t step;
        const char *rest;
        if (!parse_step_key(keys[i] + k, &step, &rest)) continue;
        /* keys are sorted, so one step's keys are adjacent */
        if (m == 0 || v[m - 1].step != step) v[m++] = (step_info){step, 0};
        if (!strcmp(rest, SY_CKPT_MANIFEST)) v[m - 1].committed = 1;
    }
    sy_store_keys_free(keys, n);
    qsort(v, m, sizeof *v, cmp_step_desc);
    out->v = v;
    out->n = m;
    return SY_OK;
}

sy_status sy_ckpt_list(sy_store_t *st, const char *run, sy_ckpt_step_info **out, size_t *n) {
    step_list sl;
    if (!st || !out || !n) return sy_err_set(SY_EINVAL, "checkpoint list: bad arguments");
    *out = NULL;
    *n = 0;
    SY_CHECK(check_run(run));
    SY_CHECK(list_steps(st, run, &sl));
    if (sl.n == 0) {
        free(sl.v);
        return SY_OK;
    }
    *out = sl.v;
    *n = sl.n;
    return SY_OK;
}

sy_status sy_ckpt_retire_broken(sy_store_t *st, const char *run, int64_t latest) {
    step_list sl;
    sy_status rc = SY_OK;
    if (!st) return sy_err_set(SY_EINVAL, "checkpoint: no store");
    SY_CHECK(check_run(run));
    SY_CHECK(list_steps(st, run, &sl));
    for (size_t i = 0; i < sl.n && rc == SY_OK; i++) {
        if (!sl.v[i].committed || sl.v[i].step <= latest) continue;
        json_t *m = NULL;
        rc = read_usable(st, run, sl.v[i].step, &m);
        json_decref(m);
        if (rc == SY_OK) {
            rc = sy_err_set(SY_EIO, "checkpoint %s step %" PRId64 " in %s was unusable a moment ago and is usable "
                            "now (newer than step %" PRId64 "): the store answers inconsistently; try again",
                            run, sl.v[i].step, sy_store_url(st), latest);
        } else if (is_broken_status(rc)) {
            char why[512];
            snprintf(why, sizeof why, "%s", sy_err_msg());
            rc = sy_ckpt_retire(st, run, sl.v[i].step, why);
        }
    }
    free(sl.v);
    return rc;
}

sy_status sy_ckpt_latest(sy_store_t *st, const char *run, int64_t *step_out) {
    step_list sl;
    int n_committed = 0;
    if (!st || !step_out) return sy_err_set(SY_EINVAL, "checkpoint latest: bad arguments");
    SY_CHECK(check_run(run));
    SY_CHECK(list_steps(st, run, &sl));
    for (size_t i = 0; i < sl.n; i++) {
        if (!sl.v[i].committed) continue;
        n_committed++;
        json_t *m = NULL;
        sy_status rc = sy_ckpt_read_manifest(st, run, sl.v[i].step, &m);
        if (rc == SY_OK) rc = check_files_present(st, m, run, sl.v[i].step);
        json_decref(m);
        if (rc == SY_OK) {
            *step_out = sl.v[i].step;
            free(sl.v);
            return SY_OK;
        }
        sy_warn("checkpoint %s step %" PRId64 " unusable, trying an older one: %s", run, sl.v[i].step, sy_err_msg());
    }
    free(sl.v);
    if (n_committed)
        return sy_err_set(SY_ECORRUPT, "checkpoint %s in %s: all %d committed checkpoints are unusable", run,
                          sy_store_url(st), n_committed);
    return sy_err_set(SY_ENOTFOUND, "checkpoint %s: no committed checkpoint in %s", run, sy_store_url(st));
}

/* ---------------------------------------------------------------- load */

/* Fetches `file` of a manifest's checkpoint and checks its size and SHA-256 (*buf: malloc'ed). */
static sy_status fetch_verified(sy_store_t *st, const json_t *m, const char *file, void **buf_out, size_t *len_out) {
    char key[KEY_MAX], sha[SHA256_HEX + 1];
    void *buf = NULL;
    size_t len = 0;
    sy_status rc = SY_OK;
    *buf_out = NULL;
    *len_out = 0;
    const char *run = json_string_value(json_object_get(m, "run"));
    int64_t step = json_integer_value(json_object_get(m, "step"));
    const json_t *fl = json_object_get(m, "files"), *ent = NULL;
    if (!run || !json_is_array(fl)) return sy_err_set(SY_EINVAL, "checkpoint load: not a manifest");
    for (size_t i = 0; i < json_array_size(fl) && !ent; i++)
        if (!strcmp(json_string_value(json_object_get(json_array_get(fl, i), "name")), file))
            ent = json_array_get(fl, i);
    if (!ent)
        return sy_err_set(SY_ENOTFOUND, "checkpoint %s step %" PRId64 ": manifest lists no file '%s'", run, step,
                          file);
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, ent_object(ent)));
    SY_CHECK(sy_store_get(st, key, &buf, &len));
    json_int_t want = json_integer_value(json_object_get(ent, "size"));
    if ((uint64_t)len != (uint64_t)want) {
        rc = sy_err_set(SY_ECORRUPT, "checkpoint object %s: %zu bytes, manifest says %" JSON_INTEGER_FORMAT, key, len,
                        want);
        goto out;
    }
    SY_CHECK_GOTO(sha256_hex(buf, len, sha), rc, out);
    const char *want_sha = json_string_value(json_object_get(ent, "sha256"));
    if (!want_sha || strcmp(sha, want_sha)) {
        rc = sy_err_set(SY_ECORRUPT, "checkpoint object %s: sha256 %s, manifest says %s", key, sha,
                        want_sha ? want_sha : "(none)");
        goto out;
    }
    *buf_out = buf;
    *len_out = len;
    buf = NULL;
out:
    free(buf);
    return rc;
}

sy_status sy_ckpt_verify_file(sy_store_t *st, const json_t *m, const char *file) {
    void *buf = NULL;
    size_t len = 0;
    sy_st_file_t *f = NULL;
    if (!st || !m || !file) return sy_err_set(SY_EINVAL, "checkpoint verify: bad arguments");
    SY_CHECK(fetch_verified(st, m, file, &buf, &len));
    /* The checksum matched what the writer hashed; also check it is a well-formed safetensors. */
    sy_status rc = sy_st_parse_take(&buf, len, file, &f);
    sy_st_destroy(&f);
    free(buf);
    return rc;
}

sy_status sy_ckpt_load_group_m(sy_store_t *st, const json_t *m, const sy_ckpt_group *g) {
    void *buf = NULL;
    size_t len = 0;
    sy_st_file_t *f = NULL;
    sy_status rc = SY_OK;
    char key[KEY_MAX];
    if (!st || !m || !g || !g->file || g->n < 0 || (g->n > 0 && !g->tensors))
        return sy_err_set(SY_EINVAL, "checkpoint load: bad arguments");
    SY_CHECK(fetch_verified(st, m, g->file, &buf, &len));
    snprintf(key, sizeof key, "%s/ckpt/step-%0*lld/%s", json_string_value(json_object_get(m, "run")), STEP_DIGITS,
             (long long)json_integer_value(json_object_get(m, "step")), g->file);
    SY_CHECK_GOTO(sy_st_parse_take(&buf, len, key, &f), rc, out);
    for (int i = 0; i < g->n; i++) SY_CHECK_GOTO(sy_st_load(f, &g->tensors[i]), rc, out);
out:
    sy_st_destroy(&f);
    free(buf);
    return rc;
}

sy_status sy_ckpt_load_group(sy_store_t *st, const char *run, int64_t step, const sy_ckpt_group *g) {
    json_t *m = NULL;
    SY_CHECK(sy_ckpt_read_manifest(st, run, step, &m));
    sy_status rc = sy_ckpt_load_group_m(st, m, g);
    json_decref(m);
    return rc;
}

/* ---------------------------------------------------------------- retention */

static sy_status delete_step(sy_store_t *st, const char *run, int64_t step) {
    char key[KEY_MAX];
    /* Manifest first: if we stop halfway, what is left is debris, not a broken checkpoint. */
    SY_CHECK(sy_ckpt_key(key, sizeof key, run, step, SY_CKPT_MANIFEST));
    SY_CHECK(sy_store_delete(st, key));
    SY_CHECK(step_prefix(key, sizeof key, run, step));
    return sy_store_delete_prefix(st, key);
}

sy_status sy_ckpt_retain(sy_store_t *st, const char *run, int keep_last) {
    step_list sl;
    sy_status rc = SY_OK;
    if (!st) return sy_err_set(SY_EINVAL, "checkpoint retain: no store");
    if (keep_last < 1) return sy_err_set(SY_EINVAL, "checkpoint retain: keep_last %d (must be ≥ 1)", keep_last);
    SY_CHECK(check_run(run));
    SY_CHECK(list_steps(st, run, &sl));
    int kept = 0;
    int64_t newest = -1;
    for (size_t i = 0; i < sl.n && rc == SY_OK; i++) {
        int valid = 0;
        if (sl.v[i].committed) {
            json_t *m = NULL;
            valid = sy_ckpt_read_manifest(st, run, sl.v[i].step, &m) == SY_OK;
            json_decref(m);
        }
        if (valid && kept < keep_last) {
            kept++;
            if (newest < 0) newest = sl.v[i].step;
            continue;
        }
        /* Invalid or uncommitted folders newer than the newest valid checkpoint may be a save
         * in progress (or evidence of a fault): leave them. */
        if (!valid && newest < 0) continue;
        sy_info("checkpoint %s: deleting step %" PRId64 " (%s)", run, sl.v[i].step,
                valid ? "beyond keep_last" : "debris");
        rc = delete_step(st, run, sl.v[i].step);
    }
    free(sl.v);
    return rc;
}
