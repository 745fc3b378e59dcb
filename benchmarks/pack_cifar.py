"""Carry a file larger than one device call allows: checksummed parts, verified and rejoined there.

    python benchmarks/pack_cifar.py pack cifar-10-python.tar.gz .gpu/cifar   # here: 3 parts
    python3 benchmarks/pack_cifar.py stash CARRY_DIR STAGE_DIR   # there, each call: keep parts
    python3 benchmarks/pack_cifar.py unpack STAGE_DIR /tmp/x/cifar-10-python.tar.gz   # there

The device tool carries at most 64 MiB a call (code and wheels included) and the CIFAR-10
python archive is about 163 MiB (the official one: 170,498,071 bytes), so ``pack`` cuts it into
the fewest equal byte ranges of at most ``--max-mib`` (60: three of about 54 MiB) and writes
``NAME.parts.json`` (size, sha256 and md5 of the whole; size and sha256 of each part) beside
``NAME.part1of3`` .. ``NAME.part3of3``. Nothing is re-encoded: the joined file
is the original, byte for byte, and ``unpack`` proves it (every part's sha256, then the whole's).
``stash`` verifies the parts one call carried and moves them to a folder that outlives the call
(the next call of a warm machine finds them there). Standard library only, so it runs on the
device before any wheel is installed; any file works, not only CIFAR. Errors are one line on
stderr (exit 1), naming the missing or corrupt part.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
from typing import Any

MiB = 1 << 20
CHUNK = 4 * MiB
FORMAT = 1


class PartsError(RuntimeError):
    """A part or manifest is missing, corrupt or from another packing; one line."""


def manifest_name(name: str) -> str:
    return f"{name}.parts.json"


def part_name(name: str, index: int, count: int) -> str:
    return f"{name}.part{index}of{count}"


def _digest(path: str, start: int = 0, size: int | None = None) -> tuple[str, str]:
    """(sha256, md5) of ``size`` bytes of ``path`` from ``start`` (all of it when None)."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        f.seek(start)
        left = os.fstat(f.fileno()).st_size - start if size is None else size
        while left > 0:
            block = f.read(min(CHUNK, left))
            if not block:
                raise PartsError(f"{path} ended {left} bytes early")
            sha.update(block)
            md5.update(block)
            left -= len(block)
    return sha.hexdigest(), md5.hexdigest()


def _copy_range(src: str, start: int, size: int, dst: str) -> None:
    tmp = dst + ".tmp"
    with open(src, "rb") as f, open(tmp, "wb") as out:
        f.seek(start)
        left = size
        while left > 0:
            block = f.read(min(CHUNK, left))
            out.write(block)
            left -= len(block)
    os.replace(tmp, dst)


def pack(path: str, out_dir: str, *, max_mib: float = 60, min_parts: int = 1) -> dict[str, Any]:
    """Writes the parts and the manifest of ``path`` into ``out_dir``; returns the manifest."""
    if not os.path.isfile(path):
        raise PartsError(f"{path} not found: nothing to pack")
    size = os.path.getsize(path)
    max_bytes = int(max_mib * MiB)
    if max_bytes <= 0 or min_parts < 1:
        raise PartsError(f"--max-mib={max_mib} and --min-parts={min_parts} must be positive")
    count = max(min_parts, math.ceil(size / max_bytes), 1)
    step = math.ceil(size / count) if size else 0
    name = os.path.basename(path)
    os.makedirs(out_dir, exist_ok=True)
    stale = re.compile(re.escape(name) + r"\.part\d+of\d+(\.tmp)?$")
    for old in os.listdir(out_dir):  # parts of an earlier packing must not be carried by mistake
        if stale.match(old):
            os.remove(os.path.join(out_dir, old))
    sha, md5 = _digest(path)
    parts = []
    for i in range(count):
        start = min(i * step, size)
        length = min(step, size - start)
        file = part_name(name, i + 1, count)
        _copy_range(path, start, length, os.path.join(out_dir, file))
        parts.append({"file": file, "size": length,
                      "sha256": _digest(os.path.join(out_dir, file))[0]})
    manifest = {"format": FORMAT, "name": name, "size": size, "sha256": sha, "md5": md5,
                "parts": parts}
    tmp = os.path.join(out_dir, manifest_name(name) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, manifest_name(name)))
    if _digest(path)[0] != sha:
        raise PartsError(f"{path} changed while it was packed; pack it again")
    return manifest


