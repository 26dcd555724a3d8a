#!/usr/bin/env python3
"""Decode a DAI update payload with nothing but `zstandard` and `safetensors`.

Usage: decode_update.py FILE [--json]

The payload is zstd(safetensors), as published on MQTT optionally inside
the signed envelope "DAIU1" | Ed25519 signature (64 bytes) | payload (the
signature is the device's over domain, fleet, topic and payload; this tool
shows the payload and does not check the signature). Tensors are f32, f16, or int8 with a
`{name}.scale` (f32 per row: value = int8 * scale); or, with encoding
"topk8", sparse: `{name}.mask` (u8 bitmap over the flattened tensor, bit
i % 8 of byte i // 8), `{name}.values` (int8, the set entries in order) and
`{name}.scale` (one f32), with the dense shapes in metadata["shapes"]. Prints the metadata and
each tensor's shape and L2 norm; with --json, one JSON object with the
metadata and every tensor's values as f32 lists (what the Rust tests compare).
"""
import json
import struct
import sys


def decode(payload: bytes) -> tuple[dict, dict]:
    import numpy as np
    import zstandard
    from safetensors.numpy import load

    if payload[:5] == b"DAIU1" and len(payload) > 69:
        payload = payload[69:]
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    header_len = struct.unpack("<Q", raw[:8])[0]
    metadata = json.loads(raw[8 : 8 + header_len]).get("__metadata__", {})
    tensors = load(raw)
    out = {}
    if metadata.get("encoding") == "topk8":
        for name, shape in json.loads(metadata["shapes"]).items():
            n = int(np.prod(shape))
            mask = np.unpackbits(tensors[name + ".mask"], bitorder="little")[:n].astype(bool)
            dense = np.zeros(n, dtype=np.float32)
            dense[mask] = tensors[name + ".values"].astype(np.float32) * tensors[name + ".scale"][0]
            out[name] = dense.reshape(shape)
        return metadata, out
    for name, value in tensors.items():
        if name.endswith(".scale"):
            continue
        if value.dtype == np.int8:
            scale = tensors[name + ".scale"].astype(np.float32)
            rows = value.reshape(scale.shape[0], -1).astype(np.float32) * scale[:, None]
            value = rows.reshape(value.shape)
        out[name] = value.astype(np.float32)
    return metadata, out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        metadata, tensors = decode(f.read())
    if "--json" in argv:
        print(json.dumps({
            "metadata": metadata,
            "tensors": {k: {"shape": list(v.shape), "values": v.flatten().tolist()} for k, v in tensors.items()},
        }))
    else:
        print(json.dumps(metadata, indent=2, sort_keys=True))
        for name, v in sorted(tensors.items()):
            print(f"{name}: shape {list(v.shape)} norm {float((v.astype('float64') ** 2).sum() ** 0.5):.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
