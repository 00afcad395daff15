"""Rewrite a wheel in place without the files matching some glob patterns, RECORD updated.

    python bench/slim_wheel.py WHEEL PATTERN [PATTERN ...]

pip checks every installed file against the wheel's RECORD (path, sha256, size), so removed
files are dropped from RECORD too; the rest is copied byte for byte, recompressed at level 9.
"""

from __future__ import annotations

import fnmatch
import sys
import zipfile
from pathlib import Path


def slim(wheel: Path, patterns: list[str]) -> tuple[int, int]:
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, \
            zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        dropped = {name for name in src.namelist() if any(fnmatch.fnmatch(name, p) for p in patterns)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, data, compresslevel=9)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    wheel, patterns = Path(sys.argv[1]), sys.argv[2:]
    before, after = slim(wheel, patterns)
    print(f"{wheel.name}: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
