/* The S3 backend of the object store: libcurl + its SigV4 signer (see store_s3.h and the
 * storage notes for the libcurl 7.88 rules followed here). */
#include "storage/store_s3.h"
#include "base/clock.h"
#include "storage/curl_check.h"
#include "store_backends_internal.h"
#include "store_s3_internal.h"

#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "base/log.h"
#include "base/parallel.h"

#define MIB (1024ull * 1024ull)
#define MIN_PART (5 * MIB)
#define MAX_PARTS 10000ull
#define POOL_MAX 32
#define BIG_BODY (4 * MIB) /* bodies this large go to a huge-page-advised buffer */
#define ERRBODY_MAX 8192 /* bytes of an error body kept for its <Code> / <Message> */

typedef struct {
    char *bucket;
    char *prefix;   /* "" or "dir/sub" (no trailing '/') */
    char *base;     /* URL of the bucket without trailing '/': http://host:port/bucket or https://bucket.host */
    char *userpwd;  /* KEY:SECRET */
    char *token;    /* session token or NULL */
    char *sigv4;    /* aws:amz:<region>:s3 */
    char *url;
    sy_s3_options o;
    CURLSH *share;
    pthread_mutex_t share_lock[CURL_LOCK_DATA_LAST];
    pthread_mutex_t pool_lock;
    CURL *pool[POOL_MAX];
    int pool_n;
    int raw_slash; /* atomic: the server signs list queries with '/' decoded (moto) */
} s3_store;

/* ---------------------------------------------------------------- options, small helpers */

void sy_s3_options_default(sy_s3_options *o) {
    memset(o, 0, sizeof *o);
    o->addressing = SY_S3_ADDR_AUTO;
    o->multipart_threshold = 64 * MIB;
    o->part_size = 16 * MIB;
    o->parallel = 4;
    o->connect_timeout_ms = 10000;
    o->timeout_ms = 60000;
    o->max_attempts = 5;
    o->backoff_base_ms = 100;
    o->backoff_cap_ms = 20000;
}

static char *xstrdup(const char *s) { return s ? strdup(s) : NULL; }

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char *p = NULL;
    int n = vasprintf(&p, fmt, ap);
    va_end(ap);
    return n < 0 ? NULL : p;
}


