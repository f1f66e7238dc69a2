"""Build ``.gpu-wheels/``: the wheels the GPU machine lacks for the end-to-end part of ``make gpu-check``.

    python -m benchmarks.gpu_wheels            # make gpu-wheels: download here (needs PyPI), list sizes
    python -m benchmarks.gpu_wheels --extra torchao==X   # also a torchao built for the device's torch (2.11)
    # on the device, before the check (README, "GPU check"):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl

The GPU machine has torch, torchvision, numpy, pyyaml, pandas, matplotlib, pillow, tqdm, psutil,
requests and the like, but not dvc, dvclive or pycocoevalcap (``/work/.library/device/KINDS.md``'s
package list). ``dvclive`` imports ``dvc`` at module level (``dvclive/live.py``), so dvc and the part
of its dependencies that ``from dvclive import Live`` and a ``Live(..., dvcyaml=False,
save_dvc_exp=False)`` run import travel too (found by importing them here, one by one). Versions
are those of this environment, the ones the tests ran with. pycocoevalcap's wheel is ~100 MB
(METEOR's and SPICE's Java jars and data); the check runs without METEOR (``evaluate.meteor:
false``; Java is not on that machine either), so a copy without ``*.jar`` and data files is built,
~0.1 MB. Everything must fit the 64 MiB the device tool carries with the working tree.
"""

from __future__ import annotations

import argparse
import hashlib
import base64
import importlib.metadata as md
import json
import subprocess
import sys
import zipfile
from pathlib import Path

# Distributions missing on the GPU machine that the train/evaluate/report stages import (dvc through dvclive).
DISTRIBUTIONS = ("dvclive", "dvc", "dvc-data", "dvc-objects", "dvc-http", "dvc-render", "dvc-studio-client",
                 "scmrepo", "dulwich", "funcy", "ruamel.yaml", "atpublic", "diskcache", "dpath", "flatten-dict",
                 "flufl.lock", "orjson", "pygtrie", "sqltrie", "voluptuous", "wcwidth", "zc.lockfile")
SLIMMED = "pycocoevalcap"  # repacked without its Java jars and data files
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 *[a for tag in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                                 "manylinux2014_x86_64", "manylinux1_x86_64") for a in ("--platform", tag)]]
CARRY_LIMIT = 64 * 2**20


def download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM_ARGS, "-d", str(dest), spec]
    subprocess.run(cmd, check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_wheel(wheel: Path) -> Path:
    """The wheel without ``*.jar`` and data files (gz, tgz, txt under meteor/spice/tokenizer), RECORD rewritten."""
    keep_suffixes = (".py", "METADATA", "WHEEL", "top_level.txt", "LICENSE", "RECORD")
    out = wheel.with_name(wheel.name)  # same name: pip reads name and version from it
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        records, record_name = [], None
        for info in src.infolist():
            if info.filename.endswith("RECORD"):
                record_name = info.filename
                continue
            if not info.filename.endswith(keep_suffixes):
                continue
            data = src.read(info)
            dst.writestr(info, data)
            records.append(_record_line(info.filename, data))
        dst.writestr(record_name, "\n".join(records + [f"{record_name},,"]) + "\n")
    tmp.replace(out)
    return out


def build(dest: Path, extra: list[str] = ()) -> dict:
    """Download the wheels (plus ``extra`` requirement specs, e.g. a torchao for the device's torch) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    for name in DISTRIBUTIONS:
        download(f"{name}=={md.version(name)}", dest)
    for spec in extra:
        download(spec, dest)
    download(f"{SLIMMED}=={md.version(SLIMMED)}", dest)
    slim_wheel(next(dest.glob(f"{SLIMMED}-*.whl")))
    sizes = {w.name: w.stat().st_size for w in sorted(dest.glob("*.whl"))}
    manifest = {"wheels": sizes, "total_bytes": sum(sizes.values()), "carry_limit_bytes": CARRY_LIMIT,
                "python": "cp312 manylinux x86_64 (the GPU machine's Python 3.12)",
                "slimmed": {SLIMMED: "no *.jar or data files: METEOR and SPICE unavailable (evaluate.meteor: false)"}}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_wheels", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".gpu-wheels"))
    parser.add_argument("--extra", action="append", default=[], metavar="SPEC",
                        help="another wheel to carry, e.g. --extra torchao==X (a release built for the device's torch 2.11)")
    args = parser.parse_args(argv)
    manifest = build(args.dest, args.extra)
    for name, size in manifest["wheels"].items():
        print(f"{size / 2**20:7.2f} MiB  {name}")
    total = manifest["total_bytes"]
    print(f"{total / 2**20:7.2f} MiB  total in {args.dest} (the device tool carries at most 64 MiB with the tree)")
    if total > CARRY_LIMIT:
        print(f"gpu-wheels: {total / 2**20:.1f} MiB exceeds the 64 MiB carry budget", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
