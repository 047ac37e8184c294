/* safetensors reading and writing; see safetensors.h and shared/spec/storage-notes.md. */
#include "base/safetensors.h"
#include "base/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/bf16.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host"
#endif

#define ST_HEADER_MAX 100000000ull /* readers reject larger headers (storage notes) */
#define ST_ALIGN 8                 /* the JSON is padded so tensor data starts 8-aligned */
#define ST_META_KEY "__metadata__"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
static const char *const dt_names[] = {"F32", "BF16", "F16"};
static const int dt_size[] = {4, 2, 2};

typedef struct {
    char *name;
    int dtype;
    int ndim;
    int64_t shape[SY_MAX_DIMS];
    uint64_t begin, end; /* byte span within the data section */
} st_entry;

struct sy_st_file {
    char *what;
    uint8_t *buf; /* the whole file */
    size_t len;
    const uint8_t *data; /* first byte after the header */
    uint64_t data_len;
    st_entry *e;
    int n;
};

/* ---------------------------------------------------------------- writing */

static sy_status check_refs(const sy_tensor_ref *t, int n) {
    if (n < 0 || (n > 0 && !t)) return sy_err_set(SY_EINVAL, "safetensors: %d tensors, array %p", n, (const void *)t);
    for (int i = 0; i < n; i++) {
        if (!t[i].name || !t[i].name[0])
            return sy_err_set(SY_EINVAL, "safetensors: tensor %d has no name", i);
        if (!strcmp(t[i].name, ST_META_KEY))
            return sy_err_set(SY_EINVAL, "safetensors: tensor name '%s' is reserved", t[i].name);
        if (t[i].ndim < 0 || t[i].ndim > SY_MAX_DIMS)
            return sy_err_set(SY_EINVAL, "safetensors: tensor '%s': ndim %d outside [0, %d]", t[i].name,
                              t[i].ndim, SY_MAX_DIMS);
        for (int d = 0; d < t[i].ndim; d++)
            if (t[i].shape[d] < 0)
                return sy_err_set(SY_EINVAL, "safetensors: tensor '%s': dimension %d is %" PRId64, t[i].name,
                                  d, t[i].shape[d]);
        if (sy_tensor_numel(&t[i]) > 0 && !t[i].data)
            return sy_err_set(SY_EINVAL, "safetensors: tensor '%s' has no data", t[i].name);
    }
    return SY_OK;
}

/* Builds the file's head: u64 LE length + JSON padded with spaces to ST_ALIGN (*out, malloc'ed,
 * *out_len bytes) and the size of the data section after it (*data_len). */
static sy_status build_header(const sy_tensor_ref *tensors, int n, sy_st_dtype dtype, uint8_t **out, size_t *out_len,
                              uint64_t *data_len) {
    sy_status st = SY_OK;
    json_t *root = NULL;
    char *hdr = NULL;
    if (dtype != SY_ST_F32 && dtype != SY_ST_BF16)
        return sy_err_set(SY_EINVAL, "safetensors: unknown output dtype %d", (int)dtype);
    SY_CHECK(check_refs(tensors, n));
    int esize = dt_size[dtype == SY_ST_F32 ? DT_F32 : DT_BF16];
    const char *dname = dt_names[dtype == SY_ST_F32 ? DT_F32 : DT_BF16];

    root = json_object();
    json_t *meta = json_pack("{s:s}", "format", "pt");
    if (!root || !meta || json_object_set_new(root, ST_META_KEY, meta)) {
        st = sy_err_set(SY_ENOMEM, "safetensors: building the header");
        goto out;
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (json_object_get(root, tensors[i].name)) {
            st = sy_err_set(SY_EINVAL, "safetensors: tensor name '%s' appears twice", tensors[i].name);
            goto out;
        }
        json_t *shape = json_array();
        for (int d = 0; shape && d < tensors[i].ndim; d++)
            if (json_array_append_new(shape, json_integer(tensors[i].shape[d]))) {
                json_decref(shape);
                shape = NULL;
            }
        uint64_t bytes = (uint64_t)sy_tensor_numel(&tensors[i]) * (uint64_t)esize;
        json_t *ent = shape ? json_pack("{s:s,s:o,s:[I,I]}", "dtype", dname, "shape", shape, "data_offsets",
                                        (json_int_t)off, (json_int_t)(off + bytes))
                            : NULL;
        if (!ent || json_object_set_new(root, tensors[i].name, ent)) {
            st = sy_err_set(SY_ENOMEM, "safetensors: building the header (tensor '%s')", tensors[i].name);
            goto out;
        }
        off += bytes;
    }
    hdr = json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!hdr) {
        st = sy_err_set(SY_ENOMEM, "safetensors: serialising the header");
        goto out;
    }
    size_t hlen = strlen(hdr);
    size_t padded = (hlen + ST_ALIGN - 1) / ST_ALIGN * ST_ALIGN;
    uint8_t *buf = malloc(8 + padded);
    if (!buf) {
        st = sy_err_set(SY_ENOMEM, "safetensors: %zu-byte header", 8 + padded);
        goto out;
    }
    uint64_t n_le = padded; /* little-endian host */
    memcpy(buf, &n_le, 8);
    memcpy(buf + 8, hdr, hlen);
    memset(buf + 8 + hlen, ' ', padded - hlen);
    *out = buf;
    *out_len = 8 + padded;
    *data_len = off;
