#include "cli/status_cli.h"

#include <curl/curl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/secret.h"
#include "storage/curl_check.h"

#define DEFAULT_URL "http://127.0.0.1:8080"
/* Whole request bound (s) and largest response accepted (bytes). */
#define TIMEOUT_S 5L
#define MAX_BODY (16u << 20)

typedef struct {
    char *buf;
    size_t len;
} body;

static size_t on_data(char *p, size_t sz, size_t n, void *ud) {
    body *b = ud;
    size_t k = sz * n;
    if (b->len + k > MAX_BODY) return 0;
    char *nb = realloc(b->buf, b->len + k + 1);
    if (!nb) return 0;
    memcpy(nb + b->len, p, k);
    b->buf = nb;
    b->len += k;
    b->buf[b->len] = 0;
    return k;
}

static void usage(FILE *f) {
    fprintf(f, "usage: switchyard status [--url URL] [--json] [--token-file FILE]\n"
               "\n"
               "Prints the state of a run from its coordinator's status server.\n"
               "  --url URL          the coordinator's status address (default " DEFAULT_URL ")\n"
               "  --json             print the raw /v1/status JSON\n"
               "  --token-file FILE  send the bearer token of FILE (one line, mode 0600), for a\n"
               "                     server that asks for it on GET too; else $" SY_STATUS_TOKEN_ENV "\n"
               "                     when set. Never give a token as an argument: ps shows it.\n");
}

static double num(const json_t *o, const char *k) {
    const json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : 0.0;
}

static const char *str(const json_t *o, const char *k) {
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : "-";
}

static void print_table(const json_t *s) {
    const json_t *loss = json_object_get(s, "loss"), *ck = json_object_get(s, "latest_checkpoint");
    char lossb[32] = "-", ckb[32] = "none";
    if (json_is_number(loss)) snprintf(lossb, sizeof lossb, "%.4f", json_number_value(loss));
    if (json_is_object(ck)) snprintf(ckb, sizeof ckb, "step %lld", (long long)num(ck, "step"));
    printf("run %s: %s | step %lld/%lld | loss %s | %.1fk tok/s | generation %lld | world %lld\n",
           str(s, "run"), str(s, "state"), (long long)num(s, "step"), (long long)num(s, "total_steps"), lossb,
           num(s, "tokens_per_second") / 1e3, (long long)num(s, "generation"), (long long)num(s, "world"));
    long long drops = 0;
    const char *k;
    json_t *v;
    json_object_foreach(json_object_get(s, "dropped_messages"), k, v) drops += json_integer_value(v);
    printf("checkpoint %s | recoveries %zu | dropped %.2f%% of tokens | goodput %.3f | %lld messages dropped\n", ckb,
           json_array_size(json_object_get(s, "recoveries")), 100.0 * num(s, "dropped_fraction"), num(s, "goodput"),
           drops);
    printf("\n%-24s %-16s %8s %5s %-9s %-10s %14s %8s %9s\n", "WORKER", "HOST", "PID", "RANK", "STATE", "ACTIVITY",
           "HEARTBEAT AGE", "STEP", "STEP MS");
    size_t i;
    json_t *w;
    json_array_foreach(json_object_get(s, "workers"), i, w) {
        char rank[16] = "-";
        if (num(w, "rank") >= 0) snprintf(rank, sizeof rank, "%d", (int)num(w, "rank"));
        printf("%-24s %-16s %8d %5s %-9s %-10s %12.0fms %8lld %9.1f\n", str(w, "id"), str(w, "host"), (int)num(w, "pid"),
               rank, str(w, "state"), str(w, "activity"), num(w, "last_heartbeat_ms"), (long long)num(w, "step"),
               num(w, "step_ms"));
    }
}

int sy_status_cli(int argc, char **argv) {
    const char *url = DEFAULT_URL, *token_file = NULL;
    int as_json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(argv[i], "--json")) {
            as_json = 1;
        } else if (!strcmp(argv[i], "--url") && i + 1 < argc) {
            url = argv[++i];
        } else if (!strcmp(argv[i], "--token-file") && i + 1 < argc) {
            token_file = argv[++i];
        } else {
            fprintf(stderr, "switchyard status: unknown argument '%s'\n", argv[i]);
            usage(stderr);
            return 2;
        }
    }
    char full[2048];
    size_t n = strlen(url);
    while (n && url[n - 1] == '/') n--;
    if (n == 0 || n > sizeof full - 16) {
        fprintf(stderr, "switchyard status: bad --url '%s'\n", url);
        return 2;
    }
    snprintf(full, sizeof full, "%.*s/v1/status", (int)n, url);

    char token[SY_SECRET_MAX + 1], auth[SY_SECRET_MAX + 32];
    if (sy_secret_status_token(NULL, token_file, token, sizeof token) != SY_OK) {
        fprintf(stderr, "switchyard status: %s\n", sy_err_msg());
        return 2;
    }
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", token);
    explicit_bzero(token, sizeof token);
    struct curl_slist *hdr = NULL;
    int code = 1;
    body b = {0};
    long http = 0;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURL *c = curl_easy_init();
    if (!c) {
        fprintf(stderr, "switchyard status: cannot initialise libcurl\n");
        goto out;
    }
    char err[CURL_ERROR_SIZE] = "";
    curl_easy_setopt(c, CURLOPT_URL, full);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, TIMEOUT_S);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, TIMEOUT_S);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, err);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (auth[22]) { /* a token: "Authorization: Bearer " is 22 characters */
        hdr = curl_slist_append(NULL, auth);
        curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    }
    CURLcode rc = curl_easy_perform(c);
    if (rc != CURLE_OK) { /* printed whole: the URL may be longer than a status message */
        fprintf(stderr, "switchyard status: cannot reach %s: %s\n", full, sy_curl_why(rc, err));
        goto out;
    }
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &http);
    if (http != 200) {
        fprintf(stderr, "switchyard status: %s answered HTTP %ld: %.200s\n", full, http, b.buf ? b.buf : "");
        goto out;
    }
    json_error_t je;
    json_t *s = json_loadb(b.buf ? b.buf : "", b.len, 0, &je);
    if (!json_is_object(s)) {
        fprintf(stderr, "switchyard status: %s did not answer a JSON object (%s)\n", full, je.text);
        json_decref(s);
        goto out;
    }
    if (as_json) {
        json_dumpf(s, stdout, JSON_INDENT(2));
        fputc('\n', stdout);
    } else {
        print_table(s);
    }
    json_decref(s);
    code = 0;
out:
    explicit_bzero(auth, sizeof auth);
    curl_slist_free_all(hdr);
    if (c) curl_easy_cleanup(c);
    curl_global_cleanup();
    free(b.buf);
    return code;
}
