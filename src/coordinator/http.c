#include "coordinator/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/clock.h"
#include "base/log.h"
#include "assets_internal.h"

/* Requests the reactor has not drained yet; more are refused with 503. */
#define SY_HTTP_QUEUE 64
/* Bodies of POST requests are ignored; larger ones are refused (413). */
#define SY_HTTP_MAX_BODY 65536
/* Workers per /v1/status page (default and largest workers_limit): about 220 bytes each, so a
 * page stays near 0.25 MB whatever the cluster's size. */
#define SY_HTTP_WORKERS_PAGE 1000
/* Seconds an idle connection is kept. */
#define SY_HTTP_CONN_TIMEOUT 10
/* Connections served at once (more are accepted and closed at once by libmicrohttpd), and per
 * client address: a crowd of idle or slow clients cannot starve the others (issue 16 #2). The
 * server runs on epoll, so descriptors above FD_SETSIZE (1024) are fine. */
#define SY_HTTP_MAX_CONNECTIONS 4096
#define SY_HTTP_MAX_PER_IP 256
/* Memory for one connection's request line, headers and read buffer: a larger request is
 * refused (431/413) by libmicrohttpd. */
#define SY_HTTP_CONN_MEMORY (64 * 1024)
/* Descriptors kept free for everything else (control connections, files, the store). */
#define SY_HTTP_FD_RESERVE 256
/* libmicrohttpd messages are logged at most once per this many ms. */
#define SY_HTTP_LOG_MS 5000
/* Largest certificate or key file read. */
#define SY_HTTP_PEM_MAX (1 << 20)
/* TLS 1.2 and 1.3 only (GnuTLS priority string). */
#define SY_HTTP_TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

struct sy_http {
    int64_t log_last;            /* under mu: the last libmicrohttpd message logged (mono ms) */
    unsigned long log_skipped;   /* under mu: messages since, not logged */
    char last_msg[256];          /* under mu: the last libmicrohttpd message (start errors) */
    struct MHD_Daemon *d;
    int port;
    char *token;
    bool auth_get;
    bool tls;
    char *cert_pem, *key_pem;    /* NUL-terminated file contents, kept while the daemon runs */
    size_t key_len;
    pthread_mutex_t mu;
    char *status_json;    /* the status object without its "workers" array ("{...}") */
    char **workers_json;  /* that array's elements, each a compact JSON object */
    size_t n_workers;
    char *metrics_text;
    char *history_json;
    sy_http_cmd q[SY_HTTP_QUEUE];
    int q_head, q_len;
};

typedef struct {
    size_t body;
} req_state;

/* The static files (assets_internal.h): path, bytes, length, content type. */
typedef struct {
    const char *path;
    const unsigned char *bytes;
    const size_t *len;
    const char *ctype;
} asset;

static const asset ASSETS[] = {
    {"/", sy_asset_dashboard_html, &sy_asset_dashboard_html_len, "text/html; charset=utf-8"},
    {"/dygraph.min.js", sy_asset_dygraph_js, &sy_asset_dygraph_js_len, "text/javascript; charset=utf-8"},
    {"/dygraph.min.css", sy_asset_dygraph_css, &sy_asset_dygraph_css_len, "text/css; charset=utf-8"},
};