static void sleep_ms(uint64_t ms) {
    struct timespec ts = {.tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* Thread-local xorshift for backoff jitter. */
static uint64_t jitter_rand(void) {
    static __thread uint64_t x;
    if (!x) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        x = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)ts.tv_sec ^ (uint64_t)(uintptr_t)&x ^ 0x9E3779B97F4A7C15ull;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return x;
}

static void backoff(const s3_store *s, int attempt) {
    uint64_t cap = (uint64_t)s->o.backoff_cap_ms, ceil = (uint64_t)s->o.backoff_base_ms;
    for (int i = 0; i < attempt && ceil < cap; i++) ceil *= 2;
    if (ceil > cap) ceil = cap;
    if (ceil) sleep_ms(jitter_rand() % (ceil + 1));
}

/* AWS percent-encoding of a query value: only A-Za-z0-9-._~ stay (and '/' with keep_slash),
 * %XX uppercase. */
static char *aws_encode_q(const char *v, int keep_slash) {
    size_t n = strlen(v);
    char *o = malloc(3 * n + 1), *p = o;
    if (!o) return NULL;
    for (const unsigned char *c = (const unsigned char *)v; *c; c++) {
        if ((*c >= 'A' && *c <= 'Z') || (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '-' ||
            *c == '.' || *c == '_' || *c == '~' || (keep_slash && *c == '/'))
            *p++ = (char)*c;
        else
            p += sprintf(p, "%%%02X", *c);
    }
    *p = 0;
    return o;
}

static char *aws_encode(const char *v) { return aws_encode_q(v, 0); }

char *sy_s3_xml_tag(const char *xml, size_t len, const char *tag, const char **after) {
    char open[64], close[64];
    snprintf(open, sizeof open, "<%s>", tag);
    snprintf(close, sizeof close, "</%s>", tag);
    const char *end = xml + len;
    const char *a = memmem(xml, len, open, strlen(open));
    if (!a) return NULL;
    a += strlen(open);
    const char *b = memmem(a, (size_t)(end - a), close, strlen(close));
    if (!b) return NULL;
    if (after) *after = b + strlen(close);
    char *o = malloc((size_t)(b - a) + 1), *p = o;
    if (!o) return NULL;
    for (const char *c = a; c < b; c++) {
        if (*c == '&') {
            static const struct {
                const char *e;
                char c;
            } ents[] = {{"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
            int done = 0;
            for (size_t i = 0; i < sizeof ents / sizeof ents[0] && !done; i++) {
                size_t el = strlen(ents[i].e);
                if ((size_t)(b - c) >= el && !memcmp(c, ents[i].e, el)) {
                    *p++ = ents[i].c;
                    c += el - 1;
                    done = 1;
                }
            }
            if (!done && c + 2 < b && c[1] == '#') {
                char *e;
                long v = c[2] == 'x' ? strtol(c + 3, &e, 16) : strtol(c + 2, &e, 10);
                if (e < b && *e == ';' && v > 0 && v < 128) {
                    *p++ = (char)v;
                    c = e;
                    done = 1;
                }
            }
            if (!done) *p++ = *c;
        } else {
            *p++ = *c;
        }
    }
    *p = 0;
    return o;
}

/* ---------------------------------------------------------------- one HTTP exchange */

typedef struct {
    /* request */
    const char *method; /* GET PUT POST DELETE HEAD */
    const char *key;    /* object key (store-relative), NULL for a bucket request */
    const char *query;  /* sorted, encoded query or NULL */
    const char *hdr[4]; /* extra headers (NULL-terminated) */
    const char *ctype;  /* Content-Type of a body */
    const char *body;
    size_t body_len;
    int has_body;       /* PUT/POST with a body (possibly empty) */
    char *out;          /* fixed output buffer (out_cap bytes expected exactly) or NULL */
    size_t out_cap;
    int want_body;      /* keep the 2xx body (growable) when out is NULL */
    int if_absent;      /* 409 is retried */
    /* per attempt */
    long status;
    int64_t clen;       /* Content-Length of the final response, -1 unknown */
    int64_t total;      /* object size from Content-Range, -1 unknown */
    uint64_t range_end; /* a range request: offset + length */
    char *buf;          /* growable body (2xx with want_body) */
    size_t len, cap;
    char err[ERRBODY_MAX];
    size_t err_len;
    int overflow;       /* more bytes than expected */
    char etag[256];
    size_t up_pos;      /* read callback position */
    uint64_t last_bytes, last_change;
    int timeout_ms, timed_out;
    /* across attempts */
    int ambiguous;      /* some attempt may have reached the server */
    int amb_before;     /* ... an attempt before the latest one */
    int attempts;
} s3_req;

void sy_s3_parse_header(const char *p, size_t len, long *status, int64_t *clen, int64_t *total, char etag[256]) {
    /* curl's header data is not NUL-terminated: parse a bounded, terminated copy (the lines we
     * read are short; a longer one is cut, which only shortens an over-long ETag). */
    char line[512];
    size_t ll = len < sizeof line - 1 ? len : sizeof line - 1;
    memcpy(line, p, ll);
    line[ll] = 0;
    p = line;
    len = ll;
    if (len >= 5 && !strncmp(p, "HTTP/", 5)) { /* a new response (after 100 Continue, say) */
        const char *sp = memchr(p, ' ', len);
        *status = sp ? strtol(sp + 1, NULL, 10) : 0;
        *clen = -1;
        *total = -1;
        etag[0] = 0;
        return;
    }
    if (len > 14 && !strncasecmp(p, "content-range:", 14)) {
        const char *sl = memchr(p, '/', len);
        if (sl && sl[1] != '*') *total = strtoll(sl + 1, NULL, 10);
        return;
    }
    if (len > 15 && !strncasecmp(p, "content-length:", 15)) {
        *clen = strtoll(p + 15, NULL, 10);
    } else if (len > 5 && !strncasecmp(p, "etag:", 5)) {
        const char *a = p + 5, *e = p + len;
        while (a < e && (*a == ' ' || *a == '\t')) a++;
        while (e > a && (e[-1] == '\r' || e[-1] == '\n' || e[-1] == ' ')) e--;
        size_t l = (size_t)(e - a) < 255 ? (size_t)(e - a) : 255;
        memcpy(etag, a, l);
        etag[l] = 0;
    }
}

static size_t on_header(char *p, size_t sz, size_t n, void *ud) {
    s3_req *r = ud;
    sy_s3_parse_header(p, sz * n, &r->status, &r->clen, &r->total, r->etag);
    return sz * n;
}

static size_t on_write(char *p, size_t sz, size_t n, void *ud) {
    s3_req *r = ud;
    size_t len = sz * n;
    if (r->status < 200 || r->status >= 300) { /* error body: keep the start */
        size_t room = sizeof r->err - 1 - r->err_len;
        size_t l = len < room ? len : room;
        memcpy(r->err + r->err_len, p, l);
        r->err_len += l;
        r->err[r->err_len] = 0;
        return len;
    }
    if (r->out) {
        if (r->len + len > r->out_cap) {
            r->overflow = 1;
            return 0; /* aborts the transfer (CURLE_WRITE_ERROR) */
        }
        memcpy(r->out + r->len, p, len);
        r->len += len;
        return len;
    }
    if (!r->want_body) return len;
    /* One buffer of the announced size. */
    int64_t want = r->clen;
    if (!r->buf && want >= (int64_t)BIG_BODY) {
        void *b = NULL;
        if (posix_memalign(&b, 2 * MIB, (size_t)want + 1) != 0) return 0;
        (void)madvise(b, (size_t)want + 1, MADV_HUGEPAGE); /* halves the page-fault cost */
        r->buf = b;
        r->cap = (size_t)want + 1;
    }
    if (r->len + len + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        if (r->clen >= 0 && (uint64_t)r->clen + 1 > cap) cap = (size_t)r->clen + 1;
        while (cap < r->len + len + 1) cap *= 2;
        char *b = realloc(r->buf, cap);
        if (!b) return 0;
        r->buf = b;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, p, len);
    r->len += len;
    r->buf[r->len] = 0;
    return len;
}

static size_t on_read(char *p, size_t sz, size_t n, void *ud) {
    s3_req *r = ud;
    size_t room = sz * n, left = r->body_len - r->up_pos;
    size_t l = left < room ? left : room;
    if (l) memcpy(p, r->body + r->up_pos, l);
    r->up_pos += l;
    return l;
}

static int on_seek(void *ud, curl_off_t off, int origin) {
    s3_req *r = ud;
    if (origin != SEEK_SET || off < 0 || (uint64_t)off > r->body_len) return CURL_SEEKFUNC_FAIL;
    r->up_pos = (size_t)off;
    return CURL_SEEKFUNC_OK;
}

/* Idle timeout: no byte up or down for timeout_ms ends the attempt. */
static int on_progress(void *ud, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un) {
    (void)dt;
    (void)ut;
    s3_req *r = ud;
    uint64_t bytes = (uint64_t)dn + (uint64_t)un, t = (uint64_t)sy_mono_ms();
    if (bytes != r->last_bytes) {
        r->last_bytes = bytes;
        r->last_change = t;
        return 0;
    }
    if (t - r->last_change > (uint64_t)r->timeout_ms) {
        r->timed_out = 1;
        return 1;
    }
    return 0;
}

static void share_lock(CURL *h, curl_lock_data d, curl_lock_access a, void *ud) {
    (void)h;
    (void)a;
    pthread_mutex_lock(&((s3_store *)ud)->share_lock[d]);
}

static void share_unlock(CURL *h, curl_lock_data d, void *ud) {
    (void)h;
    pthread_mutex_unlock(&((s3_store *)ud)->share_lock[d]);
}

static CURL *pool_get(s3_store *s) {
    CURL *h = NULL;
    pthread_mutex_lock(&s->pool_lock);
    if (s->pool_n > 0) h = s->pool[--s->pool_n];
    pthread_mutex_unlock(&s->pool_lock);
    return h ? h : curl_easy_init();
}

static void pool_put(s3_store *s, CURL *h) {
    pthread_mutex_lock(&s->pool_lock);
    if (s->pool_n < POOL_MAX) {
        s->pool[s->pool_n++] = h;
        h = NULL;
    }
    pthread_mutex_unlock(&s->pool_lock);
    if (h) curl_easy_cleanup(h);
}

static char *object_url(const s3_store *s, const char *key, const char *query) {
    return xasprintf("%s/%s%s%s%s%s", s->base, key ? s->prefix : "", key && s->prefix[0] ? "/" : "",
                     key ? key : "", query ? "?" : "", query ? query : "");
}

typedef enum { OUT_OK, OUT_RETRY, OUT_FINAL } outcome;

static int retryable_code(const char *code) {
    static const char *const codes[] = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled",
                                        "TooManyRequestsException", "RequestLimitExceeded",
                                        "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
                                        "PriorRequestNotComplete", "InternalError", "ServiceUnavailable", NULL};
    for (int i = 0; code && codes[i]; i++)
        if (!strcmp(code, codes[i])) return 1;
    return 0;
}

/* Clears what one attempt fills in (status, lengths, buffers' fill, idle clock); remembers
 * whether an earlier attempt's outcome was unknown. */
static void attempt_reset(const s3_store *s, s3_req *r) {
    r->amb_before = r->ambiguous;
    r->status = 0;
    r->clen = -1;
    r->total = -1;
    r->len = 0;
    r->err_len = 0;
    r->err[0] = 0;
    r->overflow = 0;
    r->etag[0] = 0;
    r->up_pos = 0;
    r->last_bytes = 0;
    r->last_change = (uint64_t)sy_mono_ms();
    r->timeout_ms = s->o.timeout_ms;
    r->timed_out = 0;
}

/* The request's headers: the payload hash SigV4 needs, the session token, the body's content
 * type and the operation's own (r->hdr). NULL when out of memory. */
static struct curl_slist *attempt_headers(const s3_store *s, const s3_req *r) {
    struct curl_slist *hl = NULL, *t;
    char tok[4096];
    int ok = 1;
#define ADDH(str)                                      \
    do {                                               \
        t = curl_slist_append(hl, (str));              \
        if (!t) ok = 0; else hl = t;                   \
    } while (0)
    ADDH("x-amz-content-sha256: UNSIGNED-PAYLOAD");
    if (s->token) {
        snprintf(tok, sizeof tok, "x-amz-security-token: %s", s->token);
        ADDH(tok);
    }
    if (r->has_body) {
        snprintf(tok, sizeof tok, "Content-Type: %s", r->ctype ? r->ctype : "application/octet-stream");
        ADDH(tok);
    }
    for (int i = 0; i < 4 && r->hdr[i]; i++) ADDH(r->hdr[i]);
#undef ADDH
    if (!ok) {
        curl_slist_free_all(hl);
        return NULL;
    }
    return hl;
}

/* Sets every option of one attempt on h: signing, bounds (connect and idle timeouts), the
 * callbacks that fill r, and the method with its body. */
static void attempt_setopt(s3_store *s, s3_req *r, CURL *h, const char *url, struct curl_slist *hl) {
    curl_easy_reset(h); /* keeps the live connection */
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_SHARE, s->share);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_AWS_SIGV4, s->sigv4);
    curl_easy_setopt(h, CURLOPT_USERPWD, s->userpwd);
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, hl);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)s->o.connect_timeout_ms);
    curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(h, CURLOPT_XFERINFODATA, r);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L); /* belt and braces for the idle timeout */
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, (long)(s->o.timeout_ms / 1000 + 1));
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(h, CURLOPT_EXPECT_100_TIMEOUT_MS, 200L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_BUFFERSIZE, 512L * 1024);        /* fewer callbacks on big bodies */
    curl_easy_setopt(h, CURLOPT_UPLOAD_BUFFERSIZE, 2L * 1024 * 1024);
    if (r->has_body) {
        curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(h, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(h, CURLOPT_READDATA, r);
        curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(h, CURLOPT_SEEKDATA, r);
        curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, (curl_off_t)r->body_len);
        if (strcmp(r->method, "PUT")) curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, r->method);
    } else if (!strcmp(r->method, "HEAD")) {
        curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (strcmp(r->method, "GET")) {
        curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, r->method);
    }
}

