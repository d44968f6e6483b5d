"""What the guest build needs from Debian's kernel package, with nothing but the standard library.

``vmlinux BZIMAGE OUT``: the uncompressed ELF kernel inside an x86 bzImage (xz payload), which QEMU
boots through PVH, seconds faster under TCG than decompressing the bzImage at every boot.

``modules MODDIR NAME...``: the module files those names need, dependencies first (load order),
read from the extracted tree's modules.dep so only they are copied into the guest.
"""

from __future__ import annotations

import lzma
import sys
from pathlib import Path

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"


def vmlinux(bzimage: Path, out: Path) -> None:
    data = bzimage.read_bytes()
    pos = data.find(XZ_MAGIC)
    while pos >= 0:
        try:
            kernel = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
        except lzma.LZMAError:
            kernel = b""
        if kernel.startswith(ELF_MAGIC):
            out.write_bytes(kernel)
            return
        pos = data.find(XZ_MAGIC, pos + 1)
    raise SystemExit(f"{bzimage}: no xz-compressed ELF kernel inside")


def modules(moddir: Path, names: list[str]) -> list[str]:
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the one to load first last
            visit(dep)
        order.append(path)

    for name in names:
        key = name.replace("-", "_")
        if key not in by_name:
            raise SystemExit(f"module {name}: not in {moddir}/modules.dep (built in, or renamed?)")
        visit(by_name[key])
    return order


def main(argv: list[str]) -> None:
    if argv[:1] == ["vmlinux"] and len(argv) == 3:
        vmlinux(Path(argv[1]), Path(argv[2]))
    elif argv[:1] == ["modules"] and len(argv) >= 3:
        print("\n".join(modules(Path(argv[1]), argv[2:])))
    else:
        raise SystemExit("usage: kernel_files.py vmlinux BZIMAGE OUT | modules MODDIR NAME...")


if __name__ == "__main__":
    main(sys.argv[1:])