static const asset *find_asset(const char *url) {
    for (size_t i = 0; i < sizeof ASSETS / sizeof ASSETS[0]; i++)
        if (!strcmp(url, ASSETS[i].path)) return &ASSETS[i];
    return NULL;
}

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned code, const char *ctype,
                             char *body_owned) {
    struct MHD_Response *r = MHD_create_response_from_buffer(strlen(body_owned), body_owned,
                                                             MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body_owned);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", ctype);
    MHD_add_response_header(r, "Cache-Control", "no-store");
    if (code == MHD_HTTP_UNAUTHORIZED) MHD_add_response_header(r, "WWW-Authenticate", "Bearer realm=\"switchyard\"");
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

/* A built-in file, served from the binary's own bytes (never freed, never copied). */
static enum MHD_Result reply_static(struct MHD_Connection *conn, const asset *as) {
    struct MHD_Response *r =
        MHD_create_response_from_buffer(*as->len, (void *)(uintptr_t)as->bytes, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", as->ctype);
    MHD_add_response_header(r, "Cache-Control", "no-cache");
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_OK, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply_json(struct MHD_Connection *conn, unsigned code, const char *fmt_key,
                                  const char *msg) {
    json_t *j = json_pack("{s:s}", fmt_key, msg);
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s) s = strdup("{}");
    if (!s) return MHD_NO;
    size_t n = strlen(s);
    char *t = realloc(s, n + 2);
    if (t) {
        t[n] = '\n';
        t[n + 1] = 0;
        s = t;
    }
    return reply(conn, code, "application/json", s);
}

/* A copy of a published document: 0 the status, 1 the metrics, 2 the history. */
static char *published(sy_http_t *h, int which) {
    pthread_mutex_lock(&h->mu);
    const char *src = which == 1 ? h->metrics_text : which == 2 ? h->history_json : h->status_json;
    char *s = strdup(src ? src : (which == 1 ? "" : "{}"));
    pthread_mutex_unlock(&h->mu);
    return s;
}

/* Constant-time comparison, so response timing does not reveal the token's prefix. */
static int token_equal(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b);
    unsigned char diff = (unsigned char)(na != nb);
    for (size_t i = 0; i < na; i++) diff |= (unsigned char)(a[i] ^ b[i % (nb ? nb : 1)]);
    return diff == 0;
}

/* 0 when authorised; otherwise the HTTP code of the refusal and its message. (A GET with
 * auth_get on never meets an empty token: sy_http_start refuses that.) */
static unsigned check_auth(sy_http_t *h, struct MHD_Connection *conn, const char **why) {
    if (!h->token || !h->token[0]) {
        *why = "mutating endpoints are disabled: give the coordinator a token (status.token_file, a 0600 "
               "file, or SY_STATUS_TOKEN in its environment) and send it as 'Authorization: Bearer <token>'";
        return MHD_HTTP_FORBIDDEN;
    }
    const char *auth = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    if (!auth || strncmp(auth, "Bearer ", 7) != 0) {
        *why = "missing 'Authorization: Bearer <status.token>' header";
        return MHD_HTTP_UNAUTHORIZED;
    }
    if (!token_equal(auth + 7, h->token)) {
        *why = "wrong bearer token";
        return MHD_HTTP_FORBIDDEN;
    }
    return 0;
}

static int enqueue(sy_http_t *h, sy_http_cmd_kind kind, const char *arg, uint32_t pid) {
    int ok = 0;
    pthread_mutex_lock(&h->mu);
    if (h->q_len < SY_HTTP_QUEUE) {
        sy_http_cmd *c = &h->q[(h->q_head + h->q_len) % SY_HTTP_QUEUE];
        c->kind = kind;
        snprintf(c->arg, sizeof c->arg, "%s", arg ? arg : "");
        c->pid = pid;
        h->q_len++;
        ok = 1;
    }
    pthread_mutex_unlock(&h->mu);
    return ok;
}

/* 1 if the last published status lists a worker with this id. */
static int worker_known(sy_http_t *h, const char *id) {
    int found = 0;
    pthread_mutex_lock(&h->mu);
    for (size_t i = 0; i < h->n_workers && !found; i++) {
        json_t *w = json_loads(h->workers_json[i], 0, NULL);
        const char *wid = json_string_value(json_object_get(w, "id"));
        found = wid && !strcmp(wid, id);
        json_decref(w);
    }
    pthread_mutex_unlock(&h->mu);
    return found;
}

/* A non-negative integer query argument (default `dflt` when absent): -1 when malformed. */
static long long query_count(struct MHD_Connection *conn, const char *name, long long dflt) {
    const char *v = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, name);
    if (!v) return dflt;
    char *end = NULL;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!v[0] || *end || errno || x < 0) return -1;
    return x;
}

/* GET /v1/status: the published object with one page of its "workers" array (query
 * workers_offset, default 0, and workers_limit, default and at most SY_HTTP_WORKERS_PAGE), plus
 * "workers_total" and "workers_offset". NULL (out of memory) or *bad set for a malformed query. */
