"""Compile every fused kernel, in the variants the step functions launch, for an H100 (sm_90):
Triton front end, LLVM and ptxas, all of which ship with the triton wheel, so no GPU is needed.

Run as a script in a process WITHOUT TRITON_INTERPRET (the interpreter wraps kernels in objects
that do not compile); test_fused_compiles.py does so. Prints one JSON object per variant: its
name, the error if it failed, and how many 16-byte vector loads its PTX has (the full-chunk
path of an aligned variant must have some, or the kernels cannot reach copy bandwidth).
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from largebatch.fused import _norms, adan, lamb, lars
from largebatch.fused._engine import PRODUCTION_CHUNKING, TENSOR_BLOCK

TARGET = GPUTarget("cuda", 90, 32)
INDEX = "*i64"  # a row of the chunk table
FLOAT = "*fp32"
SCALAR = "fp32"
COUNT = "i32"
CHUNK = {"CHUNK_SIZE": PRODUCTION_CHUNKING.chunk_size, "CHUNKS_PER_PROGRAM": PRODUCTION_CHUNKING.chunks_per_program}


def _table(*pointer_rows: str) -> dict[str, object]:
    return {"n_chunks": COUNT, "chunk_tensors": INDEX, "numels": INDEX, "first_chunks": INDEX, "aligned": INDEX,
            **{row: INDEX for row in pointer_rows}}  # fmt: skip


def _scalars(names: str) -> dict[str, object]:
    return {name: SCALAR for name in names.split()}


def compile_variant(kernel, arguments: dict[str, object], num_warps: int) -> str:
    """PTX of `kernel` with these arguments: "*type" a pointer (16-byte aligned, as torch
    allocates), "fp32" a runtime float, "i32" a runtime count, anything else (None included) a
    constexpr."""
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = arguments[name]
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": num_warps}).asm["ptx"]


def _kahan(on: bool) -> dict[str, object]:
    """The compensation buffers' row (kahan_sum) and its constexpr: a row, or None."""
    return {"comp_ptrs": INDEX if on else None, "KAHAN": on}


def _scales(*rows: str, on: bool) -> dict[str, object]:
    """The scale rows of 8-bit states and the kernels' code tables: rows and tables, or None."""
    return {**{row: INDEX if on else None for row in rows}, "code_maps": FLOAT if on else None,
            "midpoints": FLOAT if on else None}  # fmt: skip


