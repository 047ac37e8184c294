#!/usr/bin/env python3
"""S3 store throughput against moto_server on loopback, next to the curl command line doing the
same transfer in the same run.

For each size (default: a 10 MiB tiny-model checkpoint file and a 512 MiB object) it measures,
best of --reps runs:
  sy put      sy_storecli put (the store: multipart above 64 MiB, 16 MiB parts, 4 in parallel)
  sy put 1    the same as one PutObject (threshold raised), the like-for-like of curl
  sy get      sy_storecli get (one GET into memory, length-checked)
  curl put    curl -T FILE --aws-sigv4 (one PutObject)
  curl get    curl --aws-sigv4 -o /dev/null
Timings of sy_storecli cover the store call only (not reading/writing the local file); curl's
are its %{time_total}. Objects and temp files are deleted as it goes.

Usage: /usr/bin/python3 bench/s3_bench.py [--build build] [--sizes-mib 10,512] [--reps 3]
       [--write-doc docs/performance.md]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "py"))
from s3util import Moto  # noqa: E402

SECTION = "## Object store (S3 on moto)"


def sy(cli, env, *args):
    r = subprocess.run([cli, "--time", *args], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError("sy_storecli %s: %s" % (" ".join(args), r.stderr.strip()))
    return float(r.stdout.split()[0])


def curl(m, method, key, *extra):
    cmd = ["curl", "-sS", "-f", "-X", method, "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
           "%s:%s" % (m.key_id, m.secret), "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
           "-w", "%{time_total}", *extra, "%s/bench/%s" % (m.endpoint, key)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError("curl %s %s: %s" % (method, key, r.stderr.strip()))
    return float(r.stdout.strip().split()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=os.environ.get("SY_BUILD", "build"))
    ap.add_argument("--sizes-mib", default="10,512")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write-doc", default="")
    a = ap.parse_args()
    cli = os.path.join(a.build, "tests", "sy_storecli")
    tmp = tempfile.mkdtemp(prefix="sy-s3bench-")
    rows = []
    with Moto(auth=True, log=os.path.join(tmp, "moto.log")) as m:
        m.make_bucket("bench")
        env = m.env()
        url = "s3://bench"
        for mib in [int(x) for x in a.sizes_mib.split(",")]:
            size = mib * 1024 * 1024
            src, out = os.path.join(tmp, "obj"), os.path.join(tmp, "out")
            with open(src, "wb") as f:
                for _ in range(mib):
                    f.write(os.urandom(1024 * 1024))
            t = {k: [] for k in ["sy put", "sy put 1", "sy get", "curl put", "curl get"]}
            for _ in range(a.reps):
                t["sy put"].append(sy(cli, env, url, "put", src, "o"))
                t["sy get"].append(sy(cli, env, url, "get", "o", out))
                with open(out, "rb") as f1, open(src, "rb") as f2:
                    if f1.read() != f2.read():
                        raise RuntimeError("read-back differs")
                os.unlink(out)
                sy(cli, env, url, "rm", "o")
                t["sy put 1"].append(sy(cli, env, "--multipart-mb", "100000", url, "put", src, "o"))
                sy(cli, env, url, "rm", "o")
                t["curl put"].append(curl(m, "PUT", "o", "-T", src, "-H", "Content-Type: application/octet-stream"))
                t["curl get"].append(curl(m, "GET", "o", "-o", "/dev/null"))
                sy(cli, env, url, "rm", "o")
            os.unlink(src)
            mbs = {k: size / 1e6 / min(v) for k, v in t.items()}
            rows.append((mib, mbs))
            print("%5d MiB: " % mib + "  ".join("%s %.0f MB/s" % (k, v) for k, v in mbs.items()), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    lines = [SECTION, "",
             "`bench/s3_bench.py` (%s, best of %d): the store's `sy_storecli put/get` against moto_server %s "
             "(SigV4 checked) on 127.0.0.1, and the curl %s command line (`--aws-sigv4`, one PutObject / GET) on "
             "the same bytes in the same run, on the shared 2-core development VM (expect ±30 %% between runs). "
             "MB = 10^6 bytes." % (time.strftime("%Y-%m-%d"), a.reps,
                                                                     moto_version(), curl_version()),
             "",
             "| object | sy put (multipart ≥ 64 MiB) | sy put (single PUT) | curl PUT | put ratio (single / curl) "
             "| sy get | curl GET | get ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for mib, r in rows:
        lines.append("| %d MiB | %.0f MB/s | %.0f MB/s | %.0f MB/s | %.2f | %.0f MB/s | %.0f MB/s | %.2f |" % (
            mib, r["sy put"], r["sy put 1"], r["curl put"], r["sy put 1"] / r["curl put"], r["sy get"],
            r["curl get"], r["sy get"] / r["curl get"]))
    lines += ["",
              "Objects under the 64 MiB multipart threshold take the single-PUT path in both put columns (their "
              "difference is run-to-run noise). moto, a Python server, is the bottleneck on loopback, so these "
              "figures compare client overheads, not S3 bandwidth; it is also slow at multipart (it buffers parts "
              "and reassembles them on CompleteMultipartUpload; with 4 parts in flight it is slower than with 1), "
              "which real S3 serves in parallel. `sy get` delivers the object into freshly allocated memory "
              "(first-touch page faults, huge-page advised), curl writes to /dev/null.", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write_doc:
        write_section(a.write_doc, text)
    return 0


def moto_version():
    for py in ["/root/.pyenv/shims/python3", "python3"]:
        r = subprocess.run([py, "-c", "import moto; print(moto.__version__)"], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.strip()
    return "?"


def curl_version():
    return subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split()[1]


def write_section(path, text):
    """Replaces this benchmark's section of the file (or appends it); other sections stay."""
    old = open(path).read() if os.path.exists(path) else "# Performance\n"
    if SECTION in old:
        a = old.index(SECTION)
        b = old.find("\n## ", a + len(SECTION))
        new = old[:a] + text + (old[b + 1:] if b >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


if __name__ == "__main__":
    sys.exit(main())
