#!/usr/bin/env python
"""What the DCNv3 Triton kernels cost on a Hopper GPU, measured without one: every kernel
variant the autotuner may launch is compiled ahead of time for sm_90 with Triton's bundled
ptxas, which reports registers and local memory (stack, spills); cuobjdump counts SASS
instructions. Build seconds are of a cold build (a fresh Triton cache).

    python tools/triton_resources.py                  # table of every variant
    python tools/triton_resources.py --json out.json

A variant = kernel (forward, backward) × data dtype × BLOCK_C (padded group channels: 16 for
InternImage T–XL, 32 for H) × each launch config kept by ``fitting_configs``. With 64K
registers per SM, a block of ``32·num_warps`` threads at R registers lets
``65536 // (32·num_warps·R)`` blocks share an SM (register allocation rounded up to 8).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fcmae.models.dcnv3 import triton_kernels

REGISTERS_PER_SM = 65536
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def kernel_signature(kernel, dtype: str) -> dict[str, str]:
    """Argument types of a DCNv3 kernel for ahead-of-time compilation: data in ``dtype``,
    gradient buffers fp32, (y, x) queries int64, sizes int32, constexprs as such."""
    types = {}
    for name in kernel.arg_names:
        if name.isupper():
            types[name] = "constexpr"
        elif name == "query_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name.startswith("grad_") and name != "grad_out_ptr" else f"*{dtype}"
        else:
            types[name] = "fp32" if name == "offset_scale" else "i32"
    return types


def variants() -> list[tuple]:
    """(kernel, dtype, BLOCK_C, config) for every variant the autotuner may launch."""
    return [(kernel, dtype, block_c, config)
            for kernel in (triton_kernels._forward_kernel, triton_kernels._backward_kernel)
            for dtype in ("fp32", "bf16") for block_c in (16, 32)
            for config in triton_kernels.fitting_configs(triton_kernels.CONFIGS, {}, BLOCK_C=block_c)]


def resources(kernel, dtype: str, block_c: int, config: triton.Config, arch: int = 90) -> dict:
    """Compile one variant for ``sm_{arch}``; its registers, stack bytes, spill bytes, SASS
    instruction count, blocks per SM by registers, and build seconds."""
    start = time.perf_counter()
    source = ASTSource(fn=kernel, signature=kernel_signature(kernel, dtype),
                       constexprs={"KERNEL": 3, "BLOCK_C": block_c, **config.kwargs})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": config.num_warps})
    build_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as scratch:
        ptx, cubin = Path(scratch, "kernel.ptx"), Path(scratch, "kernel.cubin")
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(TOOLS / "ptxas"), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(cubin)],
                                capture_output=True, text=True, check=True).stderr
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout

    def number(pattern: str) -> int:
        found = re.search(pattern, report)
        return int(found.group(1)) if found else 0
    registers = number(r"Used (\d+) registers")
    threads = 32 * config.num_warps
    return dict(kernel=kernel.fn.__name__.strip("_"), dtype=dtype, block_c=block_c,
                block_rows=config.kwargs["BLOCK_ROWS"], num_warps=config.num_warps, registers=registers,
                stack_bytes=number(r"(\d+) bytes (?:cumulative )?stack"),
                spill_bytes=number(r"(\d+) bytes spill stores"),
                sass_instructions=len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+\S", sass)),
                blocks_per_sm=REGISTERS_PER_SM // (threads * (-(-registers // 8) * 8)),
                build_s=round(build_s, 2))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default: %(default)s)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache:   # build seconds of a cold build, not of Triton's cache
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = [resources(*variant, arch=args.arch) for variant in variants()]
    print(f"triton {triton.__version__}, sm_{args.arch}")
    print(f"{'kernel':<16}{'dtype':<6}{'C':>4}{'rows':>6}{'warps':>6}{'regs':>6}{'stack':>7}{'spill':>7}"
          f"{'SASS':>7}{'blk/SM':>8}{'build s':>9}")
    for row in rows:
        print(f"{row['kernel']:<16}{row['dtype']:<6}{row['block_c']:>4}{row['block_rows']:>6}{row['num_warps']:>6}"
              f"{row['registers']:>6}{row['stack_bytes']:>7}{row['spill_bytes']:>7}{row['sass_instructions']:>7}"
              f"{row['blocks_per_sm']:>8}{row['build_s']:>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