static char *status_page(sy_http_t *h, struct MHD_Connection *conn, const char **bad) {
    long long off = query_count(conn, "workers_offset", 0),
              lim = query_count(conn, "workers_limit", SY_HTTP_WORKERS_PAGE);
    if (off < 0 || lim < 0 || lim > SY_HTTP_WORKERS_PAGE) {
        *bad = "workers_offset and workers_limit are integers >= 0, workers_limit at most 1000";
        return NULL;
    }
    pthread_mutex_lock(&h->mu);
    const char *head = h->status_json ? h->status_json : "{}";
    size_t hn = strlen(head), n = h->n_workers;
    size_t first = (size_t)off < n ? (size_t)off : n, last = first + (size_t)lim < n ? first + (size_t)lim : n;
    size_t need = hn + 96;
    for (size_t i = first; i < last; i++) need += strlen(h->workers_json[i]) + 1;
    char *out = malloc(need);
    if (out) {
        /* head is "{...}": drop its '}', append the page and the counts */
        size_t k = hn - 1;
        memcpy(out, head, k);
        k += (size_t)sprintf(out + k, "%s\"workers\":[", hn > 2 ? "," : "");
        for (size_t i = first; i < last; i++) {
            size_t e = strlen(h->workers_json[i]);
            if (i > first) out[k++] = ',';
            memcpy(out + k, h->workers_json[i], e);
            k += e;
        }
        sprintf(out + k, "],\"workers_total\":%zu,\"workers_offset\":%zu}", n, first);
    }
    pthread_mutex_unlock(&h->mu);
    return out;
}

/* "/v1/workers/{id}/{verb}": 1 with the id copied out; -1 for a bad id; 0 if url is not of
 * that form. */
static int worker_path(const char *url, const char *verb, char *id, size_t cap) {
    static const char pre[] = "/v1/workers/";
    size_t np = sizeof pre - 1, nv = strlen(verb), nu = strlen(url);
    if (strncmp(url, pre, np) != 0 || nu <= np + nv + 1 || url[nu - nv - 1] != '/' ||
        strcmp(url + nu - nv, verb) != 0)
        return 0;
    size_t n = nu - np - nv - 1;
    if (n == 0 || n >= cap) return -1;
    memcpy(id, url + np, n);
    id[n] = 0;
    return strchr(id, '/') ? 0 : 1;
}

