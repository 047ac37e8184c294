"""Real clients of what switchyard writes (issue 13, item 4): the AWS SDK for Python (boto3) lists
and downloads a checkpoint that a run wrote to moto S3 and checks its MANIFEST.json (every file
named, with its size and SHA-256). moto runs with its SigV4 check off: with it on, moto answered
SignatureDoesNotMatch to boto3 1.44's ListObjectsV2 (path style, checksums when required; not
investigated further), while switchyard's own signed requests pass it (test_s3_store).
Hugging Face's safetensors package loads every checkpoint file
and the `ckpt export` outputs, in its numpy flavour (fp32 files: numpy has no bfloat16) and its
torch flavour (all of them), and the two flavours agree.

boto3 and safetensors come from PyPI, installed on demand into a temporary folder (pip --target,
without touching the system's packages); where they cannot be installed (no network) or moto is
missing, the test exits 77 (skipped), never 0."""
import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import faultutil as fu  # noqa: E402
import s3util  # noqa: E402
import sytest  # noqa: E402
from sytest import check, SY, CFG  # noqa: E402

BUCKET, PREFIX, RUN = "sy-clients", "ck", "clients"
STEPS, EVERY = 4, 2


def install(tmp):
    """boto3 and safetensors into tmp/py (numpy and torch are the system's); False if pip fails."""
    target = f"{tmp}/py"
    r = sytest.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--target", target, "boto3", "safetensors"], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        print("pip install boto3 safetensors failed:\n" + r.stderr[-1500:])
        return False
    # the system's numpy (torch is built against it), not a copy pip may have pulled in
    sys.path.append(target)
    return True


def main():
    if not s3util.find_moto():
        print("skipped: moto_server not found")
        return 77
    tmp = sytest.make_tmp("sy-clients-")
    try:
        if not install(tmp):
            print("skipped: boto3/safetensors could not be installed")
            return 77
        import boto3
        import numpy as np
        import safetensors.numpy
        import safetensors.torch
        import torch
        print(f"   boto3 {boto3.__version__}, safetensors {getattr(safetensors, '__version__', '?')}, "
              f"numpy {np.__version__}, torch {torch.__version__}", flush=True)
        with s3util.Moto(auth=False, log=f"{tmp}/moto.log") as moto:
            moto.make_bucket(BUCKET)
            env = moto.env()
            fu.prepare_data(tmp)
            store = f"s3://{BUCKET}/{PREFIX}"
            s = fu.settings(tmp, RUN, STEPS, EVERY, store=store)
            r = sytest.run([SY, "train", CFG, "--quiet"] + fu.set_args(s), capture_output=True, text=True,
                           timeout=600, env=env)
            if not check(r.returncode == 0, f"switchyard train to moto exits 0 ({r.returncode})"):
                print(r.stderr[-2000:])
                return 1
            from botocore.config import Config
            # path-style (the bucket is not a host name here); checksums only where S3 requires them
            # (boto3 >= 1.36 adds CRC32 checksums by default, which older S3 servers do not know)
            cfg = Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                         response_checksum_validation="when_required")
            s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", config=cfg,
                              aws_access_key_id=moto.key_id, aws_secret_access_key=moto.secret)
            keys = []
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/{RUN}/ckpt/"):
                keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
            steps = sorted({k.split("/ckpt/")[1].split("/")[0] for k, _ in keys})
            print(f"   boto3 lists {len(keys)} objects in {len(steps)} step folders: {steps}")
            check(f"step-{STEPS:09d}" in steps, f"boto3 lists the step-{STEPS} checkpoint")
            d = f"{tmp}/dl"
            os.makedirs(d, exist_ok=True)
            sizes = dict(keys)
            loaded = 0
            for step in steps:
                base = f"{PREFIX}/{RUN}/ckpt/{step}"
                if f"{base}/MANIFEST.json" not in sizes:
                    continue
                man = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{base}/MANIFEST.json")["Body"].read())
                files = man.get("files", [])
                check(bool(files), f"{step}: MANIFEST.json names its files ({len(files)})")
                for f in files:
                    key = f"{base}/{f['name']}"
                    path = f"{d}/{step}-{f['name']}"
                    s3.download_file(BUCKET, key, path)
                    data = open(path, "rb").read()
                    ok = check(len(data) == f["size"] == sizes.get(key),
                               f"{step}/{f['name']}: size {len(data)} = manifest {f['size']} = listing {sizes.get(key)}")
                    ok &= check(hashlib.sha256(data).hexdigest() == f["sha256"], f"{step}/{f['name']}: SHA-256 matches")
                    if f["name"].endswith(".safetensors") and ok:
                        loaded += load_both(path, f"{step}/{f['name']}", safetensors, np, torch)
            check(loaded > 0, f"safetensors loaded {loaded} checkpoint files")
            # the export, fp32 and bf16, read back from the same store
            for dtype in ("fp32", "bf16"):
                out = f"{tmp}/export-{dtype}.safetensors"
                r = sytest.run([SY, "ckpt", "export", f"{store}/{RUN}", "--out", out, "--dtype", dtype],
                               capture_output=True, text=True, timeout=300, env=env)
                if check(r.returncode == 0, f"ckpt export --dtype {dtype} exits 0 ({r.returncode}: {r.stderr[-300:]})"):
                    load_both(out, f"export {dtype}", safetensors, np, torch)
    finally:
        sytest.remove_tmp(tmp)
    print(f"{len(sytest.failures)} failure(s)")
    return 1 if sytest.failures else 0


def load_both(path, label, safetensors, np, torch):
    """Loads one file with safetensors.torch and (when it has no bf16 tensor) safetensors.numpy;
    checks that the two agree. 1 when it loaded."""
    try:
        tt = safetensors.torch.load_file(path)
    except Exception as e:  # noqa: BLE001 (the message is the point)
        check(False, f"{label}: safetensors.torch.load_file: {e}")
        return 0
    dtypes = sorted({str(t.dtype) for t in tt.values()})
    ok = check(len(tt) > 0 and all(torch.isfinite(t.float()).all() for t in tt.values()),
               f"{label}: torch flavour: {len(tt)} tensors ({', '.join(dtypes)}), all finite")
    if "torch.bfloat16" in dtypes:
        print(f"   {label}: bf16: numpy has no bfloat16, torch flavour only")
        return 1 if ok else 0
    try:
        nn = safetensors.numpy.load_file(path)
    except Exception as e:  # noqa: BLE001
        check(False, f"{label}: safetensors.numpy.load_file: {e}")
        return 0
    same = sorted(nn) == sorted(tt) and all(np.array_equal(nn[k], tt[k].numpy()) for k in nn)
    ok &= check(same, f"{label}: numpy flavour: the same {len(nn)} tensors, bit for bit")
    return 1 if ok else 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"total {time.time() - t0:.1f} s")
    sys.exit(rc)
