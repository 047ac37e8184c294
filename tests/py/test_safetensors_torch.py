"""Cross-check switchyard's safetensors files against PyTorch.

python3-safetensors is not installed, so the format is parsed here directly (json + struct +
torch.frombuffer) with the checks a strict reader makes. Expected values are recomputed from
their definitions in tests/tools/sy_stwrite.c; bf16 expectations come from torch's own
float32 -> bfloat16 conversion (round to nearest even). The reverse direction writes files from
torch tensors and reads them back through the C reader (sy_stwrite --read).
"""
import json
import os
import struct
import sys
import tempfile
import unittest

import torch

import sytest

TOOL = sytest.tool("sy_stwrite")

DTYPES = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2)}


def parse_strict(path):
    """Returns (ordered [(name, tensor)], metadata, header_len); raises AssertionError on any
    format violation."""
    with open(path, "rb") as f:
        raw = f.read()
    assert len(raw) >= 8, "file shorter than the length field"
    (n,) = struct.unpack("<Q", raw[:8])
    assert n <= 100_000_000, "header too large"
    assert 8 + n <= len(raw), "header past end"
    text = raw[8 : 8 + n].decode("utf-8")
    assert text.startswith("{"), "header is not an object"
    pairs = json.loads(text, object_pairs_hook=lambda p: p)
    names = [k for k, _ in pairs]
    assert len(names) == len(set(names)), "duplicate keys"
    data = raw[8 + n :]
    meta = None
    out, spans = [], []
    for name, v in pairs:
        v = dict(v)
        if name == "__metadata__":
            meta = v
            continue
        assert set(v) == {"dtype", "shape", "data_offsets"}, f"{name}: fields {sorted(v)}"
        assert v["dtype"] in DTYPES, f"{name}: dtype {v['dtype']}"
        dt, size = DTYPES[v["dtype"]]
        shape = v["shape"]
        assert all(isinstance(d, int) and d >= 0 for d in shape), f"{name}: shape {shape}"
        b, e = v["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        assert e - b == numel * size, f"{name}: span {e - b} != {numel} x {size}"
        spans.append((b, e, name))
        if numel:
            t = torch.frombuffer(bytearray(data[b:e]), dtype=dt).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dt)
        out.append((name, v["dtype"], t, b))
    pos = 0
    for b, e, name in sorted(spans):
        assert b == pos, f"{name}: gap or overlap at {b} (expected {pos})"
        pos = e
    assert pos == len(data), f"{len(data) - pos} trailing bytes"
    return out, meta, n


def expected_f32():
    a = (torch.arange(6, dtype=torch.float32) * 0.5 - 1.25).reshape(2, 3)
    b = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 0.1, -3.140625, 1e-3], dtype=torch.float32)
    c = torch.tensor(42.0, dtype=torch.float32)
    d = torch.tensor([((i * 7) % 11) / 8.0 - 0.6 for i in range(16)], dtype=torch.float32).reshape(2, 2, 4)
    e = torch.empty((0, 3), dtype=torch.float32)
    return [("a.weight", a), ("b.bias", b), ("c.scalar", c), ("d.three_d", d), ("e.empty", e)]