static enum MHD_Result handle_post(sy_http_t *h, struct MHD_Connection *conn, const char *url) {
    sy_http_cmd_kind kind;
    char id[128] = "";
    uint32_t pid = 0;
    int wp;
    if (!strcmp(url, "/v1/checkpoint")) {
        kind = SY_HTTP_CMD_CHECKPOINT;
    } else if (!strcmp(url, "/v1/stop")) {
        kind = SY_HTTP_CMD_STOP;
    } else if ((wp = worker_path(url, "drain", id, sizeof id)) != 0) {
        if (wp < 0) return reply_json(conn, MHD_HTTP_BAD_REQUEST, "error", "bad worker id");
        kind = SY_HTTP_CMD_DRAIN;
    } else if ((wp = worker_path(url, "lost", id, sizeof id)) != 0) {
        if (wp < 0) return reply_json(conn, MHD_HTTP_BAD_REQUEST, "error", "bad worker id");
        kind = SY_HTTP_CMD_LOST;
    } else {
        return reply_json(conn, MHD_HTTP_NOT_FOUND, "error", "no such endpoint");
    }
    const char *why = NULL;
    unsigned code = check_auth(h, conn, &why);
    if (code) return reply_json(conn, code, "error", why);
    if (kind == SY_HTTP_CMD_LOST) {
        const char *ps = MHD_lookup_connection_value(conn, MHD_GET_ARGUMENT_KIND, "pid");
        if (ps) {
            char *end;
            errno = 0;
            unsigned long v = strtoul(ps, &end, 10);
            if (!*ps || *end || errno || v == 0 || v > UINT32_MAX || ps[0] == '-' || ps[0] == '+')
                return reply_json(conn, MHD_HTTP_BAD_REQUEST, "error", "pid: expected a positive integer");
            pid = (uint32_t)v;
        }
    }
    if ((kind == SY_HTTP_CMD_DRAIN || kind == SY_HTTP_CMD_LOST) && !worker_known(h, id)) {
        char msg[200];
        snprintf(msg, sizeof msg, "no worker with id '%s'", id);
        return reply_json(conn, MHD_HTTP_NOT_FOUND, "error", msg);
    }
    if (!enqueue(h, kind, id, pid))
        return reply_json(conn, MHD_HTTP_SERVICE_UNAVAILABLE, "error", "request queue full; retry");
    return reply_json(conn, MHD_HTTP_ACCEPTED, "status",
                      kind == SY_HTTP_CMD_CHECKPOINT ? "checkpoint requested"
                      : kind == SY_HTTP_CMD_STOP     ? "stop requested"
                      : kind == SY_HTTP_CMD_LOST     ? "loss reported"
                                                     : "drain requested");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
    (void)version;
    (void)upload;
    sy_http_t *h = cls;
    req_state *rs = *con_cls;
    if (!rs) { /* first call: headers only */
        rs = calloc(1, sizeof *rs);
        if (!rs) return MHD_NO;
        *con_cls = rs;
        return MHD_YES;
    }
    if (*upload_size) { /* body chunks: counted and ignored */
        rs->body += *upload_size;
        *upload_size = 0;
        return MHD_YES;
    }
    if (rs->body > SY_HTTP_MAX_BODY)
        return reply_json(conn, MHD_HTTP_CONTENT_TOO_LARGE, "error", "request body too large");
    const int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    const int post = !strcmp(method, "POST");
    const asset *as = find_asset(url);
    const int doc = !strcmp(url, "/metrics") ? 1 : !strcmp(url, "/v1/history") ? 2 : !strcmp(url, "/v1/status") ? 0 : -1;
    if (as || doc >= 0) {
        if (!get) return reply_json(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "error", "use GET");
        if (as) return reply_static(conn, as);
        if (h->auth_get) { /* the run's data; the built-in files above hold none */
            const char *why = NULL;
            unsigned code = check_auth(h, conn, &why);
            if (code) return reply_json(conn, code, "error", why);
        }
        const char *bad = NULL;
        char *s = doc == 0 ? status_page(h, conn, &bad) : published(h, doc);
        if (bad) return reply_json(conn, MHD_HTTP_BAD_REQUEST, "error", bad);
        if (!s) return MHD_NO;
        return reply(conn, MHD_HTTP_OK,
                     doc == 1 ? "text/plain; version=0.0.4; charset=utf-8" : "application/json", s);
    }
    if (post) return handle_post(h, conn, url);
    if (!strncmp(url, "/v1/", 4) && get &&
        (!strcmp(url, "/v1/checkpoint") || !strcmp(url, "/v1/stop") || strstr(url, "/drain") ||
         strstr(url, "/lost")))
        return reply_json(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "error", "use POST");
    return reply_json(conn, MHD_HTTP_NOT_FOUND, "error", "no such endpoint");
}

static void on_done(void *cls, struct MHD_Connection *conn, void **con_cls,
                    enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    (void)toe;
    free(*con_cls);
    *con_cls = NULL;
}

/* libmicrohttpd's messages (a refused connection over the limits, a timed-out client), at
 * most one line per SY_HTTP_LOG_MS: a flood of clients must not flood the log too. */
static void mhd_log(void *cls, const char *fmt, va_list ap) {
    sy_http_t *h = cls;
    int64_t now = sy_mono_ms();
    unsigned long skipped = 0;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    pthread_mutex_lock(&h->mu);
    snprintf(h->last_msg, sizeof h->last_msg, "%s", msg);
    bool quiet = h->log_last && now - h->log_last < SY_HTTP_LOG_MS;
    if (quiet) {
        h->log_skipped++;
    } else {
        skipped = h->log_skipped;
        h->log_skipped = 0;
        h->log_last = now;
    }
    pthread_mutex_unlock(&h->mu);
    if (quiet) return;
    if (skipped) sy_warn("http: %lu more message(s) not shown", skipped);
    sy_warn("http: %s", msg);
}