out:
    free(hdr);
    json_decref(root);
    return st;
}

sy_status sy_st_header(const sy_tensor_ref *tensors, int n, sy_st_dtype dtype, void **out, size_t *out_len,
                       uint64_t *data_len) {
    uint8_t *h = NULL;
    size_t hl = 0;
    uint64_t dl = 0;
    if (!out || !out_len || !data_len) return sy_err_set(SY_EINVAL, "safetensors: no output pointer");
    *out = NULL;
    *out_len = 0;
    *data_len = 0;
    SY_CHECK(build_header(tensors, n, dtype, &h, &hl, &dl));
    *out = h;
    *out_len = hl;
    *data_len = dl;
    return SY_OK;
}

sy_status sy_st_serialize(const sy_tensor_ref *tensors, int n, sy_st_dtype dtype, void **out,
                          size_t *out_len) {
    uint8_t *head = NULL, *buf = NULL;
    size_t hl = 0;
    uint64_t dl = 0;
    if (!out || !out_len) return sy_err_set(SY_EINVAL, "safetensors: no output pointer");
    *out = NULL;
    *out_len = 0;
    SY_CHECK(build_header(tensors, n, dtype, &head, &hl, &dl));
    if (dl > SIZE_MAX - hl || !(buf = malloc(hl + (size_t)dl))) {
        free(head);
        return sy_err_set(SY_ENOMEM, "safetensors: %" PRIu64 "-byte buffer", (uint64_t)hl + dl);
    }
    memcpy(buf, head, hl);
    free(head);
    uint8_t *p = buf + hl;
    for (int i = 0; i < n; i++) {
        int64_t numel = sy_tensor_numel(&tensors[i]);
        if (dtype == SY_ST_F32) {
            if (numel) memcpy(p, tensors[i].data, (size_t)numel * 4);
            p += numel * 4;
        } else {
            for (int64_t k = 0; k < numel; k++) {
                uint16_t h = sy_f32_to_bf16(tensors[i].data[k]);
                memcpy(p, &h, 2);
                p += 2;
            }
        }
    }
    *out = buf;
    *out_len = hl + (size_t)dl;
    return SY_OK;
}

sy_status sy_st_write_file(const char *path, const sy_tensor_ref *tensors, int n,
                           sy_st_dtype dtype) {
    void *buf = NULL;
    size_t len = 0;
    if (!path || !path[0]) return sy_err_set(SY_EINVAL, "safetensors: no output path");
    SY_CHECK(sy_fs_check_replaceable(path)); /* a device, FIFO or symlink at path stays as it is */
    sy_status st = sy_st_serialize(tensors, n, dtype, &buf, &len);
    if (st != SY_OK) return sy_err_prefix(st, "%s", path);
    st = sy_fs_write_atomic(path, buf, len, 0644, 0);
    free(buf);
    return st;
}

/* ---------------------------------------------------------------- reading */

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24); /* zero or subnormal */
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

static int dtype_from_name(const char *s) {
    for (int i = 0; i < (int)(sizeof dt_names / sizeof dt_names[0]); i++)
        if (!strcmp(s, dt_names[i])) return i;
    return -1;
}

