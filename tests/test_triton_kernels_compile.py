"""Every Triton kernel in the package compiles for an H100 (sm_90) with its shipped settings, on any
machine with Triton installed, GPU or not (`triton.compile` runs the whole pipeline down to ptxas).
The CPU interpreter (TRITON_INTERPRET=1) checks the maths but accepts things the compiler refuses,
such as a module-level Python number read inside a kernel; this catches those before a GPU run."""
import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def _compile(fn, pointers: dict[str, str], ints: list[str], constexprs: dict, num_warps: int, num_stages: int = 3):
    signature = {**pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs}}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=SM90,
                                options={"num_warps": num_warps, "num_stages": num_stages})
    except RuntimeError as e:  # a Triton build without the CUDA backend's tools
        if "ptxas" in str(e).lower() and "not found" in str(e).lower():
            pytest.skip(f"no ptxas: {e}")
        raise
    assert kernel.asm["ptx"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lm_head_kernels_compile(dtype):
    from efftune.forward import head_triton as head
    segments, seg, block = head._layout(128256, head.CONFIG["block"], head.CONFIG["max_segments"])
    sizes = dict(S=segments, SEG=seg, BLOCK=block)
    common = {"x_ptr": f"*{dtype}", "t_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "pick_ptr": "*fp32"}
    _compile(head._stats_kernel, common, ["V", "stride"], sizes, head.CONFIG["num_warps"])
    _compile(head._grad_kernel, {**common, "g_ptr": "*bf16", "lp_ptr": "*fp32"}, ["V", "stride", "gstride"], sizes,
             head.CONFIG["num_warps"])


def test_swiglu_kernels_compile():
    from efftune.methods.lora import swiglu_triton as sw
    ranks = dict(RP=16, RPD=16, PREC="tf32")
    f, b = sw.FORWARD_CONFIG, sw.BACKWARD_CONFIG
    names = ("g0_ptr", "u0_ptr", "z_ptr", "bg_ptr", "bu_ptr", "ad_ptr", "h_ptr")
    _compile(sw._forward_kernel, {**{n: "*bf16" for n in names}, "zd_part": "*fp32"},
             ["N", "F", "S", "RG", "RU", "RD"], dict(COLS=f["cols"], BT=f["bt"], BO=f["bo"], **ranks),
             f["num_warps"], f["num_stages"])
    names = ("dh_ptr", "dzd_ptr", "ad_ptr", "g0_ptr", "u0_ptr", "z_ptr", "bg_ptr", "bu_ptr", "dg_ptr", "du_ptr",
             "h_ptr")
    _compile(sw._backward_kernel, {**{n: "*bf16" for n in names}, "dz_part": "*fp32"},
             ["N", "F", "S", "DS", "RG", "RU", "RD"], dict(COLS=b["cols"], BT=b["bt"], BO=b["bo"], **ranks),
             b["num_warps"], b["num_stages"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_nf4_dequantisation_kernel_compiles(dtype):
    from efftune.quantize import nf4, nf4_triton
    _compile(nf4_triton._dequantize_kernel,
             {"codes_ptr": "*u8", "scale_q_ptr": "*i8", "scale_scale_ptr": "*fp32", "mean_ptr": "*fp32",
              "code_ptr": "*fp32", "out_ptr": f"*{dtype}"}, ["n_bytes", "blocks_per_expert", "scales_per_expert"],
             dict(BYTES=nf4_triton.BYTES, BLOCK_BYTES=nf4.BLOCK // 2, SCALE_BLOCK=nf4.SCALE_BLOCK),
             nf4_triton.NUM_WARPS)