/* A transfer curl could not finish: curl's code translated (curl_check.h), then refined by what
 * the callbacks saw (an overflow, the idle timeout, a short body, a refused buffer). Out of
 * memory and a bad URL are final, the rest is retried. */
static outcome transport_failure(const s3_store *s, s3_req *r, CURLcode cc, const char *url, char *why, size_t whyn,
                                 sy_status *st) {
    if (cc != CURLE_COULDNT_CONNECT && cc != CURLE_COULDNT_RESOLVE_HOST) r->ambiguous = 1; /* it may have arrived */
    int short_body = r->status >= 200 && r->status < 300 && r->clen >= 0 && (int64_t)r->len < r->clen;
    *st = sy_curl_status(cc);
    if (r->overflow) {
        *st = SY_ECORRUPT;
        snprintf(why, whyn, "server sent more than the %zu bytes expected", r->out_cap);
    } else if (r->timed_out || *st == SY_ETIMEOUT) {
        *st = SY_ETIMEOUT;
        snprintf(why, whyn, "no progress for %d ms (timeout)", s->o.timeout_ms);
    } else if (*st == SY_ECORRUPT || short_body) {
        *st = SY_ECORRUPT;
        snprintf(why, whyn, "truncated body (%zu of %" PRId64 " bytes): %s", r->len, r->clen,
                 curl_easy_strerror(cc));
    } else if (*st == SY_ENOMEM || cc == CURLE_WRITE_ERROR) { /* on_write refused to grow the buffer */
        *st = SY_ENOMEM;
        if (r->clen >= 0)
            snprintf(why, whyn, "out of memory receiving the body (the server announced Content-Length %" PRId64
                     " bytes)", r->clen);
        else
            snprintf(why, whyn, "out of memory receiving the body");
        return OUT_FINAL;
    } else {
        snprintf(why, whyn, "%s (%s)", curl_easy_strerror(cc), url);
        if (*st == SY_EINVAL) return OUT_FINAL; /* a malformed URL or an unsupported scheme */
    }
    return OUT_RETRY;
}

/* A 2xx reply: accepted only with the whole body (exactly Content-Length, the range asked for,
 * the buffer's size) and without an <Error> in it (CompleteMultipartUpload answers 200 so). */