/* Reads a whole PEM file (NUL-terminated) into *out. `what` names the option in errors;
 * secret: refused unless only its owner can access it. */
static sy_status read_pem(const char *what, const char *path, bool secret, char **out, size_t *len) {
    *out = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) return sy_err_set(SY_EIO, "%s '%s': cannot open: %s", what, path, strerror(errno));
    struct stat st;
    sy_status s = SY_OK;
    if (fstat(fd, &st) != 0) {
        s = sy_err_set(SY_EIO, "%s '%s': %s", what, path, strerror(errno));
    } else if (!S_ISREG(st.st_mode)) {
        s = sy_err_set(SY_EINVAL, "%s '%s': not a regular file", what, path);
    } else if (secret && (st.st_mode & 077)) {
        s = sy_err_set(SY_EINVAL,
                       "%s '%s': permissions %04o are too open: a private key file must be accessible "
                       "by its owner only (chmod 600 %s)",
                       what, path, (unsigned)(st.st_mode & 07777), path);
    } else if (st.st_size <= 0 || st.st_size > SY_HTTP_PEM_MAX) {
        s = sy_err_set(SY_EFORMAT, "%s '%s': %lld bytes; expected a PEM file of 1 byte to %d bytes", what,
                       path, (long long)st.st_size, SY_HTTP_PEM_MAX);
    }
    char *buf = s == SY_OK ? malloc((size_t)st.st_size + 1) : NULL;
    if (s == SY_OK && !buf) s = sy_err_set(SY_ENOMEM, "out of memory");
    size_t got = 0;
    while (s == SY_OK && got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            s = sy_err_set(SY_EIO, "%s '%s': read: %s", what, path, r < 0 ? strerror(errno) : "file shrank");
            break;
        }
        got += (size_t)r;
    }
    close(fd);
    if (s != SY_OK) {
        if (buf) explicit_bzero(buf, (size_t)st.st_size + 1);
        free(buf);
        return s;
    }
    buf[got] = 0;
    *out = buf;
    *len = got;
    return SY_OK;
}

/* OpenSSL asks for the passphrase of an encrypted key: there is none (refused). */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
    (void)buf;
    (void)size;
    (void)rwflag;
    (void)u;
    return -1;
}

/* Checks what GnuTLS will be given, so that errors name the file at fault (libmicrohttpd only
 * says that the certificate/key setup failed): a PEM certificate, an unencrypted PEM private key,
 * and that the key belongs to the certificate. An expired certificate is only warned about. */
static sy_status check_tls_files(const sy_http_opts *o, const char *cert, size_t cert_len, const char *key,
                                 size_t key_len) {
    sy_status s = SY_OK;
    X509 *x = NULL;
    EVP_PKEY *pk = NULL;
    BIO *b = BIO_new_mem_buf(cert, (int)cert_len);
    x = b ? PEM_read_bio_X509(b, NULL, no_passphrase, NULL) : NULL;
    BIO_free(b);
    if (!x) {
        s = sy_err_set(SY_EFORMAT, "status.tls_cert '%s': no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')",
                       o->tls_cert);
        goto out;
    }
    b = BIO_new_mem_buf(key, (int)key_len);
    pk = b ? PEM_read_bio_PrivateKey(b, NULL, no_passphrase, NULL) : NULL;
    BIO_free(b);
    if (!pk) {
        s = sy_err_set(SY_EFORMAT,
                       "status.tls_key '%s': no unencrypted PEM private key in it (expected '-----BEGIN "
                       "PRIVATE KEY-----' or '-----BEGIN RSA/EC PRIVATE KEY-----'; an encrypted key is "
                       "not supported)",
                       o->tls_key);
        goto out;
    }
    if (X509_check_private_key(x, pk) != 1) {
        s = sy_err_set(SY_EINVAL, "status.tls_key '%s' is not the private key of the certificate in status.tls_cert '%s'",
                       o->tls_key, o->tls_cert);
        goto out;
    }
    if (X509_cmp_current_time(X509_get0_notAfter(x)) < 0)
        sy_warn("status.tls_cert '%s': the certificate has expired; clients will refuse it", o->tls_cert);
out:
    ERR_clear_error();
    EVP_PKEY_free(pk);
    X509_free(x);
    return s;
}