def variants():
    warps = PRODUCTION_CHUNKING.num_warps
    amp = {"grad_scale": FLOAT, "found_inf": FLOAT}
    yield "grad norm", _norms._square_sums_kernel, {
        **_table("grad_ptrs"), "partials": FLOAT, "grad_scale": None, "GRAD_DTYPE": tl.bfloat16, **CHUNK}, warps
    for columns in (1, 2):
        yield f"segment sums x{columns}", _norms._segment_sums_kernel, {
            "partials": FLOAT, "first_chunks": INDEX, "sums": FLOAT, "N_COLUMNS": columns, "ROWS": _norms.SEGMENT_ROWS
        }, _norms.SEGMENT_WARPS
    yield "clip coefficient", _norms._clip_coefficient_kernel, {
        "squares": FLOAT, "n_squares": COUNT, "coefficient": FLOAT, **_scalars("max_norm eps"),
        "BLOCK": _norms.CLIP_BLOCK}, 4  # fmt: skip
    per_tensor = {"n_tensors": COUNT, "step_ptrs": INDEX, "corrections": FLOAT, "BLOCK": TENSOR_BLOCK}
    for bias_correction in (True, False):
        yield f"lamb count bias_correction={bias_correction}", lamb._count_kernel, {
            **per_tensor, "found_inf": FLOAT, **_scalars("log_beta1 log_beta2"), "BIAS_CORRECTION": bias_correction}, 4
    yield "adan count", adan._count_kernel, {
        **per_tensor, "found_inf": None, **_scalars("beta2 log_beta1 log_beta2 log_beta3")}, 4  # fmt: skip

    lamb_rows = _table("param_ptrs", "grad_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs", "step_ptrs")
    # (8-bit: pass 1 with adaptation, the one pass without, and pass 3, which recomputes from norms_sq.)
    for adapt, dtype, kahan, eight_bit, recompute in (
        (True, tl.float32, False, False, False), (False, tl.bfloat16, False, False, False),
        (True, tl.bfloat16, True, False, False), (False, tl.bfloat16, True, False, False),
        (True, tl.float32, False, True, False), (False, tl.bfloat16, True, True, False), (False, tl.float32, False, True, True),
    ):  # fmt: skip
        state_dtypes = (tl.int8, tl.uint8) if eight_bit else (tl.float32, tl.float32)
        yield f"lamb moments adapt={adapt} {dtype} kahan={kahan} 8bit={eight_bit} recompute={recompute}", lamb._moments_kernel, {
            **lamb_rows, **_scales("exp_avg_scale_ptrs", "exp_avg_sq_scale_ptrs", on=eight_bit), **_kahan(kahan),
            "partials": FLOAT, "norms_sq": FLOAT if recompute else None, "corrections": FLOAT, "lr_tensor": FLOAT, **amp,
            "clip_coef": FLOAT, **_scalars("lr beta1 grad_weight beta2 one_minus_beta2 eps weight_decay trust_clip"),
            "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype, "EXP_AVG_DTYPE": state_dtypes[0], "EXP_AVG_SQ_DTYPE": state_dtypes[1],
            "MAXIMIZE": True, "BIAS_CORRECTION": True, "ADAPT": adapt, "TRUST_CLIP": recompute, **CHUNK}, warps  # fmt: skip
    for dtype, kahan in ((tl.float16, False), (tl.bfloat16, True)):
        yield f"lamb apply {dtype} kahan={kahan}", lamb._apply_kernel, {
            **lamb_rows, **_scales("exp_avg_scale_ptrs", "exp_avg_sq_scale_ptrs", on=False), **_kahan(kahan),
            "norms_sq": FLOAT, "corrections": FLOAT, "lr_tensor": None, "found_inf": None,
            **_scalars("lr eps weight_decay trust_clip"),
            "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype, "EXP_AVG_DTYPE": dtype, "EXP_AVG_SQ_DTYPE": dtype,
            "BIAS_CORRECTION": False, "TRUST_CLIP": True, **CHUNK}, warps  # fmt: skip

    for dtype, kahan in ((tl.float32, False), (tl.bfloat16, True)):
        yield f"lars norms {dtype} kahan={kahan}", lars._norms_kernel, {
            **_table("param_ptrs", "grad_ptrs", "buf_ptrs", "step_ptrs"), "buf_scale_ptrs": None, **_kahan(kahan),
            "partials": FLOAT, **amp,
            "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype, **CHUNK}, warps  # fmt: skip
    for momentum, nesterov, lr_in_momentum, kahan, eight_bit in (
        (True, True, False, False, False), (True, False, True, False, False), (False, False, False, False, False),
        (True, True, False, True, False), (True, False, False, True, False), (False, False, False, True, False),
        (True, True, False, False, True), (True, False, False, True, True),
    ):  # fmt: skip
        dtype = tl.bfloat16 if kahan else tl.float32
        yield (f"lars update momentum={momentum} nesterov={nesterov} lr_in_momentum={lr_in_momentum} kahan={kahan} "
               f"8bit={eight_bit}"), lars._update_kernel, {
            **_table("param_ptrs", "grad_ptrs"), "buf_ptrs": INDEX if momentum else None, "step_ptrs": INDEX,
            **_scales("buf_scale_ptrs", on=eight_bit), **_kahan(kahan), "norms_sq": FLOAT if momentum else None,
            "lr_tensor": FLOAT, **amp, **_scalars("lr momentum dampening_complement weight_decay trust_coefficient eps"),
            "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype, "BUF_DTYPE": tl.int8 if eight_bit else tl.float32, "MAXIMIZE": False,
            "ADAPT": momentum, "TRUST_CLIP": momentum, "MOMENTUM": momentum, "NESTEROV": nesterov,
            "LR_IN_MOMENTUM": lr_in_momentum, **CHUNK}, warps  # fmt: skip

    for no_prox, dtype, kahan, eight_bit in ((False, tl.float32, False, False), (True, tl.float16, False, False),
                                             (False, tl.bfloat16, True, False), (True, tl.bfloat16, True, False),
                                             (False, tl.float32, False, True), (True, tl.bfloat16, True, True)):  # fmt: skip
        signed, unsigned = (tl.int8, tl.uint8) if eight_bit else (tl.float32, tl.float32)
        yield f"adan no_prox={no_prox} {dtype} kahan={kahan} 8bit={eight_bit}", adan._adan_kernel, {
            **_table("param_ptrs", "grad_ptrs", "exp_avg_ptrs", "exp_avg_diff_ptrs", "exp_avg_sq_ptrs", "prev_grad_ptrs",
                     "step_ptrs"),
            **_scales("exp_avg_scale_ptrs", "exp_avg_diff_scale_ptrs", "exp_avg_sq_scale_ptrs", on=eight_bit),
            **_kahan(kahan), "corrections": FLOAT, "lr_tensor": None, **amp, "clip_coef": FLOAT,
            **_scalars("lr beta1 one_minus_beta1 beta2 one_minus_beta2 beta3 one_minus_beta3 eps weight_decay"),
            "PARAM_DTYPE": dtype, "GRAD_DTYPE": dtype, "EXP_AVG_DTYPE": signed, "EXP_AVG_DIFF_DTYPE": signed,
            "EXP_AVG_SQ_DTYPE": unsigned, "PREV_GRAD_DTYPE": tl.bfloat16 if eight_bit else dtype, "MAXIMIZE": False,
            "NO_PROX": no_prox, **CHUNK}, warps  # fmt: skip


def main() -> None:
    if triton.knobs.runtime.interpret:
        sys.exit("run without TRITON_INTERPRET: interpreted kernels do not compile")
    for name, kernel, arguments, num_warps in variants():
        try:
            ptx = compile_variant(kernel, arguments, num_warps)
        except Exception as error:  # report every failure, not just the first
            print(json.dumps({"name": name, "error": f"{type(error).__name__}: {error}"[:2000]}))
        else:
            print(json.dumps({"name": name, "error": None, "vector_loads": ptx.count("ld.global.v4")}))


if __name__ == "__main__":
    main()
