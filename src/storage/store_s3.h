/* The S3 backend of the object store (system spec §5, storage notes).
 *
 * URL `s3://bucket/prefix`: object keys become "prefix/key" in the bucket. Credentials from
 * AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN (sent as x-amz-security-token);
 * region from AWS_REGION (default us-east-1); endpoint from AWS_ENDPOINT_URL (default: AWS,
 * https://s3.<region>.amazonaws.com). Options (or the config's checkpoint.s3_* fields) override.
 * Addressing: path-style (`endpoint/bucket/key`) when an endpoint is given, virtual-hosted
 * (`bucket.host/key`) for AWS itself, unless forced.
 *
 * Requests go through libcurl's SigV4 signer (x-amz-content-sha256: UNSIGNED-PAYLOAD), reuse
 * connections (a pool of easy handles plus a share handle for DNS and TLS sessions), and are
 * bounded: a connect timeout and an idle timeout (no byte moved for timeout_ms aborts the
 * attempt). Retries follow the AWS SDKs' standard mode: 500/502/503/504, 429 and throttling
 * codes, connection errors, timeouts and truncated bodies, with full-jitter exponential backoff
 * (base, cap) and at most max_attempts attempts; other errors are final and name the HTTP
 * status, the S3 error code and the key. A GET that delivers fewer (or more) bytes than its
 * Content-Length or the requested range is never accepted.
 *
 * Objects of multipart_threshold bytes or more are written with a multipart upload: parts of
 * max(5 MiB, part_size, ceil(size / 10000)) bytes uploaded by `parallel` threads, each retried on
 * its own, completed in order (a 200 carrying an <Error> body is an error), aborted on failure.
 * put_if_absent sends If-None-Match: * (on PutObject or CompleteMultipartUpload): 412 is
 * SY_EEXIST, 409 is retried; when an earlier attempt's outcome was unknown (reply lost), a 412
 * is resolved by comparing the stored object with ours.
 *
 * Thread: one store may be used by several threads at once. */
#ifndef SY_STORE_S3_H
#define SY_STORE_S3_H

#include <stdint.h>

#include "base/config.h"
#include "base/status.h"
#include "storage/store.h"

typedef struct {
    const char *endpoint;         /* NULL/"": AWS_ENDPOINT_URL, else AWS */
    const char *region;           /* NULL/"": AWS_REGION, else us-east-1 */
    sy_s3_addressing addressing;  /* auto: path-style iff an endpoint is given */
    uint64_t multipart_threshold; /* bytes; objects this large or larger go multipart */
    uint64_t part_size;           /* bytes (raised to ≥ 5 MiB and ≥ size/10000) */
    int parallel;                 /* part upload threads */
    int connect_timeout_ms;
    int timeout_ms;               /* idle timeout: no progress for this long ends an attempt */
    int max_attempts;             /* attempts per request, first one included (≥ 1) */
    int backoff_base_ms;          /* full jitter: sleep U[0, min(cap, base * 2^attempt)] */
    int backoff_cap_ms;
} sy_s3_options;

/* Defaults: 64 MiB threshold, 16 MiB parts, 4 threads, connect 10 s, idle 60 s, 5 attempts,
 * backoff 100 ms .. 20 s. */
void sy_s3_options_default(sy_s3_options *o);

/* Opens `s3://bucket/prefix` with options (NULL: defaults). Missing credentials are SY_EINVAL
 * naming the variable. Nothing is sent to the server here. sy_store_open and
 * sy_store_open_config (store.h) come here for s3:// URLs; call this one directly only to pass
 * options no config holds (tests, tools). */
sy_status sy_store_s3_open(const char *url, const sy_s3_options *opts, sy_store_t **out);

#endif