static void free_http(sy_http_t *h) {
    free(h->status_json);
    for (size_t i = 0; i < h->n_workers; i++) free(h->workers_json[i]);
    free(h->workers_json);
    free(h->metrics_text);
    free(h->history_json);
    if (h->token) explicit_bzero(h->token, strlen(h->token));
    free(h->token);
    free(h->cert_pem);
    if (h->key_pem) explicit_bzero(h->key_pem, h->key_len);
    free(h->key_pem);
    pthread_mutex_destroy(&h->mu);
    free(h);
}

sy_status sy_http_start(const char *addr, const sy_http_opts *opts, sy_http_t **out) {
    *out = NULL;
    static const sy_http_opts none = {0};
    const sy_http_opts *o = opts ? opts : &none;
    const bool has_cert = o->tls_cert && o->tls_cert[0], has_key = o->tls_key && o->tls_key[0];
    if (has_cert != has_key)
        return sy_err_set(SY_EINVAL, "status.tls_cert and status.tls_key go together: %s is set, %s is not",
                          has_cert ? "status.tls_cert" : "status.tls_key", has_cert ? "status.tls_key" : "status.tls_cert");
    if (o->auth_get && !(o->token && o->token[0]))
        return sy_err_set(SY_EINVAL, "status.auth_get is true but no status.token is set: GET requests "
                                     "would need a token no one has");
    if (has_cert && MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
        return sy_err_set(SY_EINVAL, "status.tls_cert is set but this libmicrohttpd was built without TLS "
                                     "(install one built with GnuTLS: Debian's libmicrohttpd12)");
    char host[256];
    const char *colon = addr ? strrchr(addr, ':') : NULL;
    if (!colon || colon == addr || (size_t)(colon - addr) >= sizeof host || !colon[1])
        return sy_err_set(SY_EINVAL, "status address '%s': expected host:port", addr ? addr : "");
    memcpy(host, addr, (size_t)(colon - addr));
    host[colon - addr] = 0;
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end || port < 0 || port > 65535)
        return sy_err_set(SY_EINVAL, "status address '%s': port must be 0..65535", addr);
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sin.sin_addr) != 1) {
        struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res = NULL;
        if (getaddrinfo(host, NULL, &hints, &res) != 0 || !res)
            return sy_err_set(SY_EINVAL, "status address '%s': cannot resolve host '%s'", addr, host);
        sin.sin_addr = ((struct sockaddr_in *)(void *)res->ai_addr)->sin_addr;
        freeaddrinfo(res);
    }
    sy_http_t *h = calloc(1, sizeof *h);
    if (!h) return sy_err_set(SY_ENOMEM, "out of memory");
    pthread_mutex_init(&h->mu, NULL);
    h->token = strdup(o->token ? o->token : "");
    h->auth_get = o->auth_get;
    if (!h->token) {
        free_http(h);
        return sy_err_set(SY_ENOMEM, "out of memory");
    }
    struct MHD_OptionItem tls_ops[4] = {{MHD_OPTION_END, 0, NULL}};
    if (has_cert) {
        size_t cert_len = 0;
        sy_status s = read_pem("status.tls_cert", o->tls_cert, false, &h->cert_pem, &cert_len);
        if (s == SY_OK) s = read_pem("status.tls_key", o->tls_key, true, &h->key_pem, &h->key_len);
        if (s == SY_OK) s = check_tls_files(o, h->cert_pem, cert_len, h->key_pem, h->key_len);
        if (s != SY_OK) {
            free_http(h);
            return s;
        }
        h->tls = true;
        tls_ops[0] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, h->cert_pem};
        tls_ops[1] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, h->key_pem};
        tls_ops[2] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)SY_HTTP_TLS_PRIORITIES};
        tls_ops[3] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    }
    /* epoll, not select (which fails for any descriptor >= 1024); never more connections than
     * the open-files limit leaves room for */
    unsigned max_conn = SY_HTTP_MAX_CONNECTIONS;
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        rlim_t room = rl.rlim_cur > 2 * SY_HTTP_FD_RESERVE ? rl.rlim_cur - SY_HTTP_FD_RESERVE : rl.rlim_cur / 2;
        if (room < max_conn) max_conn = room > 1 ? (unsigned)room : 1;
    }
    unsigned per_ip = SY_HTTP_MAX_PER_IP < max_conn ? SY_HTTP_MAX_PER_IP : max_conn;
    h->d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_USE_ERROR_LOG |
                                (h->tls ? MHD_USE_TLS : 0),
                            (uint16_t)port,
                            NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sin, MHD_OPTION_NOTIFY_COMPLETED,
                            on_done, h, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)SY_HTTP_CONN_TIMEOUT,
                            MHD_OPTION_CONNECTION_LIMIT, max_conn, MHD_OPTION_PER_IP_CONNECTION_LIMIT, per_ip,
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)SY_HTTP_CONN_MEMORY, MHD_OPTION_ARRAY,
                            tls_ops, MHD_OPTION_END);
    if (!h->d) {
        char why[sizeof h->last_msg];
        snprintf(why, sizeof why, "%s", h->last_msg);
        const bool tls = h->tls;
        free_http(h);
        if (tls && why[0] && !strstr(why, "bind") && !strstr(why, "listen"))
            return sy_err_set(SY_EINVAL, "status server on %s: TLS setup failed with status.tls_cert '%s' and "
                                         "status.tls_key '%s': %s", addr, o->tls_cert, o->tls_key, why);
        return sy_err_set(SY_EIO, "status server: cannot listen on %s (in use, or not a local address?)%s%s",
                          addr, why[0] ? ": " : "", why);
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? info->port : (int)port;
    if ((ntohl(sin.sin_addr.s_addr) >> 24) != 127) { /* reachable from other machines */
        if (!h->auth_get)
            sy_warn("status server on %s: GET /v1/status, /v1/history and /metrics are open to anyone who "
                    "reaches it (set status.auth_get: true and status.token)", addr);
        if (!h->tls)
            sy_warn("status server on %s: plain HTTP, the bearer token and the run's data cross the network "
                    "unencrypted (set status.tls_cert and status.tls_key)", addr);
    }
    *out = h;
    return SY_OK;
}

