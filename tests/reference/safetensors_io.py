"""A strict, minimal safetensors reader/writer (json + struct + torch.frombuffer).

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian u64 N, then N bytes of
UTF-8 JSON, an object mapping tensor name -> {"dtype", "shape", "data_offsets": [begin, end]}
(offsets relative to the start of the data section) plus an optional "__metadata__" object of
string -> string; then the data section, row-major little-endian.

"Strict" here means every defect is an error naming the file and the tensor: truncated header,
non-object JSON, duplicate names, unknown dtype, bad shape, size that does not match
dtype x shape, offsets out of bounds, overlapping tensors, holes in the data section, and bytes
after the last tensor.
"""
import json
import math
import struct

import torch

DTYPES = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
_NAME_OF = {v[0]: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


def _no_dup_object(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise SafetensorsError("duplicate key %r in header" % k)
        d[k] = v
    return d


def loads(buf, where="<bytes>"):
    """Parses safetensors bytes; returns (dict name -> tensor (a copy), metadata dict)."""
    buf = bytes(buf)
    if len(buf) < 8:
        raise SafetensorsError("%s: %d bytes, shorter than the 8-byte header length" % (where, len(buf)))
    (n,) = struct.unpack("<Q", buf[:8])
    if n > MAX_HEADER or 8 + n > len(buf):
        raise SafetensorsError("%s: header length %d exceeds the file (%d bytes)" % (where, n, len(buf)))
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"), object_pairs_hook=_no_dup_object)
    except SafetensorsError as e:
        raise SafetensorsError("%s: %s" % (where, e))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError("%s: header is not valid JSON: %s" % (where, e))
    if not isinstance(header, dict):
        raise SafetensorsError("%s: header is not a JSON object" % where)
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise SafetensorsError("%s: __metadata__ must map strings to strings" % where)
    data = memoryview(buf)[8 + n:]
    spans = []
    out = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError("%s: tensor %r: entry must have exactly dtype, shape, data_offsets" % (where, name))
        dt = info["dtype"]
        if dt not in DTYPES:
            raise SafetensorsError("%s: tensor %r: unknown dtype %r" % (where, name, dt))
        shape = info["shape"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise SafetensorsError("%s: tensor %r: bad shape %r" % (where, name, shape))
        off = info["data_offsets"]
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in off)
                or off[0] < 0 or off[1] < off[0] or off[1] > len(data)):
            raise SafetensorsError("%s: tensor %r: data_offsets %r outside the data section (%d bytes)"
                                   % (where, name, off, len(data)))
        tdtype, esize = DTYPES[dt]
        numel = math.prod(shape)
        if off[1] - off[0] != numel * esize:
            raise SafetensorsError("%s: tensor %r: %d bytes for %s %r (expected %d)"
                                   % (where, name, off[1] - off[0], dt, shape, numel * esize))
        spans.append((off[0], off[1], name))
        raw = bytes(data[off[0]:off[1]])
        if numel == 0:
            t = torch.empty(shape, dtype=tdtype)
        else:
            t = torch.frombuffer(bytearray(raw), dtype=tdtype).reshape(shape).clone()
        out[name] = t
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else "leaves a hole before it"
            raise SafetensorsError("%s: tensor %r at offset %d %s (expected %d)" % (where, name, b, what, pos))
        pos = e
    if pos != len(data):
        raise SafetensorsError("%s: %d trailing bytes after the last tensor" % (where, len(data) - pos))
    return out, meta


def load_file(path):
    """Reads a safetensors file; returns (dict name -> tensor, metadata dict)."""
    with open(path, "rb") as f:
        return loads(f.read(), where=path)


def dumps(tensors, metadata=None):
    """Serialises dict name -> tensor (sorted by name, as the safetensors library does)."""
    header = {}
    blobs = []
    pos = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype not in _NAME_OF:
            raise SafetensorsError("tensor %r: unsupported dtype %s" % (name, t.dtype))
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        header[name] = {"dtype": _NAME_OF[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    return struct.pack("<Q", len(hj)) + hj + b"".join(blobs)


def save_file(tensors, path, metadata=None):
    with open(path, "wb") as f:
        f.write(dumps(tensors, metadata))