static outcome success_reply(s3_req *r, char *why, size_t whyn, sy_status *st) {
    int64_t got = (int64_t)r->len;
    int is_head = !strcmp(r->method, "HEAD");
    if (!is_head && (r->out || r->want_body) && r->clen >= 0 && got != r->clen) {
        r->ambiguous = 1;
        *st = SY_ECORRUPT;
        snprintf(why, whyn, "truncated body (%" PRId64 " of %" PRId64 " bytes)", got, r->clen);
        return OUT_RETRY;
    }
    if (r->range_end && r->total >= 0 && r->range_end > (uint64_t)r->total) {
        *st = SY_EINVAL; /* S3 clamps a range that runs past the end */
        snprintf(why, whyn, "the object has %" PRId64 " bytes", r->total);
        return OUT_FINAL;
    }
    if (!is_head && r->out && r->len != r->out_cap) {
        *st = SY_ECORRUPT;
        snprintf(why, whyn, "got %zu bytes, expected %zu", r->len, r->out_cap);
        return OUT_RETRY;
    }
    if (r->want_body && r->buf && memmem(r->buf, r->len, "<Error>", 7)) {
        char *c = sy_s3_xml_tag(r->buf, r->len, "Code", NULL), *m = sy_s3_xml_tag(r->buf, r->len, "Message", NULL);
        snprintf(why, whyn, "%ld %s%s%s", r->status, c ? c : "Error", m ? ": " : "", m ? m : "");
        *st = SY_EREMOTE;
        outcome oc = retryable_code(c) ? OUT_RETRY : OUT_FINAL;
        r->ambiguous = 1;
        free(c);
        free(m);
        return oc;
    }
    *st = SY_OK;
    return OUT_OK;
}

/* Adds to why what a refused request (400, 403) most likely needs fixed, from S3's error code
 * `c` (may be NULL); a missing bucket becomes SY_ENOTFOUND. */
static void refused_hint(const s3_store *s, const s3_req *r, const char *c, char *why, size_t whyn, sy_status *st) {
    size_t l = strlen(why);
    if (!c && !strcmp(r->method, "HEAD"))
        snprintf(why + l, whyn - l, " (a HEAD reply has no error code: check AWS_ACCESS_KEY_ID, "
                                    "AWS_SECRET_ACCESS_KEY, AWS_REGION and permissions)");
    if (c && (!strcmp(c, "SignatureDoesNotMatch") || !strcmp(c, "IncompleteSignature")))
        snprintf(why + l, whyn - l, " (check AWS_SECRET_ACCESS_KEY and AWS_REGION)");
    else if (c && !strcmp(c, "InvalidAccessKeyId"))
        snprintf(why + l, whyn - l, " (check AWS_ACCESS_KEY_ID)");
    else if (c && (!strcmp(c, "ExpiredToken") || !strcmp(c, "InvalidToken")))
        snprintf(why + l, whyn - l, " (check AWS_SESSION_TOKEN)");
    else if (c && !strcmp(c, "AccessDenied"))
        snprintf(why + l, whyn - l, " (the credentials lack permission on bucket %s)", s->bucket);
    else if (c && !strcmp(c, "NoSuchBucket"))
        *st = SY_ENOTFOUND;
}

/* A reply other than 2xx: "HTTP <code> <S3 code>: <message>". 5xx, 429, throttling codes and a
 * 409 on a conditional write are retried; the rest are final (404 SY_ENOTFOUND, 412 SY_EEXIST,
 * 416 SY_EINVAL, else SY_EREMOTE). */
static outcome error_reply(const s3_store *s, s3_req *r, char *why, size_t whyn, sy_status *st) {
    long code = r->status;
    outcome oc = OUT_FINAL;
    r->ambiguous = 1;
    char *c = sy_s3_xml_tag(r->err, r->err_len, "Code", NULL), *m = sy_s3_xml_tag(r->err, r->err_len, "Message", NULL);
    snprintf(why, whyn, "HTTP %ld%s%s%s%s", code, c ? " " : "", c ? c : "", m ? ": " : "", m ? m : "");
    if (code == 500 || code == 502 || code == 503 || code == 504 || code == 429 || retryable_code(c) ||
        (code == 409 && r->if_absent)) {
        *st = SY_EREMOTE;
        oc = OUT_RETRY;
    } else {
        *st = code == 404 ? SY_ENOTFOUND : code == 412 ? SY_EEXIST : code == 416 ? SY_EINVAL : SY_EREMOTE;
        if (code == 403 || code == 400) {
            refused_hint(s, r, c, why, whyn, st);
        } else if (c && !strcmp(c, "NoSuchBucket")) {
            size_t l = strlen(why);
            snprintf(why + l, whyn - l, " (bucket %s)", s->bucket);
        }
    }
    free(c);
    free(m);
    return oc;
}

/* Runs one attempt; describes a failure in why. */
static outcome attempt_once(s3_store *s, s3_req *r, char *why, size_t whyn, sy_status *st) {
    outcome oc = OUT_FINAL;
    char *url = object_url(s, r->key, r->query);
    CURL *h = pool_get(s);
    struct curl_slist *hl = NULL;
    if (url && h) {
        attempt_reset(s, r);
        hl = attempt_headers(s, r);
    }
    if (!hl) {
        *st = SY_ENOMEM;
        snprintf(why, whyn, "out of memory");
        goto out;
    }
    attempt_setopt(s, r, h, url, hl);
    CURLcode cc = curl_easy_perform(h);
    r->attempts++;
    if (cc != CURLE_OK)
        oc = transport_failure(s, r, cc, url, why, whyn, st);
    else if (r->status >= 200 && r->status < 300)
        oc = success_reply(r, why, whyn, st);
    else
        oc = error_reply(s, r, why, whyn, st);
out:
    curl_slist_free_all(hl);
    if (h) pool_put(s, h);
    free(url);
    return oc;
}

/* Runs a request with retries. On failure the message is "s3 <op> <key>: <why>". */
static sy_status s3_do(s3_store *s, s3_req *r, const char *op) {
    char why[1024] = "";
    sy_status st = SY_EINTERNAL;
    const char *what = r->key ? r->key : s->bucket;
    r->attempts = 0;
    for (int a = 0; a < s->o.max_attempts; a++) {
        if (a > 0) backoff(s, a - 1);
        outcome oc = attempt_once(s, r, why, sizeof why, &st);
        if (oc == OUT_OK) return SY_OK;
        if (oc == OUT_FINAL) return sy_err_set(st, "s3 %s %s: %s", op, what, why);
    }
    return sy_err_set(st, "s3 %s %s: gave up after %d attempts; last: %s", op, what, s->o.max_attempts, why);
}

static void req_free(s3_req *r) {
    free(r->buf);
    r->buf = NULL;
    r->len = r->cap = 0;
}

/* ---------------------------------------------------------------- operations */