def write_torch(path, tensors, pad=True, extra_bytes=b""):
    """A plain safetensors writer used to feed the C reader."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    for name, t in tensors:
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs) + extra_bytes)


def bits(t):
    return t.contiguous().view(torch.int32).flatten().tolist() if t.numel() else []


class SafetensorsTorch(unittest.TestCase):
    def setUp(self):
        self.assertTrue(os.path.exists(TOOL), f"{TOOL} not built")
        self.dir = tempfile.TemporaryDirectory(prefix="sy-st-py-")

    def tearDown(self):
        self.dir.cleanup()

    def write(self, kind):
        path = os.path.join(self.dir.name, f"{kind}.safetensors")
        sytest.run([TOOL, path, kind], check=True)
        return path

    def check_file(self, kind, want_dtype):
        path = self.write(kind)
        tensors, meta, n = parse_strict(path)
        self.assertEqual(meta, {"format": "pt"})
        self.assertEqual(n % 8, 0, "data section not 8-aligned")
        exp = expected_f32()
        self.assertEqual([t[0] for t in tensors], [e[0] for e in exp], "names / order")
        for (name, dtype, got, begin), (_, want) in zip(tensors, exp):
            self.assertEqual(dtype, want_dtype, name)
            self.assertEqual(tuple(got.shape), tuple(want.shape), name)
            self.assertEqual((8 + n + begin) % DTYPES[dtype][1], 0, f"{name}: misaligned")
            ref = want if want_dtype == "F32" else want.to(torch.bfloat16)
            self.assertEqual(got.dtype, ref.dtype)
            self.assertEqual(
                got.view(torch.int16 if want_dtype == "BF16" else torch.int32).tolist(),
                ref.view(torch.int16 if want_dtype == "BF16" else torch.int32).tolist(),
                f"{name}: values differ",
            )
        return dict((t[0], t[2]) for t in tensors)

    def test_f32(self):
        self.check_file("f32", "F32")

    def test_bf16(self):
        t = self.check_file("bf16", "BF16")
        # ties to even, checked by hand: 1+2^-8 -> 1, 1+3*2^-8 -> 1+2^-6
        self.assertEqual(t["b.bias"][0].item(), 1.0)
        self.assertEqual(t["b.bias"][1].item(), 1 + 2**-6)

    def read_c(self, path):
        r = sytest.run([TOOL, "--read", path], capture_output=True, text=True)
        return r.returncode, r.stdout, r.stderr

    def test_c_reads_torch_files(self):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(3, 5, generator=g, dtype=torch.float32)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 65504.0])
        tensors = [
            ("x.f32", x),
            ("x.bf16", x.to(torch.bfloat16)),
            ("x.f16", (x * 1000).to(torch.float16)),
            ("s.bf16", specials.to(torch.bfloat16)),
            ("s.f16", specials.to(torch.float16)),
            ("z", torch.empty(0, 2)),
        ]
        path = os.path.join(self.dir.name, "torch.safetensors")
        write_torch(path, tensors)
        rc, out, err = self.read_c(path)
        self.assertEqual(rc, 0, err)
        rows = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["name"] for r in rows], [t[0] for t in tensors])
        for r, (name, t) in zip(rows, tensors):
            self.assertEqual(r["shape"], list(t.shape), name)
            want = t.float()
            got = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in r["bits"]], dtype=torch.int32).view(torch.float32)
            nan = torch.isnan(want.flatten())
            self.assertTrue(torch.equal(torch.isnan(got), nan), name)
            self.assertEqual(
                [b for b, m in zip(r["bits"], nan.tolist()) if not m],
                [b & 0xFFFFFFFF for b, m in zip(bits(want), nan.tolist()) if not m],
                name,
            )

    def test_c_rejects_bad_files(self):
        x = [("a", torch.ones(4))]
        cases = {
            "trailing": dict(extra_bytes=b"\0"),
        }
        # a truncated file
        cases_trunc = os.path.join(self.dir.name, "short.safetensors")
        write_torch(cases_trunc, x)
        with open(cases_trunc, "r+b") as f:
            f.truncate(os.path.getsize(cases_trunc) - 1)
        rc, _, err = self.read_c(cases_trunc)
        self.assertEqual(rc, 1)
        self.assertIn(cases_trunc, err)
        for label, kw in cases.items():
            path = os.path.join(self.dir.name, f"{label}.safetensors")
            write_torch(path, x, **kw)
            rc, _, err = self.read_c(path)
            self.assertEqual(rc, 1, label)
            self.assertIn(path, err, label)
        # an int64 tensor: the message names the dtype and the tensor
        path = os.path.join(self.dir.name, "i64.safetensors")
        h = json.dumps({"wte": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}).encode()
        h += b" " * (-len(h) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"\0" * 8)
        rc, _, err = self.read_c(path)
        self.assertEqual(rc, 1)
        self.assertIn("I64", err)
        self.assertIn("wte", err)

    def test_strict_parser_self_check(self):
        # the Python checker itself must reject what it should, or the tests above prove little
        path = os.path.join(self.dir.name, "bad.safetensors")
        write_torch(path, [("a", torch.ones(2))], extra_bytes=b"xx")
        with self.assertRaises(AssertionError):
            parse_strict(path)


if __name__ == "__main__":
    unittest.main(verbosity=2)
