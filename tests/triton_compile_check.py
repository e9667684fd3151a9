"""Compile every Triton kernel for Hopper (sm_90) without a GPU: run by tests/test_extension.py in a subprocess
without TRITON_INTERPRET (under it @triton.jit makes interpreted functions, which cannot be compiled).

Prints one line per kernel and dtype; exits 1 if any failed to compile.
"""
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from skelemix.kernels import bn_epilogue as kb, graph_conv as kc, mask_pool as km, skelemix_gather as kg  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
failed = []


def compile_kernel(kernel, signature, constexprs, name, **options):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    try:
        src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
        compiled = triton.compile(src, target=TARGET, options=options)
        print(f"ok {name}: {compiled.metadata.shared} B shared memory")
    except Exception as exc:  # noqa: BLE001 - report every failure, then fail
        failed.append(name)
        print(f"FAILED {name}: {type(exc).__name__}: {exc}")


def ints(names):
    return {n: "i32" for n in names.split()}


for dt in ("fp32", "fp16", "bf16"):
    p = f"*{dt}"
    blocks = dict(BLOCK_C=4, BLOCK_S=1024)
    compile_kernel(km.mask_pool_fwd_kernel, dict(x_ptr=p, mask_ptr="*i1", count_ptr="*i32", out_ptr=p,
                   **ints("C S rows_per_mask")), blocks, f"mask_pool_fwd {dt}", num_warps=8)
    compile_kernel(km.mask_pool_bwd_kernel, dict(grad_ptr=p, mask_ptr="*i1", count_ptr="*i32", out_ptr=p,
                   **ints("C S rows_per_mask stride_gb stride_gr stride_gc")), blocks, f"mask_pool_bwd {dt}",
                   num_warps=8)
    compile_kernel(kg.skelemix_gather_kernel, dict(x_ptr=p, partner_ptr="*i64", joints_ptr="*i1", span_ptr="*i64",
                   out_ptr=p, **ints("N T M ROWS COLS block region_r region_n V")), dict(BLOCK_ROW=64, BLOCK_COL=64),
                   f"skelemix_gather {dt}", num_warps=8)
    flags = dict(DOT_FP32=False, ALLOW_TF32=dt == "fp32")
    # Every autotune config, then the fixed configs used without autotuning for the encoder's layers (forward
    # and, channels swapped, the input gradient).
    configs = [(c.kwargs, c.num_warps, c.num_stages) for c in kc._fwd_configs()]
    for cin, cout in ((3, 16), (16, 16), (16, 32), (32, 32), (32, 64), (64, 64), (64, 256)):
        for a, b in ((cin, cout), (cout, cin)):
            config = kc.fwd_config(32, a, b, interpret=False)
            warps, stages = config.pop("num_warps"), config.pop("num_stages")
            if (config, warps, stages) not in configs:
                configs.append((config, warps, stages))
    for config, warps, stages in configs:
        compile_kernel(kc.graph_conv_fwd_kernel, dict(x_ptr=p, w_ptr=p, b_ptr=p, a_ptr=p, y_ptr=p, **ints(
            "N CIN COUT T V K s_xn s_xi s_xt s_xv s_wk s_wc s_wi s_ak s_av s_aw")),
            dict(HAS_BIAS=True, VP=32, **flags, **config), f"graph_conv_fwd {dt} {config} warps={warps}",
            num_warps=warps, num_stages=stages)
    compile_kernel(kc.graph_conv_bwd_weight_kernel, dict(g_ptr=p, x_ptr=p, a_ptr=p, dw_ptr="*fp32", db_ptr="*fp32",
                   **ints("N CIN COUT T V K s_gn s_gc s_gt s_gv s_xn s_xi s_xt s_xv s_ak s_av s_aw SPLIT")),
                   dict(VP=32, BLOCK_C=32, BLOCK_I=32, BLOCK_T=2, **flags), f"graph_conv_bwd_weight {dt}", num_warps=4)
    compile_kernel(kc.graph_conv_bwd_adjacency_kernel, dict(g_ptr=p, x_ptr=p, w_ptr=p, b_ptr=p, da_ptr="*fp32",
                   **ints("N CIN COUT T V s_gn s_gc s_gt s_gv s_xn s_xi s_xt s_xv s_wo s_wi SPLIT")),
                   dict(HAS_BIAS=True, VP=32, BLOCK_C=32, BLOCK_I=32, BLOCK_T=2, **flags),
                   f"graph_conv_bwd_adjacency {dt}", num_warps=4)
    f, seed, bn = "*fp32", "*i64", dict(threshold="i64", keep_scale="fp32")
    compile_kernel(kb.bn_epilogue_fwd_kernel, dict(x_ptr=p, res_ptr=p, y_ptr=p, mean_ptr=f, a_ptr=f, bias_ptr=f,
                   seed_ptr=seed, **ints("R C L"), **bn), dict(HAS_RES=True, DROPOUT=True, RELU=True, BLOCK_R=4,
                   BLOCK_L=1024), f"bn_epilogue_fwd {dt}", num_warps=8)
    compile_kernel(kb.bn_epilogue_bwd_reduce_kernel, dict(g_ptr=p, x_ptr=p, y_ptr=p, gres_ptr=p, sum_gp_ptr=f,
                   sum_gpx_ptr=f, mean_ptr=f, invstd_ptr=f, seed_ptr=seed, **ints("R C L"), **bn),
                   dict(DROPOUT=True, RELU=True, WRITE_RES=True, BLOCK_R=4, BLOCK_L=1024),
                   f"bn_epilogue_bwd_reduce {dt}", num_warps=8)
    compile_kernel(kb.bn_epilogue_bwd_kernel, dict(g_ptr=p, x_ptr=p, y_ptr=p, gx_ptr=p, gres_ptr=p, mean_ptr=f,
                   invstd_ptr=f, a_ptr=f, cb_ptr=f, cw_ptr=f, seed_ptr=seed, **ints("R C L"), **bn),
                   dict(DROPOUT=True, RELU=True, BATCH_STATS=True, WRITE_X=True, WRITE_RES=True, BLOCK_R=4,
                        BLOCK_L=1024), f"bn_epilogue_bwd {dt}", num_warps=8)
sys.exit(1 if failed else 0)