static sy_status s3_head(void *impl, const char *key, uint64_t *size) {
    s3_req r = {.method = "HEAD", .key = key};
    SY_CHECK(s3_do(impl, &r, "head"));
    if (r.clen < 0) return sy_err_set(SY_EREMOTE, "s3 head %s: no Content-Length in the reply", key);
    /* S3 answers every HEAD of an object with its ETag: a 200 without one is not S3's answer (a
     * proxy or a misconfigured endpoint) and must not pass for "the object exists" */
    if (!r.etag[0])
        return sy_err_set(SY_EREMOTE, "s3 head %s: status %ld without an ETag: the endpoint does not answer like S3",
                          key, r.status);
    *size = (uint64_t)r.clen;
    return SY_OK;
}

/* Whole object: one GET (ranged parallel GETs would be the way for real S3, but a server that
 * copies the object per range request, like moto, makes them many times slower). */
static sy_status s3_get(void *impl, const char *key, void **buf, size_t *len) {
    s3_store *s = impl;
    s3_req r = {.method = "GET", .key = key, .want_body = 1};
    sy_status st = s3_do(s, &r, "get");
    if (st != SY_OK) {
        req_free(&r);
        return st;
    }
    if (!r.buf && !(r.buf = malloc(1))) return sy_err_set(SY_ENOMEM, "s3 get %s", key);
    *buf = r.buf;
    *len = r.len;
    return SY_OK;
}

/* One ranged GET (len > 0); *obj gets the object's size (Content-Range) and ETag from the same
 * reply, so they describe exactly the bytes delivered. */
static sy_status s3_get_range_obj(void *impl, const char *key, uint64_t offset, size_t len, void *buf,
                                  sy_store_obj *obj) {
    char range[96];
    snprintf(range, sizeof range, "Range: bytes=%" PRIu64 "-%" PRIu64, offset, offset + (uint64_t)len - 1);
    s3_req r = {.method = "GET", .key = key, .hdr = {range}, .out = buf, .out_cap = len,
                .range_end = offset + (uint64_t)len};
    sy_status st = s3_do(impl, &r, "get");
    if (st == SY_EINVAL) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", sy_err_msg());
        return sy_err_set(SY_EINVAL, "%s: range [%" PRIu64 ", +%zu) past its end", msg, offset, len);
    }
    if (st == SY_OK && r.status != 206) {
        /* A server ignoring Range sends 200 and the whole object: accept only an exact fit. */
        if (!(offset == 0 && r.clen == (int64_t)len))
            return sy_err_set(SY_EREMOTE, "s3 get %s: range request answered %ld without a range", key, r.status);
        r.total = r.clen;
    }
    if (st == SY_OK && obj) {
        if (r.total < 0)
            return sy_err_set(SY_EREMOTE, "s3 get %s: a range reply without the object's size (Content-Range)", key);
        obj->size = (uint64_t)r.total;
        snprintf(obj->etag, sizeof obj->etag, "%s", r.etag);
    }
    return st;
}

static sy_status s3_get_range(void *impl, const char *key, uint64_t offset, size_t len, void *buf) {
    if (len == 0) {
        uint64_t size;
        SY_CHECK(s3_head(impl, key, &size));
        if (offset > size)
            return sy_err_set(SY_EINVAL, "s3 get %s: range [%" PRIu64 ", +0) past its end (%" PRIu64 " bytes)", key,
                              offset, size);
        return SY_OK;
    }
    return s3_get_range_obj(impl, key, offset, len, buf, NULL);
}

/* A 412 after an attempt whose outcome is unknown may be our own earlier write: it is ours
 * when the stored object has exactly our bytes. */
static sy_status resolve_412(s3_store *s, const char *key, const void *buf, size_t len, int ambiguous) {
    char msg[1024];
    snprintf(msg, sizeof msg, "%s", sy_err_msg());
    if (!ambiguous) return sy_err_set(SY_EEXIST, "s3 put_if_absent %s: object exists", key);
    void *have = NULL;
    size_t hl = 0;
    sy_status st = s3_get(s, key, &have, &hl);
    int same = st == SY_OK && hl == len && (len == 0 || !memcmp(have, buf, len));
    free(have);
    if (same) {
        sy_err_clear();
        return SY_OK;
    }
    return sy_err_set(SY_EEXIST, "s3 put_if_absent %s: object exists (%s)", key, msg);
}

typedef struct {
    s3_store *s;
    const char *key, *enc_id; /* the object; its upload id, URL-encoded */
    const char *buf;
    uint64_t size, part;
    int nparts;
    char (*etags)[256];
} mp_job;

/* Part i + 1 of a multipart upload (sy_parallel_for's item i). */
static sy_status mp_part(void *arg, size_t idx) {
    mp_job *j = arg;
    const int i = (int)idx;
    char q[1024];
    uint64_t off = (uint64_t)i * j->part;
    uint64_t plen = off + j->part > j->size ? j->size - off : j->part;
    snprintf(q, sizeof q, "partNumber=%d&uploadId=%s", i + 1, j->enc_id);
    s3_req r = {.method = "PUT", .key = j->key, .query = q, .has_body = 1, .body = j->buf + off,
                .body_len = (size_t)plen};
    sy_status st = s3_do(j->s, &r, "put (part)");
    if (st == SY_OK && !r.etag[0])
        st = sy_err_set(SY_EREMOTE, "s3 put %s: part %d: no ETag in the reply", j->key, i + 1);
    if (st == SY_OK) memcpy(j->etags[i], r.etag, sizeof r.etag);
    else sy_err_prefix(st, "part %d of %d", i + 1, j->nparts);
    return st;
}

static void mp_abort(s3_store *s, const char *key, const char *enc_id) {
    char q[1024];
    snprintf(q, sizeof q, "uploadId=%s", enc_id);
    s3_req r = {.method = "DELETE", .key = key, .query = q};
    (void)s3_do(s, &r, "abort multipart"); /* best effort: the caller reports the first error */
}

