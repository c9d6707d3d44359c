"""The ``triton`` DCNv3 kernels against the ``grid_sample`` implementation: on CPU through
Triton's interpreter (the cases live in triton_cases.py and run in a fresh process with
TRITON_INTERPRET=1), on CUDA where a GPU exists, and compiled for sm_90 without one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.models.dcnv3 import DCNv3

pytest.importorskip("triton")

# largest |triton − grid_sample| over outputs and gradients (fp32 cases), mean relative error
# (bf16), largest gradient difference relative to each parameter's largest (packed encoder)
TOLERANCES = {"full_map_scale_1": 2e-5, "full_map_scale_2": 2e-5, "query_sites": 2e-5, "bf16_relative": 0.01,
              "packed_encoder": 1e-4}


@pytest.fixture(scope="module")
def interpreted():
    script = Path(__file__).with_name("triton_cases.py")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["full_map_scale_1", "full_map_scale_2", "query_sites"])
def test_triton_sampling_matches_grid_sample_with_gradients(interpreted, case):
    """Outputs and value/offset/modulation gradients, fp32, points inside and off the map."""
    assert interpreted[case] < TOLERANCES[case]


def test_triton_sampling_in_bf16_keeps_sub_pixel_positions(interpreted):
    assert interpreted["bf16_relative"] < TOLERANCES["bf16_relative"]


def test_triton_packed_encoder_equals_masked_dense_grid_sample(interpreted):
    assert interpreted["packed_encoder"] < TOLERANCES["packed_encoder"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_matches_grid_sample_on_cuda():
    from .triton_cases import run_all
    results = run_all("cuda")
    assert all(results[case] < TOLERANCES[case] for case in TOLERANCES), results


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode runs the kernels on CPU")
    layer = DCNv3(8, groups=2, impl="triton")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        layer(torch.randn(1, 4, 4, 8))


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


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_kernels_compile_for_h100(dtype):
    """The interpreter does not check what only the compiler rejects: build both kernels down
    to an sm_90 cubin (Triton ships ptxas, no GPU needed)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces compilation")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fcmae.models.dcnv3 import triton_kernels

    for kernel in (triton_kernels._forward_kernel, triton_kernels._backward_kernel):
        source = ASTSource(fn=kernel, signature=kernel_signature(kernel, dtype),
                           constexprs={"KERNEL": 3, "BLOCK_ROWS": triton_kernels.BLOCK_ROWS, "BLOCK_C": 16})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], kernel.fn.__name__