/* Writes "[a, b, c]" into out. */
static const char *fmt_shape(char *out, size_t cap, int ndim, const int64_t *shape) {
    size_t k = 0;
    k += (size_t)snprintf(out + k, cap - k, "[");
    for (int d = 0; d < ndim && k < cap; d++)
        k += (size_t)snprintf(out + k, cap - k, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (k < cap) snprintf(out + k, cap - k, "]");
    return out;
}

/* Validates one header entry into *e. */
static sy_status parse_entry(const char *what, const char *name, json_t *v, st_entry *e) {
    if (!json_is_object(v))
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': header entry is not an object", what, name);
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!jd || !js || !jo)
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': missing '%s'", what, name,
                          !jd ? "dtype" : !js ? "shape" : "data_offsets");
    if (json_object_size(v) != 3) {
        const char *k;
        json_t *x;
        json_object_foreach(v, k, x) if (strcmp(k, "dtype") && strcmp(k, "shape") && strcmp(k, "data_offsets"))
            return sy_err_set(SY_EFORMAT, "%s: tensor '%s': unknown field '%s'", what, name, k);
    }
    if (!json_is_string(jd))
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': dtype is not a string", what, name);
    e->dtype = dtype_from_name(json_string_value(jd));
    if (e->dtype < 0)
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': unsupported dtype '%s' (readable: F32, BF16, F16)", what,
                          name, json_string_value(jd));
    if (!json_is_array(js))
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': shape is not an array", what, name);
    if (json_array_size(js) > SY_MAX_DIMS)
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': %zu dimensions (at most %d supported)", what, name,
                          json_array_size(js), SY_MAX_DIMS);
    e->ndim = (int)json_array_size(js);
    uint64_t bytes = (uint64_t)dt_size[e->dtype];
    for (int d = 0; d < e->ndim; d++) {
        json_t *x = json_array_get(js, (size_t)d);
        if (!json_is_integer(x) || json_integer_value(x) < 0)
            return sy_err_set(SY_EFORMAT, "%s: tensor '%s': shape[%d] is not a non-negative integer", what, name, d);
        e->shape[d] = json_integer_value(x);
        uint64_t dim = (uint64_t)e->shape[d];
        if (dim && bytes > UINT64_MAX / 2 / dim)
            return sy_err_set(SY_EFORMAT, "%s: tensor '%s': shape overflows", what, name);
        bytes *= dim;
    }
    if (!json_is_array(jo) || json_array_size(jo) != 2 || !json_is_integer(json_array_get(jo, 0)) ||
        !json_is_integer(json_array_get(jo, 1)) || json_integer_value(json_array_get(jo, 0)) < 0 ||
        json_integer_value(json_array_get(jo, 1)) < 0)
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': data_offsets is not [begin, end] of non-negative integers",
                          what, name);
    e->begin = (uint64_t)json_integer_value(json_array_get(jo, 0));
    e->end = (uint64_t)json_integer_value(json_array_get(jo, 1));
    if (e->end < e->begin)
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 ") end before begin",
                          what, name, e->begin, e->end);
    if (e->end - e->begin != bytes) {
        char sh[128];
        return sy_err_set(SY_EFORMAT,
                          "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 ") hold %" PRIu64
                          " bytes but shape %s of %s needs %" PRIu64,
                          what, name, e->begin, e->end, e->end - e->begin, fmt_shape(sh, sizeof sh, e->ndim, e->shape),
                          dt_names[e->dtype], bytes);
    }
    return SY_OK;
}