static sy_status s3_put_multipart(s3_store *s, const char *key, const void *buf, size_t len, int if_absent) {
    sy_status st = SY_OK;
    char *upload_id = NULL, *enc = NULL, *xml = NULL;
    char (*etags)[256] = NULL;
    uint64_t size = len, part = s->o.part_size;
    if (part < MIN_PART) part = MIN_PART;
    if (part < (size + MAX_PARTS - 1) / MAX_PARTS) part = (size + MAX_PARTS - 1) / MAX_PARTS;
    int nparts = (int)((size + part - 1) / part);
    mp_job j = {.s = s, .key = key, .buf = buf, .size = size, .part = part, .nparts = nparts};

    s3_req ri = {.method = "POST", .key = key, .query = "uploads=", .has_body = 1, .ctype = "application/octet-stream",
                 .want_body = 1};
    SY_CHECK_GOTO(s3_do(s, &ri, "put (initiate multipart)"), st, out);
    upload_id = sy_s3_xml_tag(ri.buf ? ri.buf : "", ri.len, "UploadId", NULL);
    req_free(&ri);
    if (!upload_id || !upload_id[0]) {
        st = sy_err_set(SY_EREMOTE, "s3 put %s: initiate multipart: no UploadId in the reply", key);
        goto out;
    }
    if (!(enc = aws_encode(upload_id)) || !(etags = calloc((size_t)nparts, sizeof *etags))) {
        st = sy_err_set(SY_ENOMEM, "s3 put %s: %d parts", key, nparts);
        goto abort;
    }
    j.enc_id = enc;
    j.etags = etags;
    /* s->o.parallel parts at once; the first failure stops the others taking parts */
    int want = s->o.parallel < nparts ? s->o.parallel : nparts;
    if ((st = sy_parallel_for(want, (size_t)nparts, true, mp_part, &j)) != SY_OK) {
        st = sy_err_prefix(st, "s3 put %s: multipart upload aborted", key);
        goto abort;
    }

    /* Complete with every part in order. */
    size_t cap = 128 + (size_t)nparts * 320, pos = 0;
    if (!(xml = malloc(cap))) {
        st = sy_err_set(SY_ENOMEM, "s3 put %s", key);
        goto abort;
    }
    pos += (size_t)snprintf(xml + pos, cap - pos, "<CompleteMultipartUpload>");
    for (int i = 0; i < nparts; i++)
        pos += (size_t)snprintf(xml + pos, cap - pos, "<Part><PartNumber>%d</PartNumber><ETag>%s</ETag></Part>", i + 1,
                                etags[i]);
    pos += (size_t)snprintf(xml + pos, cap - pos, "</CompleteMultipartUpload>");
    char q[1024];
    snprintf(q, sizeof q, "uploadId=%s", enc);
    s3_req rc = {.method = "POST", .key = key, .query = q, .has_body = 1, .ctype = "application/xml", .body = xml,
                 .body_len = pos, .want_body = 1, .if_absent = if_absent,
                 .hdr = {if_absent ? "If-None-Match: *" : NULL}};
    st = s3_do(s, &rc, "put (complete multipart)");
    int ambiguous = rc.amb_before;
    /* success is a CompleteMultipartUploadResult; anything else does not say the object exists */
    if (st == SY_OK && !(rc.buf && memmem(rc.buf, rc.len, "<CompleteMultipartUploadRes", 27))) /* ...Result (S3),
                                                                                    ...Response (moto) */
        st = sy_err_set(SY_EREMOTE, "s3 put %s: complete multipart: status %ld without a "
                        "CompleteMultipartUploadResult (%zu bytes: '%.80s'): the endpoint does not answer like S3",
                        key, rc.status, rc.len, rc.buf ? rc.buf : "");
    req_free(&rc);
    if (st == SY_OK) goto out;
    if (st == SY_EEXIST) {
        st = resolve_412(s, key, buf, len, ambiguous);
        if (st == SY_OK) goto out; /* nothing to abort: our own earlier complete won */
        goto abort;
    }
    if (ambiguous && st == SY_ENOTFOUND && strstr(sy_err_msg(), "NoSuchUpload")) {
        /* An earlier complete succeeded but its reply was lost. */
        void *have = NULL;
        size_t hl = 0;
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", sy_err_msg());
        sy_status g = s3_get(s, key, &have, &hl);
        int same = g == SY_OK && hl == len && !memcmp(have, buf, len);
        free(have);
        if (same) {
            sy_err_clear();
            st = SY_OK;
            goto out;
        }
        st = sy_err_set(SY_EREMOTE, "%s", msg);
    }
abort:
    if (enc) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", sy_err_msg());
        mp_abort(s, key, enc);
        sy_err_set(st, "%s", msg);
    }
out:
    free(xml);
    free(etags);
    free(enc);
    free(upload_id);
    return st;
}

static sy_status s3_put(void *impl, const char *key, const void *buf, size_t len, int if_absent) {
    s3_store *s = impl;
    if ((uint64_t)len >= s->o.multipart_threshold && len > 0) return s3_put_multipart(s, key, buf, len, if_absent);
    s3_req r = {.method = "PUT", .key = key, .has_body = 1, .body = buf, .body_len = len, .if_absent = if_absent,
                .hdr = {if_absent ? "If-None-Match: *" : NULL}};
    sy_status st = s3_do(s, &r, if_absent ? "put_if_absent" : "put");
    if (st == SY_EEXIST && if_absent) return resolve_412(s, key, buf, len, r.amb_before);
    /* PutObject's success carries the new object's ETag; without it nothing says the object
     * was stored */
    if (st == SY_OK && !r.etag[0])
        return sy_err_set(SY_EREMOTE, "s3 put %s: status %ld without an ETag: the endpoint does not answer like S3, "
                          "the object may not be stored", key, r.status);
    return st;
}

sy_status sy_s3_parse_list(const char *body, size_t len, const char *full, size_t strip, char ***keys, size_t *n,
                           size_t *cap, char **token) {
    sy_status st = SY_OK;
    const char *p = body, *after = NULL;
    size_t left = len;
    char *k;
    /* An answer that is not a ListBucketResult (an HTML page, an error document, garbage) is
     * an error, never an empty listing: an empty listing says "no checkpoints". */
    static const char root[] = "<ListBucketResult";
    int found = 0;
    for (size_t i = 0; !found && len >= sizeof root - 1 && i <= len - (sizeof root - 1); i++)
        found = body[i] == '<' && !memcmp(body + i, root, sizeof root - 1);
    if (!found) {
        char head[81];
        size_t hl = len < 80 ? len : 80;
        for (size_t i = 0; i < hl; i++) head[i] = (body[i] >= 32 && body[i] < 127) ? body[i] : '.';
        head[hl] = 0;
        free(*token); /* as on every failure: no token to follow */
        *token = NULL;
        return sy_err_set(SY_EREMOTE, "s3 list %s: the reply is not a ListBucketResult (%zu bytes: '%s')", full, len,
                          head);
    }
    while (st == SY_OK && (k = sy_s3_xml_tag(p, left, "Key", &after))) {
        left -= (size_t)(after - p);
        p = after;
        if (strlen(k) < strip || strncmp(k, full, strlen(full))) { /* not under our prefix: skip */
            free(k);
            continue;
        }
        /* Only keys this store could have written: anything else (a '..' component, a blank,
         * a '?') would address another object once put into a URL, e.g. by delete_prefix. */
        if (!sy_store_key_valid(k + strip)) {
            sy_warn("s3 list %s: skipping object '%.200s': not a valid store key", full, k);
            free(k);
            continue;
        }
        if (*n == *cap) {
            size_t nc = *cap ? 2 * *cap : 256;
            char **nk = realloc(*keys, nc * sizeof *nk);
            if (!nk) {
                free(k);
                st = sy_err_set(SY_ENOMEM, "s3 list %s", full);
                break;
            }
            *keys = nk;
            *cap = nc;
        }
        memmove(k, k + strip, strlen(k + strip) + 1);
        (*keys)[(*n)++] = k;
    }
    char *trunc = sy_s3_xml_tag(body, len, "IsTruncated", NULL);
    char *prev = *token;
    *token = NULL;
    if (st == SY_OK && trunc && !strcmp(trunc, "true")) {
        *token = sy_s3_xml_tag(body, len, "NextContinuationToken", NULL);
        if (!*token || !(*token)[0])
            st = sy_err_set(SY_EREMOTE, "s3 list %s: truncated listing without NextContinuationToken", full);
        else if (prev && !strcmp(prev, *token)) /* the next page would be this one: no end */
            st = sy_err_set(SY_EREMOTE, "s3 list %s: the server repeated continuation token '%.100s'", full, *token);
        if (st != SY_OK) {
            free(*token);
            *token = NULL;
        }
    }
    free(prev);
    free(trunc);
    return st;
}

