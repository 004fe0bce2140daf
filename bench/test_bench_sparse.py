"""Sparse delta (sparse fine-tuning), one benchmark per density x selection structure x backend x shape.

Besides the fastpeft backends: "peft" is peft's SHiRA (it clones the dense weight every call),
"dense-delta" is the plain-autograd formulation (``fastpeft.reference.peft_linear``: W + S
materialised, a dense N x K gradient formed and then gathered), and "torch" the frozen base.
"""
import pytest

from fastpeft.tools import benchmark as fb

DENSITIES = [0.001, 0.01, 0.05]


class _DenseDelta:
    """A LayerCase-like wrapper computing the same math with fastpeft.reference (plain autograd)."""

    def __init__(self, case):
        import fastpeft.reference as ref

        layer = case.module
        self.method, self.backend, self.x, self.gy = case.method, "dense-delta", case.x, case.gy
        self.module = layer
        self._params = [p for p in layer.parameters() if p.requires_grad]

        def fwd():
            return ref.peft_linear(self.x, layer.weight, layer.bias, sparse_index=layer.sparse_index,
                                   sparse_value=layer.sparse_value)

        self._f = fwd

    def fwd(self):
        self._f()

    def fwd_bwd(self):
        self.x.grad = None
        for p in self._params:
            p.grad = None
        self._f().backward(self.gy)


@pytest.mark.parametrize("which", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("block", [None, 16], ids=["unstructured", "block16"])
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse(benchmark, make_case, run_pass, bench_settings, shape, backend, density, block, which):
    if backend == fb.TORCH:
        case = make_case("base", backend, shape)  # the frozen layer the sparse update rides on
    else:
        if backend == fb.PEFT and block is not None:
            pytest.skip("peft's SHiRA has no block-structured masks")
        case = make_case("sparse", backend, shape, density=density, block=block)
    structure = f"block{block}" if block else "unstructured"
    run_pass(benchmark, case, which, f"sparse {shape} density={density} {structure}", bench_settings,
             density=density, block=block)


@pytest.mark.parametrize("which", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("density", DENSITIES)
def test_sparse_dense_delta(benchmark, make_case, run_pass, bench_settings, shape, density, which):
    """The dense-gradient formulation the sparse kernels replace (same density, unstructured)."""
    case = _DenseDelta(make_case("sparse", "reference", shape, density=density))
    run_pass(benchmark, case, which, f"sparse {shape} density={density} unstructured", bench_settings,
             density=density, block=None)
