#!/usr/bin/env python3
"""SHA-256 of every tensor's bytes in a GGUF, and one digest over all of them (in name order).

`python scripts/tensor_hashes.py A.gguf [B.gguf]`: with two files, says whether their tensors are
bit-identical (metadata may differ: the tool version, the config) and lists the tensors that are not.
Used to check that a restructuring leaves the default conversion's tensors unchanged.
"""

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gqsa_gguf.gguf_io import read_gguf  # noqa: E402


def tensor_hashes(path) -> dict[str, str]:
    g = read_gguf(path)
    return {name: hashlib.sha256(g.tensor_bytes(name).tobytes()).hexdigest() for name in sorted(g.tensors)}


def digest(hashes: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n}:{h}\n" for n, h in hashes.items()).encode()).hexdigest()


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    all_h = [tensor_hashes(p) for p in argv]
    for p, h in zip(argv, all_h):
        print(f"{p}: {len(h)} tensors, digest {digest(h)}")
    if len(all_h) == 2:
        a, b = all_h
        diff = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
        print("tensors bit-identical" if not diff else f"{len(diff)} tensors differ: {diff[:10]}")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