static int cmp_span(const void *a, const void *b) {
    const st_entry *x = *(const st_entry *const *)a, *y = *(const st_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Checks that the spans, sorted by offset, tile [0, data_len) exactly. */
static sy_status check_tiling(const sy_st_file_t *f) {
    sy_status st = SY_OK;
    const st_entry **s = malloc(sizeof *s * (size_t)(f->n ? f->n : 1));
    if (!s) return sy_err_set(SY_ENOMEM, "%s: sorting %d tensors", f->what, f->n);
    for (int i = 0; i < f->n; i++) s[i] = &f->e[i];
    qsort(s, (size_t)f->n, sizeof *s, cmp_span);
    uint64_t pos = 0;
    const char *prev = NULL;
    for (int i = 0; i < f->n; i++) {
        if (s[i]->end > f->data_len) {
            st = sy_err_set(SY_EFORMAT,
                            "%s: tensor '%s': data_offsets end %" PRIu64 " is past the data section (%" PRIu64
                            " bytes): file truncated or wrong size",
                            f->what, s[i]->name, s[i]->end, f->data_len);
            goto out;
        }
        if (s[i]->begin < pos) {
            st = sy_err_set(SY_EFORMAT, "%s: tensor '%s' at [%" PRIu64 ", %" PRIu64 ") overlaps tensor '%s' ending at %" PRIu64,
                            f->what, s[i]->name, s[i]->begin, s[i]->end, prev, pos);
            goto out;
        }
        if (s[i]->begin > pos) {
            st = sy_err_set(SY_EFORMAT, "%s: gap: bytes [%" PRIu64 ", %" PRIu64 ") before tensor '%s' belong to no tensor",
                            f->what, pos, s[i]->begin, s[i]->name);
            goto out;
        }
        pos = s[i]->end;
        prev = s[i]->name;
    }
    if (pos != f->data_len)
        st = sy_err_set(SY_EFORMAT, "%s: %" PRIu64 " trailing bytes after the last tensor%s%s%s", f->what,
                        f->data_len - pos, prev ? " ('" : "", prev ? prev : "", prev ? "')" : "");
out:
    free(s);
    return st;
}

/* Parses buf (ownership taken, freed on failure). */
static sy_status parse_owned(uint8_t *buf, size_t len, const char *what, sy_st_file_t **out) {
    sy_status st = SY_OK;
    json_t *root = NULL;
    sy_st_file_t *f = calloc(1, sizeof *f);
    if (!f || !(f->what = strdup(what ? what : "safetensors"))) {
        free(buf);
        if (f) free(f);
        return sy_err_set(SY_ENOMEM, "%s: parse", what ? what : "safetensors");
    }
    f->buf = buf;
    f->len = len;
    what = f->what;
    if (len < 8) {
        st = sy_err_set(SY_EFORMAT, "%s: %zu bytes, too short for the 8-byte header length", what, len);
        goto out;
    }
    uint64_t hn;
    memcpy(&hn, buf, 8);
    if (hn > ST_HEADER_MAX) {
        st = sy_err_set(SY_EFORMAT, "%s: header length %" PRIu64 " exceeds the limit of %llu bytes", what, hn,
                        ST_HEADER_MAX);
        goto out;
    }
    if (hn > len - 8) {
        st = sy_err_set(SY_EFORMAT, "%s: header length %" PRIu64 " is past the end of the file (%zu bytes)", what,
                        hn, len);
        goto out;
    }
    if (hn == 0 || buf[8] != '{') {
        st = sy_err_set(SY_EFORMAT, "%s: header is not a JSON object", what);
        goto out;
    }
    json_error_t jerr;
    root = json_loadb((const char *)buf + 8, (size_t)hn, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        st = sy_err_set(SY_EFORMAT, "%s: header JSON invalid at line %d column %d: %s", what, jerr.line,
                        jerr.column, jerr.text);
        goto out;
    }
    if (!json_is_object(root)) {
        st = sy_err_set(SY_EFORMAT, "%s: header is not a JSON object", what);
        goto out;
    }
    f->data = buf + 8 + hn;
    f->data_len = len - 8 - hn;
    size_t cap = json_object_size(root);
    f->e = calloc(cap ? cap : 1, sizeof *f->e);
    if (!f->e) {
        st = sy_err_set(SY_ENOMEM, "%s: %zu header entries", what, cap);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (!strcmp(key, ST_META_KEY)) {
            const char *mk;
            json_t *mv;
            if (!json_is_object(v)) {
                st = sy_err_set(SY_EFORMAT, "%s: %s is not an object", what, ST_META_KEY);
                goto out;
            }
            json_object_foreach(v, mk, mv) if (!json_is_string(mv)) {
                st = sy_err_set(SY_EFORMAT, "%s: %s field '%s' is not a string", what, ST_META_KEY, mk);
                goto out;
            }
            continue;
        }
        st_entry *e = &f->e[f->n];
        SY_CHECK_GOTO(parse_entry(what, key, v, e), st, out);
        if (!(e->name = strdup(key))) {
            st = sy_err_set(SY_ENOMEM, "%s: tensor name", what);
            goto out;
        }
        f->n++;
    }
    SY_CHECK_GOTO(check_tiling(f), st, out);
    *out = f;
    f = NULL;
out:
    json_decref(root);
    sy_st_destroy(&f);
    return st;
}

sy_status sy_st_parse(const void *bytes, size_t len, const char *what, sy_st_file_t **out) {
    if (!out || (!bytes && len)) return sy_err_set(SY_EINVAL, "safetensors: parse: bad arguments");
    *out = NULL;
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy) return sy_err_set(SY_ENOMEM, "%s: %zu-byte copy", what ? what : "safetensors", len);
    if (len) memcpy(copy, bytes, len);
    return parse_owned(copy, len, what, out);
}

sy_status sy_st_parse_take(void **bytes, size_t len, const char *what, sy_st_file_t **out) {
    if (!out || !bytes || (!*bytes && len)) return sy_err_set(SY_EINVAL, "safetensors: parse: bad arguments");
    *out = NULL;
    uint8_t *b = *bytes;
    *bytes = NULL;
    return parse_owned(b, len, what, out);
}

sy_status sy_st_read_file(const char *path, sy_st_file_t **out) {
    sy_status st = SY_OK;
    uint8_t *buf = NULL;
    struct stat sb;
    if (!path || !out) return sy_err_set(SY_EINVAL, "safetensors: read: bad arguments");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return sy_err_set(errno == ENOENT ? SY_ENOTFOUND : SY_EIO, "%s: open: %s", path, strerror(errno));
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        st = sy_err_set(SY_EIO, "%s: not a readable regular file", path);
        goto out;
    }
    size_t len = (size_t)sb.st_size, got = 0;
    buf = malloc(len ? len : 1);
    if (!buf) {
        st = sy_err_set(SY_ENOMEM, "%s: %zu bytes", path, len);
        goto out;
    }
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            st = sy_err_set(SY_EIO, "%s: read: %s", path, r < 0 ? strerror(errno) : "file shrank");
            goto out;
        }
        got += (size_t)r;
    }
    close(fd);
    fd = -1;
    st = parse_owned(buf, len, path, out);
    buf = NULL;