def read_manifest(folder: str, name: str | None = None) -> dict[str, Any]:
    """The manifest in ``folder`` (the only one, or ``name``'s)."""
    if name is None:
        found = sorted(f for f in os.listdir(folder) if f.endswith(".parts.json")) \
            if os.path.isdir(folder) else []
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(found)})"
            raise PartsError(f"{what} *.parts.json manifest in {folder}: carry the one that "
                             "`pack_cifar.py pack` wrote with the parts")
        path = os.path.join(folder, found[0])
    else:
        path = os.path.join(folder, manifest_name(name))
        if not os.path.isfile(path):
            raise PartsError(f"no manifest {path}: carry it with the parts")
    try:
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or not manifest["parts"]:
            raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT}")
        if not all({"file", "size", "sha256"} <= set(p) for p in manifest["parts"]):
            raise ValueError("a part without file, size or sha256")
    except (ValueError, KeyError, TypeError) as e:
        raise PartsError(f"manifest {path} is corrupt ({type(e).__name__}: {e}); pack again"
                         ) from e
    return manifest


def _check_part(folder: str, manifest: dict[str, Any], index: int) -> str | None:
    """None when part ``index`` (0-based) is in ``folder`` and intact, else why not."""
    p = manifest["parts"][index]
    count = len(manifest["parts"])
    path = os.path.join(folder, p["file"])
    label = f"part {index + 1} of {count} ({p['file']})"
    if not os.path.isfile(path):
        return f"missing {label}: not in {folder}"
    size = os.path.getsize(path)
    if size != p["size"]:
        return f"corrupt {label}: {size} bytes, the manifest says {p['size']}"
    sha = _digest(path)[0]
    if sha != p["sha256"]:
        return f"corrupt {label}: sha256 {sha[:16]}..., the manifest says {p['sha256'][:16]}..."
    return None


def _same_packing(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["name"], a["size"], a["sha256"], [p["sha256"] for p in a["parts"]]) == \
        (b["name"], b["size"], b["sha256"], [p["sha256"] for p in b["parts"]])


def stash(carry_dir: str, stage_dir: str) -> str:
    """Moves the intact parts found in ``carry_dir`` into ``stage_dir`` (with the manifest);
    returns a status line. A corrupt carried part is an error; a manifest of another packing
    replaces the staged one and its parts."""
    manifest = read_manifest(carry_dir)
    name = manifest["name"]
    os.makedirs(stage_dir, exist_ok=True)
    staged_path = os.path.join(stage_dir, manifest_name(name))
    if os.path.isfile(staged_path):
        staged = read_manifest(stage_dir, name)
        if not _same_packing(staged, manifest):  # another packing: its parts do not fit
            for p in staged["parts"]:
                if os.path.exists(os.path.join(stage_dir, p["file"])):
                    os.remove(os.path.join(stage_dir, p["file"]))
    shutil.copyfile(os.path.join(carry_dir, manifest_name(name)), staged_path + ".tmp")
    os.replace(staged_path + ".tmp", staged_path)
    brought = []
    for i, p in enumerate(manifest["parts"]):
        src = os.path.join(carry_dir, p["file"])
        if not os.path.exists(src):
            continue
        problem = _check_part(carry_dir, manifest, i)
        if problem:
            raise PartsError(f"{problem} (as carried); pack it again and re-carry it")
        dst = os.path.join(stage_dir, p["file"])
        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
        brought.append(i + 1)
    return status(stage_dir, name, brought=brought)