int sy_http_port(const sy_http_t *self) { return self ? self->port : 0; }

int sy_http_tls(const sy_http_t *self) { return self && self->tls; }

void sy_http_publish(sy_http_t *self, char *status_json, char **workers_json, size_t n_workers,
                     char *metrics_text) {
    pthread_mutex_lock(&self->mu);
    if (status_json) {
        free(self->status_json);
        self->status_json = status_json;
        for (size_t i = 0; i < self->n_workers; i++) free(self->workers_json[i]);
        free(self->workers_json);
        self->workers_json = workers_json;
        self->n_workers = n_workers;
    }
    if (metrics_text) {
        free(self->metrics_text);
        self->metrics_text = metrics_text;
    }
    pthread_mutex_unlock(&self->mu);
}

void sy_http_publish_history(sy_http_t *self, char *history_json) {
    if (!history_json) return;
    pthread_mutex_lock(&self->mu);
    free(self->history_json);
    self->history_json = history_json;
    pthread_mutex_unlock(&self->mu);
}

int sy_http_next_cmd(sy_http_t *self, sy_http_cmd *out) {
    int got = 0;
    pthread_mutex_lock(&self->mu);
    if (self->q_len > 0) {
        *out = self->q[self->q_head];
        self->q_head = (self->q_head + 1) % SY_HTTP_QUEUE;
        self->q_len--;
        got = 1;
    }
    pthread_mutex_unlock(&self->mu);
    return got;
}

void sy_http_destroy(sy_http_t **self_p) {
    if (!self_p || !*self_p) return;
    sy_http_t *h = *self_p;
    if (h->d) MHD_stop_daemon(h->d);
    free_http(h);
    *self_p = NULL;
}