/* One ListObjectsV2 page: appends our keys (store prefix stripped) to keys/n; *token is
 * replaced by the next continuation token (NULL when this was the last page). */
static sy_status list_page(s3_store *s, const char *full, char **token, char ***keys, size_t *n, size_t *cap) {
    sy_status st = SY_OK;
    size_t strip = s->prefix[0] ? strlen(s->prefix) + 1 : 0;
    int raw = __atomic_load_n(&s->raw_slash, __ATOMIC_RELAXED);
    char *enc_prefix = aws_encode_q(full, raw), *enc_tok = *token ? aws_encode(*token) : NULL;
    char *q = NULL;
    if (enc_prefix && (!*token || enc_tok))
        q = *token ? xasprintf("continuation-token=%s&list-type=2&prefix=%s", enc_tok, enc_prefix)
                   : xasprintf("list-type=2&prefix=%s", enc_prefix);
    free(enc_prefix);
    free(enc_tok);
    if (!q) return sy_err_set(SY_ENOMEM, "s3 list %s", full);
    s3_req r = {.method = "GET", .key = NULL, .query = q, .want_body = 1};
    st = s3_do(s, &r, "list");
    if (st == SY_EREMOTE && !raw && strchr(full, '/') && strstr(sy_err_msg(), "SignatureDoesNotMatch")) {
        /* Some S3-compatible servers (moto behind werkzeug) verify the signature over a query
         * in which %2F was decoded: retry once with '/' unescaped and remember it. A real
         * credential problem fails again and is reported. */
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", sy_err_msg());
        free(q);
        req_free(&r);
        __atomic_store_n(&s->raw_slash, 1, __ATOMIC_RELAXED);
        st = list_page(s, full, token, keys, n, cap);
        if (st != SY_OK) {
            __atomic_store_n(&s->raw_slash, 0, __ATOMIC_RELAXED);
            if (strstr(sy_err_msg(), "SignatureDoesNotMatch")) sy_err_set(st, "%s", msg);
        }
        return st;
    }
    free(q);
    if (st != SY_OK) {
        req_free(&r);
        return sy_err_prefix(st, "prefix '%s'", full);
    }
    st = sy_s3_parse_list(r.buf ? r.buf : "", r.len, full, strip, keys, n, cap, token);
    req_free(&r);
    return st;
}

static sy_status s3_list(void *impl, const char *prefix, char ***keys_out, size_t *n_out) {
    s3_store *s = impl;
    sy_status st = SY_OK;
    char **keys = NULL, *token = NULL;
    size_t n = 0, cap = 0;
    char *full = xasprintf("%s%s%s", s->prefix, s->prefix[0] ? "/" : "", prefix);
    if (!full) return sy_err_set(SY_ENOMEM, "s3 list %s", prefix);
    do {
        st = list_page(s, full, &token, &keys, &n, &cap);
    } while (st == SY_OK && token);
    free(token);
    free(full);
    if (st != SY_OK) {
        sy_store_keys_free(keys, n);
        return st;
    }
    *keys_out = keys;
    *n_out = n;
    return SY_OK;
}

static sy_status s3_del(void *impl, const char *key) {
    s3_req r = {.method = "DELETE", .key = key};
    sy_status st = s3_do(impl, &r, "delete");
    if (st == SY_ENOTFOUND && !strstr(sy_err_msg(), "NoSuchBucket")) {
        sy_err_clear();
        return SY_OK;
    }
    return st;
}

static void s3_destroy(void *impl) {
    s3_store *s = impl;
    if (!s) return;
    for (int i = 0; i < s->pool_n; i++) curl_easy_cleanup(s->pool[i]);
    if (s->share) curl_share_cleanup(s->share);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++) pthread_mutex_destroy(&s->share_lock[i]);
    pthread_mutex_destroy(&s->pool_lock);
    free(s->bucket);
    free(s->prefix);
    free(s->base);
    free(s->userpwd);
    free(s->token);
    free(s->sigv4);
    free(s->url);
    free(s);
}

static const sy_store_ops s3_ops = {
    .put = s3_put,
    .get = s3_get,
    .get_range = s3_get_range,
    .get_range_obj = s3_get_range_obj,
    .head = s3_head,
    .list = s3_list,
    .del = s3_del,
    .destroy = s3_destroy,
};

/* ---------------------------------------------------------------- open */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static int bucket_ok(const char *b, size_t n) {
    if (n < 3 || n > 63) return 0;
    for (size_t i = 0; i < n; i++)
        if (!((b[i] >= 'a' && b[i] <= 'z') || (b[i] >= '0' && b[i] <= '9') || b[i] == '-' || b[i] == '.' ||
              b[i] == '_'))
            return 0;
    return 1;
}

static const char *env_or(const char *v, const char *name) {
    if (v && v[0]) return v;
    const char *e = getenv(name);
    return e && e[0] ? e : NULL;
}

