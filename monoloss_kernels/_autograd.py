r"""The backward of the statistics ops, registered once for every backend.

MonoLoss needs gradients of the statistics only: `finalize` and the loss are
plain torch, and autograd differentiates them. For the statistics of
b = a - shift (Ê the unit rows of emb, w[n] = 1 for zero-norm rows):

    ∂L/∂a[n,k] = (Ê G)[n,k]              G = ∂L/∂cross          (d, M)
               + g₀[k] + 2 b[n,k] g₁[k]  g = ∂L/∂moments        (4, M)
               + w[n] (g₂[k] + 2 b[n,k] g₃[k])
               + [a[n,k] = min_k] ∂L/∂min_k / #ties + the same for max

The shift is held constant: every backend's statistics give the same scores
for any shift, so its own derivative cancels against those of the sums and is
dropped (its incoming gradient is ignored). Ties at the minimum or maximum
share its gradient evenly, as torch.amin/amax do; for sparse inputs the
implicit zeros count among the ties. With emb requiring grad, ∂L/∂Ê = B Gᵀ + ∂L/∂ΣÊ
goes through the row normalisation.

Cost: one (N, d) x (d, M) product for dense acts, O(nnz·d) for sparse ones. The
gradient with respect to acts (or the stored values) runs as one fused kernel per
input form, the statistics op's own backend's (`acts_grad_kernel`):

    "cpp":    the C++ ops monoscore_stats[_csr]_backward, where built for the device:
              csrc/cpu/monoscore_stats_backward_cpu.cpp, and on GPUs of compute
              capability 8.0+ csrc/cuda/monoscore_stats_backward_cuda.cu;
    "triton": the Triton ops monoscore_stats[_csr]_backward_triton
              (ops/triton_monoscore_stats_backward.py), on CUDA and under TRITON_INTERPRET=1;
    "torch":  the torch formula below: the plain-torch statistics ops' backward, and the
              fallback where the kernel asked for does not run on the device.

The gradient with respect to emb is the torch formula for every backend.

MonoLoss on sparse CPU activations runs one more op, monoloss_stats_csr (the statistics
and finalize's squared norms in one pass); its backward (`loss_csr_stats_backward`) is
the C++ CSR kernel forming ∂L/∂cross from cross, and gives no gradient for emb.
"""

import torch
from torch import Tensor

from . import _extension
from ._dispatch import available_backends, triton_runs_on
from .stats import entry_rows, ieee_matmul, row_inv_norm

try:  # registers the Triton backward ops; triton is optional
    from .ops import triton_monoscore_stats_backward  # noqa: F401

    HAS_TRITON_BACKWARD = True
except ImportError:
    HAS_TRITON_BACKWARD = False

# Entries per gathered (entries, d) block in the sparse backward.
ENTRIES_PER_BLOCK = 8192


def _tie_share(is_extreme: Tensor, grad: Tensor, num_ties: Tensor) -> Tensor:
    return is_extreme * (grad / num_ties.clamp(min=1))


def _emb_grad(emb: Tensor, inv_norm: Tensor, unit: Tensor, grad_unit: Tensor) -> Tensor:
    """∂L/∂emb from ∂L/∂Ê through Ê = emb / ‖emb‖ (zero rows: 0)."""
    radial = (unit * grad_unit).sum(1, keepdim=True)
    return ((grad_unit - unit * radial) * inv_norm[:, None]).to(emb.dtype)


# The CUDA kernels are built for these GPUs and newer (setup.py's arch list); an
# older GPU (a T4, say) can still run the Triton or torch forward, and gets the torch
# formula for the C++ kernel asked for.
MIN_CUDA_CAPABILITY = (8, 0)
# The fused kernels for ∂L/∂acts: (dense op, CSR op) of each; "torch" is the formula here.
ACTS_GRAD_KERNELS = ("cpp", "triton", "torch")
_KERNEL_OPS = {
    "cpp": (_extension.BACKWARD_OP, _extension.CSR_BACKWARD_OP),
    "triton": ("monoloss_kernels::monoscore_stats_backward_triton",
               "monoloss_kernels::monoscore_stats_csr_backward_triton"),
}
# The kernel paired with each `backend=` (the statistics op it ran).
_BACKEND_KERNELS = {"cpu": "cpp", "cuda": "cpp", "triton": "triton", "torch": "torch"}


def acts_grad_kernel_of(backend: str, device: torch.device) -> str:
    """The `acts_grad_kernel` paired with the statistics of `backend=` on `device`."""
    if backend == "auto":
        backend = available_backends(device)[0]
    return _BACKEND_KERNELS[backend]


