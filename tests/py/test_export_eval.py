"""The exported file loads in the PyTorch reference of the model and gives the same eval loss.

Trains the small config for a few steps, exports the checkpoint with `switchyard ckpt export
--dtype fp32`, loads the file with the strict reader into tests/reference/model.py's SwitchLM
(float64, load_state_dict strict), and computes the mean cross-entropy over the windows that
`switchyard eval --checkpoint ... --data ... --batches N` uses (spec: the first N*b windows of
the val shards in order, windows of T+1 tokens starting at k*T, micro-batches of b, eval capacity
factor). The two must agree within 1e-5 relative. The bf16 export also loads and gives a loss
close to it (bf16 weights: within 2%)."""
import glob
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_ckpt_cli import make_data, run, small  # noqa: E402
import sytest  # noqa: E402
from sytest import SRC, CFG, check, failures  # noqa: E402

sys.path.insert(0, os.path.join(SRC, "tests", "reference"))
import safetensors_io  # noqa: E402
from model import RefConfig, SwitchLM  # noqa: E402

MAGIC = 20240520


def read_shard(path):
    """llm.c shard: 256 int32 header (magic, version, count), then uint16 tokens."""
    with open(path, "rb") as f:
        buf = f.read()
    head = struct.unpack("<256i", buf[:1024])
    if head[0] != MAGIC or head[1] != 1:
        raise ValueError(f"{path}: not an llm.c shard")
    n = head[2]
    toks = torch.frombuffer(bytearray(buf[1024:1024 + 2 * n]), dtype=torch.int16).to(torch.int64) & 0xFFFF
    return toks


def windows(paths, T):
    """Every window of T+1 tokens at k*T of each shard, shards in order."""
    out = []
    for p in paths:
        t = read_shard(p)
        for k in range((len(t) - 1) // T):
            out.append(t[k * T:k * T + T + 1])
    return torch.stack(out)


def ref_eval(model, cfg, wins, n_batches):
    b = cfg.micro_batch_seqs
    ce = 0.0
    with torch.no_grad():
        for i in range(n_batches):
            _, info = model.micro_loss(wins[i * b:(i + 1) * b], n_batches, eval_mode=True)
            ce += info["ce"]
    return ce


def main():
    tmp = sytest.make_tmp("sy-exporteval-")
    make_data(tmp)
    store = f"{tmp}/store"
    # a capacity factor low enough that eval drops tokens too (eval must use its own factor)
    r = run(["train", CFG] + small(tmp, "ev", store, steps=40, every=20,
                                   extra=["--set", "model.eval_capacity_factor=0.5"]))
    check(r.returncode == 0, f"train ({r.stderr[-300:]})")
    out32, out16 = f"{tmp}/ev32.safetensors", f"{tmp}/ev16.safetensors"
    r = run(["ckpt", "export", f"{store}/ev", "--out", out32, "--dtype", "fp32"])
    check(r.returncode == 0, f"export fp32 ({r.stderr.strip()})")
    r = run(["ckpt", "export", f"{store}/ev", "--out", out16])
    check(r.returncode == 0, f"export bf16 ({r.stderr.strip()})")
    man = json.load(open(f"{store}/ev/ckpt/step-000000040/MANIFEST.json"))
    cfg = RefConfig.from_dict(man["config"])
    check(cfg.eval_capacity_factor == 0.5, "the manifest's config carries the eval capacity factor")

    val = sorted(glob.glob(f"{tmp}/data/val_*.bin"))
    wins = windows(val, cfg.seq_len)
    N = min(6, len(wins) // cfg.micro_batch_seqs)
    r = run(["eval", "--checkpoint", f"{store}/ev", "--data", f"{tmp}/data/val_*.bin", "--batches", str(N)])
    check(r.returncode == 0, f"switchyard eval ({r.stderr[-300:]})")
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    check(ev["step"] == 40 and ev["tokens"] == N * cfg.micro_batch_seqs * cfg.seq_len, f"eval output {ev}")

    tensors, _ = safetensors_io.load_file(out32)
    model = SwitchLM(cfg, dtype=torch.float64)
    try:
        model.load_state_dict({k: v.to(torch.float64) for k, v in tensors.items()}, strict=True)
        loaded = True
    except Exception as ex:  # noqa: BLE001
        loaded = False
        print(ex)
    check(loaded, "the fp32 export loads into the reference SwitchLM (load_state_dict strict)")
    if loaded:
        ref = ref_eval(model, cfg, wins, N)
        rel = abs(ref - ev["ce"]) / abs(ref)
        # fp32 compute against fp64: ~1e-9 measured; 1e-6 leaves room for other CPUs' kernels and
        # is still below what the wrong capacity factor gives (checked next)
        check(rel < 1e-6, f"reference eval loss {ref:.8f} == switchyard eval {ev['ce']:.8f} (rel {rel:.2e})")
        # the eval capacity factor matters here: the training factor gives another loss
        cfg_train = RefConfig.from_dict(man["config"])
        cfg_train.eval_capacity_factor = cfg.capacity_factor
        model.cfg = cfg_train
        alt = ref_eval(model, cfg_train, wins, N)
        model.cfg = cfg
        check(abs(alt - ev["ce"]) / abs(alt) > 2e-6,
              f"the comparison is sensitive to the capacity factor (training factor gives {alt:.8f})")

        t16, _ = safetensors_io.load_file(out16)
        m16 = SwitchLM(cfg, dtype=torch.float64)
        m16.load_state_dict({k: v.to(torch.float64) for k, v in t16.items()}, strict=True)
        l16 = ref_eval(m16, cfg, wins, N)
        check(abs(l16 - ref) / ref < 0.02, f"the bf16 export gives a close loss ({l16:.5f} vs {ref:.5f})")

    sytest.remove_tmp(tmp)
    print(f"{len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
