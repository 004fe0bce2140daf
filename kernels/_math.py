"""Small @triton.jit helpers shared by the kernels: the tile order, the dot and the downcast.

Both exist because of two gaps in Triton 3.9's interpreter (``TRITON_INTERPRET=1``, how the
kernels are tested without a GPU): it hands bf16 tiles to ``np.matmul`` as their uint16 bit
patterns, and it truncates fp32 -> bf16 instead of rounding to nearest even as compiled code
does.  Under the interpreter the helpers do the exact equivalent; compiled, they are the plain
operations (the interpreter branches are constexpr-false and vanish).
"""
import triton
import triton.language as tl

from fastpeft.kernels import config as _config

_INTERPRET = tl.constexpr(_config.INTERPRET)


@triton.jit
def dot_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
    # acc + a @ b with fp32 accumulation; a and b share a dtype (x's)
    if _INTERPRET:  # bf16 -> fp32 is exact, so the products and sums are the ones the MMA forms
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def round_to(v, dtype: tl.constexpr):
    # v -> dtype, rounding to nearest even (what compiled code does for every downcast)
    if _INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # (pid_m, pid_n) of program pid: GROUP_M row blocks share each column block of the right-hand
    # operand while it is in L2 (the grouped ordering of the Triton matmul tutorial)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % pids_per_group) % group_rows, (pid % pids_per_group) // group_rows