def _acts_grad_op(acts_grad_kernel: str, device: torch.device, sparse: bool):
    """The op computing ∂L/∂acts with `acts_grad_kernel` on `device`, or None where that
    is the torch formula (asked for, or the kernel does not run on the device)."""
    if acts_grad_kernel not in ACTS_GRAD_KERNELS:
        raise ValueError(f"acts_grad_kernel must be one of {ACTS_GRAD_KERNELS}, got {acts_grad_kernel!r}")
    if acts_grad_kernel == "torch":
        return None
    name = _KERNEL_OPS[acts_grad_kernel][sparse]
    if acts_grad_kernel == "cpp":
        runs = _extension.has_kernel(device.type.upper(), name) and (
            device.type != "cuda" or torch.cuda.get_device_capability(device) >= MIN_CUDA_CAPABILITY
        )
    else:
        runs = HAS_TRITON_BACKWARD and triton_runs_on(device)
    return getattr(torch.ops.monoloss_kernels, name.split("::")[1]) if runs else None


def _zeros_if_none(grads, shapes, device):
    return [torch.zeros(shape, device=device) if g is None else g for g, shape in zip(grads, shapes)]


def dense_stats_grads(acts, emb, shift, act_range, grad_cross, grad_unit_emb_sum, grad_range, grad_moments, *,
                      acts_grad: bool, emb_grad: bool, acts_grad_kernel: str = "cpp"):
    """(∂L/∂acts, ∂L/∂emb) -- each None unless asked for -- given the gradients of the
    statistics of dense `acts` taken at `shift` (any grad may be None). grad_range[0, k]
    is shared by the entries equal to latent k's minimum, act_range[0, k], compared in
    float32 as the statistics saw them (by the kernels and the torch formula alike);
    likewise the maximum. `acts_grad_kernel`: "cpp", "triton" or "torch" (see above)."""
    num_latents, dim = acts.shape[1], emb.shape[1]
    kernel = _acts_grad_op(acts_grad_kernel, acts.device, sparse=False) if acts_grad else None
    if (acts_grad and kernel is None) or emb_grad:  # what the torch formulas read
        inv_norm = row_inv_norm(emb)
        unit = emb.float() * inv_norm[:, None]  # (N, d)
        b = acts.float() - shift  # (N, M)
    grad_acts = grad_emb = None
    if kernel is not None:
        grad_cross_, grad_moments_, grad_range_ = _zeros_if_none(
            (grad_cross, grad_moments, grad_range), ((dim, num_latents), (4, num_latents), (2, num_latents)),
            acts.device,
        )
        grad_acts = kernel(acts, emb, shift, act_range, grad_cross_, grad_moments_, grad_range_)
    elif acts_grad:
        grad = ieee_matmul(unit, grad_cross.float()) if grad_cross is not None else torch.zeros_like(b)
        if grad_moments is not None:
            g = grad_moments.float()
            grad += g[0] + 2 * b * g[1]
            zero_rows = (inv_norm == 0)[:, None]
            grad += zero_rows * (g[2] + 2 * b * g[3])
        if grad_range is not None:
            # Ties as the kernels count them: acts rounded to float32 against the float32
            # act_range (float64 entries 1e-12 apart are one tie there, as in the statistics).
            acts32 = acts.float()
            for extreme, g in zip(act_range.float(), grad_range.float()):
                is_extreme = acts32 == extreme
                grad += _tie_share(is_extreme, g, is_extreme.sum(0))
        grad_acts = grad.to(acts.dtype)
    if emb_grad:
        grad_unit = torch.zeros_like(unit)
        if grad_cross is not None:
            grad_unit += ieee_matmul(b, grad_cross.float().T)
        if grad_unit_emb_sum is not None:
            grad_unit += grad_unit_emb_sum.float()
        grad_emb = _emb_grad(emb, inv_norm, unit, grad_unit)
    return grad_acts, grad_emb


