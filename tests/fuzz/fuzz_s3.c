/* Fuzzes the parsers of S3 answers (src/storage/store_s3_internal.h): the first input byte picks
 * response header lines (one per '\n', each handed over in an exact-size buffer, as curl does:
 * not NUL-terminated), a ListObjectsV2 page, or an error / initiate-multipart body. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "storage/store.h"
#include "storage/store_s3_internal.h"

static volatile size_t sink;

static void headers(const uint8_t *data, size_t size) {
    long status = 0;
    int64_t clen = -1, total = -1;
    char etag[256] = "";
    size_t a = 0;
    while (a < size) {
        const uint8_t *nl = memchr(data + a, '\n', size - a);
        size_t b = nl ? (size_t)(nl - data) + 1 : size;
        char *line = malloc(b - a);
        if (!line) abort();
        memcpy(line, data + a, b - a);
        sy_s3_parse_header(line, b - a, &status, &clen, &total, etag);
        free(line);
        if (strlen(etag) > 255) abort();
        a = b;
    }
    sink += (size_t)status + (size_t)clen + (size_t)total;
}

static void list_page(const uint8_t *data, size_t size) {
    /* as list_page hands it over: the body, NUL-terminated after len */
    char *body = fz_str(data, size), **keys = NULL, *token = strdup("tok0");
    size_t n = 0, cap = 0;
    if (!body || !token) abort();
    sy_status st = sy_s3_parse_list(body, size, "pfx/run/", 4, &keys, &n, &cap, &token);
    for (size_t i = 0; i < n; i++)
        if (!sy_store_key_valid(keys[i]) || strncmp(keys[i], "run/", 4)) abort();
    if (st != SY_OK && token) abort();
    free(token);
    sy_store_keys_free(keys, n);
    free(body);
}

static void error_body(const uint8_t *data, size_t size) {
    static const char *const tags[] = {"Code", "Message", "UploadId", "Key", "ETag"};
    char *body = fz_str(data, size);
    if (!body) abort();
    for (size_t t = 0; t < sizeof tags / sizeof tags[0]; t++) {
        const char *after = NULL;
        char *v = sy_s3_xml_tag(body, size, tags[t], &after);
        if (v) {
            if (after < body || after > body + size) abort();
            sink += strlen(v);
        }
        free(v);
    }
    free(body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    fz_tmpdir();
    switch (data[0] % 3) {
    case 0: headers(data + 1, size - 1); break;
    case 1: list_page(data + 1, size - 1); break;
    default: error_body(data + 1, size - 1); break;
    }
    return 0;
}