sy_status sy_store_s3_open(const char *url, const sy_s3_options *opts, sy_store_t **out) {
    if (!out) return sy_err_set(SY_EINVAL, "store open: no output pointer");
    *out = NULL;
    if (!url || strncmp(url, "s3://", 5)) return sy_err_set(SY_EINVAL, "store %s: not an s3:// URL", url ? url : "");
    sy_s3_options o;
    if (opts)
        o = *opts;
    else
        sy_s3_options_default(&o);
    if (o.max_attempts < 1) o.max_attempts = 1;
    if (o.parallel < 1) o.parallel = 1;
    if (o.timeout_ms < 1) o.timeout_ms = 1;
    if (o.connect_timeout_ms < 1) o.connect_timeout_ms = 1;
    if (o.backoff_cap_ms < 0) o.backoff_cap_ms = 0;
    if (o.backoff_base_ms < 0) o.backoff_base_ms = 0;

    const char *b = url + 5, *slash = strchr(b, '/');
    size_t bl = slash ? (size_t)(slash - b) : strlen(b);
    if (!bucket_ok(b, bl))
        return sy_err_set(SY_EINVAL, "store %s: invalid bucket name '%.*s' (3-63 of [a-z0-9.-])", url, (int)bl, b);
    const char *pre = slash ? slash + 1 : "";
    size_t pl = strlen(pre);
    while (pl > 0 && pre[pl - 1] == '/') pl--;
    char prefix[1024];
    if (pl >= sizeof prefix) return sy_err_set(SY_EINVAL, "store %s: prefix too long", url);
    memcpy(prefix, pre, pl);
    prefix[pl] = 0;
    if (pl && !sy_store_key_valid(prefix))
        return sy_err_set(SY_EINVAL, "store %s: invalid prefix '%s' (allowed: [A-Za-z0-9._/-])", url, prefix);

    const char *key_id = getenv("AWS_ACCESS_KEY_ID"), *secret = getenv("AWS_SECRET_ACCESS_KEY");
    if (!key_id || !key_id[0]) return sy_err_set(SY_EINVAL, "store %s: AWS_ACCESS_KEY_ID is not set", url);
    if (!secret || !secret[0]) return sy_err_set(SY_EINVAL, "store %s: AWS_SECRET_ACCESS_KEY is not set", url);
    const char *token = getenv("AWS_SESSION_TOKEN");
    const char *region = env_or(o.region, "AWS_REGION");
    if (!region) region = env_or(NULL, "AWS_DEFAULT_REGION");
    if (!region) region = "us-east-1";
    for (const char *c = region; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '-'))
            return sy_err_set(SY_EINVAL, "store %s: invalid region '%s'", url, region);
    const char *endpoint = env_or(o.endpoint, "AWS_ENDPOINT_URL");

    pthread_once(&curl_once, curl_init_once);
    s3_store *s = calloc(1, sizeof *s);
    if (!s) return sy_err_set(SY_ENOMEM, "store %s", url);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++) pthread_mutex_init(&s->share_lock[i], NULL);
    pthread_mutex_init(&s->pool_lock, NULL);
    s->o = o;
    s->bucket = strndup(b, bl);
    s->prefix = strdup(prefix);
    s->userpwd = xasprintf("%s:%s", key_id, secret);
    s->token = token && token[0] ? xstrdup(token) : NULL;
    s->sigv4 = xasprintf("aws:amz:%s:s3", region);
    s->url = strdup(url);
    int path_style = o.addressing == SY_S3_ADDR_PATH || (o.addressing == SY_S3_ADDR_AUTO && endpoint);
    if (endpoint) {
        const char *sep = strstr(endpoint, "://");
        if (!sep || (strncmp(endpoint, "http://", 7) && strncmp(endpoint, "https://", 8))) {
            s3_destroy(s);
            return sy_err_set(SY_EINVAL, "store %s: endpoint '%s' is not an http:// or https:// URL", url, endpoint);
        }
        size_t el = strlen(endpoint);
        while (el > 0 && endpoint[el - 1] == '/') el--;
        if (path_style)
            s->base = xasprintf("%.*s/%.*s", (int)el, endpoint, (int)bl, b);
        else
            s->base = xasprintf("%.*s%.*s.%.*s", (int)(sep + 3 - endpoint), endpoint, (int)bl, b,
                                (int)(el - (size_t)(sep + 3 - endpoint)), sep + 3);
    } else if (path_style) {
        s->base = xasprintf("https://s3.%s.amazonaws.com/%.*s", region, (int)bl, b);
    } else {
        s->base = xasprintf("https://%.*s.s3.%s.amazonaws.com", (int)bl, b, region);
    }
    s->share = curl_share_init();
    if (!s->bucket || !s->prefix || !s->userpwd || !s->sigv4 || !s->url || !s->base || !s->share ||
        (token && token[0] && !s->token)) {
        s3_destroy(s);
        return sy_err_set(SY_ENOMEM, "store %s", url);
    }
    curl_share_setopt(s->share, CURLSHOPT_LOCKFUNC, share_lock);
    curl_share_setopt(s->share, CURLSHOPT_UNLOCKFUNC, share_unlock);
    curl_share_setopt(s->share, CURLSHOPT_USERDATA, s);
    curl_share_setopt(s->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS);
    curl_share_setopt(s->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION);
    return sy_store_wrap(&s3_ops, s, url, out);
}

/* The opener's entry (store_open.c): cfg, when given, supplies the checkpoint.s3_* fields. */
static sy_status s3_open_url(const char *url, const sy_config_t *cfg, sy_store_t **out) {
    if (!cfg) return sy_store_s3_open(url, NULL, out);
    sy_s3_options o;
    sy_s3_options_default(&o);
    o.endpoint = cfg->checkpoint.s3_endpoint;
    o.region = cfg->checkpoint.s3_region;
    o.addressing = cfg->checkpoint.s3_addressing;
    o.multipart_threshold = (uint64_t)cfg->checkpoint.s3_multipart_mb * MIB;
    o.part_size = (uint64_t)cfg->checkpoint.s3_part_mb * MIB;
    o.parallel = cfg->checkpoint.s3_parallel;
    o.timeout_ms = cfg->checkpoint.s3_timeout_ms;
    o.max_attempts = cfg->checkpoint.s3_retries;
    /* Backoff scales down with short timeouts (tests), capped at the AWS 20 s. */
    if (o.timeout_ms < 1000) o.backoff_base_ms = o.timeout_ms / 10;
    return sy_store_s3_open(url, &o, out);
}

const sy_store_backend sy_store_s3_backend = {.scheme = "s3://", .open = s3_open_url};