def csr_stats_grads(crow_indices, cols, values, emb, num_latents, shift, act_range, grad_cross, grad_unit_emb_sum,
                    grad_range, grad_moments, *, values_grad: bool, emb_grad: bool, acts_grad_kernel: str = "cpp"):
    """`dense_stats_grads` for sparse activations in CSR form: (∂L/∂values, ∂L/∂emb).
    The implicit zeros count among the entries tied with act_range (no gradient
    reaches them)."""
    num_rows, dim = crow_indices.shape[0] - 1, emb.shape[1]
    kernel = _acts_grad_op(acts_grad_kernel, values.device, sparse=True) if values_grad else None
    if (values_grad and kernel is None) or emb_grad:  # what the torch formulas read
        rows = entry_rows(crow_indices, cols.shape[0])
        inv_norm = row_inv_norm(emb)
        unit = emb.float() * inv_norm[:, None]
        b = values.float() - shift[cols]  # (nnz,)
    grad_cross_t = grad_cross.float().T if grad_cross is not None else None  # (M, d)
    grad_values = grad_emb = None
    if kernel is not None:
        grad_cross_, grad_moments_, grad_range_ = _zeros_if_none(
            (grad_cross, grad_moments, grad_range), ((dim, num_latents), (4, num_latents), (2, num_latents)),
            values.device,
        )
        grad_values = kernel(
            crow_indices, cols, values, emb, num_latents, shift, act_range, grad_cross_, grad_moments_, grad_range_
        )
    elif values_grad:
        grad = torch.zeros_like(b)
        if grad_cross_t is not None:
            for e0 in range(0, b.shape[0], ENTRIES_PER_BLOCK):  # Σ_d Ê[row_e, d] G[d, col_e], blockwise
                e = slice(e0, e0 + ENTRIES_PER_BLOCK)
                grad[e] = (unit[rows[e]] * grad_cross_t[cols[e]]).sum(1)
        if grad_moments is not None:
            g = grad_moments.float()[:, cols]  # (4, nnz)
            grad += g[0] + 2 * b * g[1] + (inv_norm[rows] == 0) * (g[2] + 2 * b * g[3])
        if grad_range is not None:
            stored = torch.zeros(num_latents, device=emb.device, dtype=b.dtype).index_add_(0, cols, torch.ones_like(b))
            implicit_zeros = num_rows - stored
            # act_range covers the implicit zeros; ties counted in float32, as the kernels do.
            values32 = values.float()
            for extreme, g in zip(act_range.float(), grad_range.float()):
                is_extreme = values32 == extreme[cols]
                num_ties = torch.zeros_like(stored).index_add_(0, cols, is_extreme.to(stored.dtype))
                num_ties += torch.where(extreme == 0, implicit_zeros, 0)
                grad += _tie_share(is_extreme, g[cols], num_ties[cols])
        grad_values = grad.to(values.dtype)
    if emb_grad:
        grad_unit = torch.zeros_like(unit)
        if grad_cross_t is not None:
            for e0 in range(0, b.shape[0], ENTRIES_PER_BLOCK):
                e = slice(e0, e0 + ENTRIES_PER_BLOCK)
                grad_unit.index_add_(0, rows[e], grad_cross_t[cols[e]] * b[e, None])
        if grad_unit_emb_sum is not None:
            grad_unit += grad_unit_emb_sum.float()
        grad_emb = _emb_grad(emb, inv_norm, unit, grad_unit)
    return grad_values, grad_emb


# The backward functions registered with the ops, one per acts-gradient kernel. The
# gradients of shift and counts are ignored (see above). The tests gradcheck
# dense_stats_backward_torch in float64, where the float32 kernels could not be.
def _dense_backward_using(acts_grad_kernel: str):
    def dense_stats_backward(ctx, grad_cross, grad_unit_emb_sum, _grad_shift, grad_range, grad_moments,
                             _grad_counts):
        acts, emb, shift, act_range = ctx.saved_tensors
        return dense_stats_grads(acts, emb, shift, act_range, grad_cross, grad_unit_emb_sum, grad_range,
                                 grad_moments, acts_grad=ctx.needs_input_grad[0], emb_grad=ctx.needs_input_grad[1],
                                 acts_grad_kernel=acts_grad_kernel)

    return dense_stats_backward


DENSE_STATS_BACKWARD = {kernel: _dense_backward_using(kernel) for kernel in ACTS_GRAD_KERNELS}
dense_stats_backward_torch = DENSE_STATS_BACKWARD["torch"]


def dense_setup_context(ctx, inputs, output):
    acts, emb = inputs
    _, _, shift, act_range, _, _ = output
    ctx.save_for_backward(acts, emb, shift, act_range)


def _csr_backward_using(acts_grad_kernel: str):
    def csr_stats_backward(ctx, grad_cross, grad_unit_emb_sum, _grad_shift, grad_range, grad_moments, _grad_counts):
        crow_indices, cols, values, emb, shift, act_range = ctx.saved_tensors
        grad_values, grad_emb = csr_stats_grads(
            crow_indices, cols, values, emb, ctx.num_latents, shift, act_range, grad_cross, grad_unit_emb_sum,
            grad_range, grad_moments, values_grad=ctx.needs_input_grad[2], emb_grad=ctx.needs_input_grad[3],
            acts_grad_kernel=acts_grad_kernel,
        )
        return None, None, grad_values, grad_emb, None

    return csr_stats_backward