def status(stage_dir: str, name: str | None = None, *, brought: list[int] | None = None) -> str:
    """``NAME: parts 1, 2 of 3 staged (this call: 2); missing: 3`` (sizes checked, not hashes)."""
    manifest = read_manifest(stage_dir, name)
    count = len(manifest["parts"])
    have, missing = [], []
    for i, p in enumerate(manifest["parts"]):
        path = os.path.join(stage_dir, p["file"])
        ok = os.path.isfile(path) and os.path.getsize(path) == p["size"]
        (have if ok else missing).append(str(i + 1))
    line = f"{manifest['name']}: parts {', '.join(have) or 'none'} of {count} staged"
    if brought is not None:
        line += f" (this call: {', '.join(map(str, brought)) or 'none'})"
    return line + (f"; missing: {', '.join(missing)}" if missing else "; complete")


def unpack(stage_dir: str, dest: str) -> dict[str, Any]:
    """Verifies every part, joins them into ``dest`` and verifies the whole; returns the
    manifest. A ``dest`` that already holds the verified file is kept."""
    manifest = read_manifest(stage_dir)
    if os.path.isfile(dest) and os.path.getsize(dest) == manifest["size"] \
            and _digest(dest)[0] == manifest["sha256"]:
        return manifest
    problems = [p for i in range(len(manifest["parts"]))
                if (p := _check_part(stage_dir, manifest, i))]
    if problems:
        raise PartsError("; ".join(problems))
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = dest + ".tmp"
    with open(tmp, "wb") as out:
        for p in manifest["parts"]:
            with open(os.path.join(stage_dir, p["file"]), "rb") as f:
                shutil.copyfileobj(f, out, CHUNK)
    sha, md5 = _digest(tmp)
    if sha != manifest["sha256"] or md5 != manifest["md5"]:
        os.remove(tmp)
        raise PartsError(f"joined {manifest['name']} has sha256 {sha[:16]}..., the manifest "
                         f"says {manifest['sha256'][:16]}...; pack it again")
    os.replace(tmp, dest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="FILE -> OUT_DIR/FILE.part<i>of<n> + FILE.parts.json")
    p.add_argument("file")
    p.add_argument("out_dir")
    p.add_argument("--max-mib", type=float, default=60.0, help="largest part (MiB)")
    p.add_argument("--min-parts", type=int, default=1, help="at least this many parts")
    p = sub.add_parser("stash", help="verify the parts in CARRY_DIR, keep them in STAGE_DIR")
    p.add_argument("carry_dir")
    p.add_argument("stage_dir")
    p = sub.add_parser("status", help="which parts STAGE_DIR holds")
    p.add_argument("stage_dir")
    p = sub.add_parser("unpack", help="verify the parts in STAGE_DIR and join them into DEST")
    p.add_argument("stage_dir")
    p.add_argument("dest")
    args = parser.parse_args(argv)
    try:
        if args.command == "pack":
            m = pack(args.file, args.out_dir, max_mib=args.max_mib, min_parts=args.min_parts)
            sizes = ", ".join(f"{p['file']} {p['size'] / MiB:.1f} MiB" for p in m["parts"])
            print(f"{m['name']}: {m['size']:,} bytes, sha256 {m['sha256']}, md5 {m['md5']} -> "
                  f"{args.out_dir}: {sizes}, {manifest_name(m['name'])}")
        elif args.command == "stash":
            print(stash(args.carry_dir, args.stage_dir))
        elif args.command == "status":
            print(status(args.stage_dir))
        else:
            m = unpack(args.stage_dir, args.dest)
            print(f"{args.dest}: {m['size']:,} bytes from {len(m['parts'])} parts, sha256 "
                  f"{m['sha256']} and md5 {m['md5']} verified")
    except (PartsError, OSError) as e:
        print(f"pack_cifar.py {args.command}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