out:
    if (fd >= 0) close(fd);
    free(buf);
    return st;
}

void sy_st_destroy(sy_st_file_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_st_file_t *f = *self_p;
    for (int i = 0; i < f->n; i++) free(f->e[i].name);
    free(f->e);
    free(f->buf);
    free(f->what);
    free(f);
    *self_p = NULL;
}

int sy_st_count(const sy_st_file_t *f) { return f ? f->n : 0; }

const char *sy_st_name(const sy_st_file_t *f, int i) {
    return (f && i >= 0 && i < f->n) ? f->e[i].name : NULL;
}

int sy_st_find(const sy_st_file_t *f, const char *name) {
    if (!f || !name) return -1;
    for (int i = 0; i < f->n; i++)
        if (!strcmp(f->e[i].name, name)) return i;
    return -1;
}

const char *sy_st_dtype_name(const sy_st_file_t *f, int i) {
    return (f && i >= 0 && i < f->n) ? dt_names[f->e[i].dtype] : NULL;
}

int sy_st_shape(const sy_st_file_t *f, int i, int64_t shape[SY_MAX_DIMS]) {
    if (!f || i < 0 || i >= f->n) return -1;
    for (int d = 0; d < f->e[i].ndim; d++) shape[d] = f->e[i].shape[d];
    return f->e[i].ndim;
}

sy_status sy_st_load(const sy_st_file_t *f, const sy_tensor_ref *t) {
    if (!f || !t || !t->name) return sy_err_set(SY_EINVAL, "safetensors: load: bad arguments");
    int i = sy_st_find(f, t->name);
    if (i < 0) return sy_err_set(SY_ENOTFOUND, "%s: no tensor '%s'", f->what, t->name);
    const st_entry *e = &f->e[i];
    int same = e->ndim == t->ndim;
    for (int d = 0; same && d < e->ndim; d++) same = e->shape[d] == t->shape[d];
    if (!same) {
        char a[128], b[128];
        return sy_err_set(SY_EFORMAT, "%s: tensor '%s' has shape %s but %s was expected", f->what, t->name,
                          fmt_shape(a, sizeof a, e->ndim, e->shape), fmt_shape(b, sizeof b, t->ndim, t->shape));
    }
    int64_t numel = sy_tensor_numel(t);
    if (numel > 0 && !t->data) return sy_err_set(SY_EINVAL, "%s: tensor '%s': no destination buffer", f->what, t->name);
    const uint8_t *src = f->data + e->begin;
    switch (e->dtype) {
    case DT_F32:
        if (numel) memcpy(t->data, src, (size_t)numel * 4);
        break;
    case DT_BF16:
        for (int64_t k = 0; k < numel; k++) {
            uint16_t h;
            memcpy(&h, src + 2 * k, 2);
            t->data[k] = sy_bf16_to_f32(h);
        }
        break;
    default:
        for (int64_t k = 0; k < numel; k++) {
            uint16_t h;
            memcpy(&h, src + 2 * k, 2);
            t->data[k] = f16_to_f32(h);
        }
        break;
    }
    return SY_OK;
}