CSR_STATS_BACKWARD = {kernel: _csr_backward_using(kernel) for kernel in ACTS_GRAD_KERNELS}
csr_stats_backward_torch = CSR_STATS_BACKWARD["torch"]


def csr_setup_context(ctx, inputs, output):
    crow_indices, col_indices, values, emb, num_latents = inputs
    ctx.num_latents = num_latents
    _, _, shift, act_range, _, _ = output
    ctx.save_for_backward(crow_indices, col_indices, values, emb, shift, act_range)


def loss_csr_setup_context(ctx, inputs, output):
    crow_indices, col_indices, values, emb, num_latents = inputs
    cross, unit_emb_sum, shift, act_range, _, _, _, entry_order = output
    ctx.num_latents = num_latents
    ctx.set_materialize_grads(False)  # None, not zeros, for the outputs the loss does not use (cross)
    ctx.save_for_backward(crow_indices, col_indices, values, emb, shift, act_range, cross, unit_emb_sum, entry_order)


def loss_csr_stats_backward(ctx, grad_cross, grad_unit_emb_sum, _grad_shift, grad_range, grad_moments, _grad_counts,
                            grad_cross_sq_at_min, _grad_entry_order):
    """The backward of monoloss_stats_csr: ∂L/∂values in one kernel, which forms ∂L/∂cross
    from cross and the gradient of cross_sq_at_min (cross's only use in finalize) and
    reads the entries in the order the forward sorted them (entry_order). A
    gradient reaching cross itself (another use, or zeros under torch.compile, which
    materialises the gradients of unused outputs) takes a second pass, the statistics
    op's backward. No gradient for emb: the loss takes monoscore_stats_csr where emb
    needs one (`_dispatch.loss_stats_function`)."""
    if ctx.needs_input_grad[3]:
        raise RuntimeError("monoloss_stats_csr gives no gradient for emb; for emb use monoscore_stats_csr")
    if not ctx.needs_input_grad[2]:
        return None, None, None, None, None
    crow_indices, col_indices, values, emb, shift, act_range, cross, unit_emb_sum, entry_order = ctx.saved_tensors
    num_latents = ctx.num_latents
    grad_cross_sq_at_min, grad_moments, grad_range = _zeros_if_none(
        (grad_cross_sq_at_min, grad_moments, grad_range), ((num_latents,), (4, num_latents), (2, num_latents)),
        values.device,
    )
    grad_values = torch.ops.monoloss_kernels.monoloss_stats_csr_backward(
        crow_indices, col_indices, values, emb, num_latents, shift, act_range, cross, unit_emb_sum, entry_order,
        grad_cross_sq_at_min, grad_moments, grad_range,
    )
    if grad_cross is not None:
        no_grad = torch.zeros_like(grad_moments), torch.zeros_like(grad_range)
        grad_values = grad_values + torch.ops.monoloss_kernels.monoscore_stats_csr_backward(
            crow_indices, col_indices, values, emb, num_latents, shift, act_range, grad_cross, *no_grad
        )
    return None, None, grad_values, None, None


# Each statistics op and the kernel its backward computes ∂L/∂acts with.
DENSE_STATS_OPS = {
    "monoloss_kernels::monoscore_stats": "cpp",
    "monoloss_kernels::monoscore_stats_triton": "triton",
    "monoloss_kernels::monoscore_stats_torch": "torch",
}
CSR_STATS_OPS = {
    "monoloss_kernels::monoscore_stats_csr": "cpp",
    "monoloss_kernels::monoscore_stats_csr_triton": "triton",
    "monoloss_kernels::monoscore_stats_csr_torch": "torch",
}


def _exists(name: str) -> bool:
    namespace, op = name.split("::")
    return hasattr(getattr(torch.ops, namespace), op)


def register() -> None:
    """Registers the backward for each op that exists (the C++ and Triton ones are optional)."""
    for ops, backwards, setup_context in (
        (DENSE_STATS_OPS, DENSE_STATS_BACKWARD, dense_setup_context),
        (CSR_STATS_OPS, CSR_STATS_BACKWARD, csr_setup_context),
    ):
        for name, acts_grad_kernel in ops.items():
            if _exists(name):
                torch.library.register_autograd(name, backwards[acts_grad_kernel], setup_context=setup_context)
    if _exists(_extension.LOSS_CSR_STATS_OP):
        torch.library.register_autograd(_extension.LOSS_CSR_STATS_OP, loss_csr_stats_backward,
                                        setup_context=loss_csr_setup_context)
