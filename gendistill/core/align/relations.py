"""Token relations and the Token Relation Distillation (TRD) loss of VideoREPA.

A video's tokens `[B, T, N, D]` (T frames of N tokens) are L2-normalized along D; the
relation of two tokens is their cosine, so one clip gives a `[T*N, T*N]` relation matrix.
TRD makes the student's relation matrix follow the teacher's, up to a margin::

    L = mean relu(|S_student - S_teacher| - margin)

Relations are computed within each model, so the student and teacher widths may differ.

What the released VideoREPA code (`finetune/models/cogvideox_t2v_align/lora_trainer.py`)
averages over, and what `reduction` reproduces:

- ``"joint"`` (their ``--loss token_relation_distillation``): the mean over the whole
  `B x (T*N) x (T*N)` matrix, diagonal included (the diagonal is 1 on both sides, so it adds
  zero to the sum but counts in the denominator).
- ``"paper"``: their ``..._only_spatial`` term plus their ``..._only_temporal`` term. Spatial:
  the mean over the `B x T x N x N` same-frame pairs, diagonal included. Temporal: the mean over
  the `B x T x (T-1) x N x N` ordered pairs of two different frames. With T = 1 there are no
  cross-frame pairs and the temporal term is 0.

Memory: the plain path holds several `(T*N)^2` matrices (1.2 GB each in float32 at
13 x 1350 tokens). With `chunk_size` the loss runs over blocks of rows inside a custom
autograd Function; since the loss is a scalar, the forward pass also forms the gradient with
respect to the input tokens block by block (normalization included; the unit tokens are never
stored) and keeps only that (`O(T*N*D)`), so the backward pass is a scale of it and nothing is
recomputed. Extra memory is that gradient plus two `chunk_size x T*N` blocks. On CPU at
13 x 1350 tokens, D = 768 (tools/bench_align.py): peak 134 MB vs 4.8 GB, and no slower.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake
from einops import rearrange

REDUCTIONS = ("joint", "paper")
_EPS = 1e-12  # F.normalize's default

# Up to this many relation entries (B * (T*N)^2) the plain path is used when chunk_size is None;
# above it the chunked path is both leaner and (it skips half the matmuls of autograd) faster.
AUTO_UNCHUNKED_MAX = 1024 * 1024
# Target number of entries of one `chunk x T*N` block on the chunked path.
AUTO_BLOCK_ENTRIES = 1 << 22


def trd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    margin: float = 0.1,
    reduction: str = "joint",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Token Relation Distillation loss between student and teacher tokens.

    Args:
        student: [B, T, N, Ds] tokens (T frames of N tokens); any float dtype.
        teacher: [B, T, N, Dt] tokens; Dt may differ from Ds. Usually detached, but gradients
            flow to it too when it requires them.
        margin: hinge margin (>= 0); relation differences up to it cost nothing.
        reduction: "joint" (mean over the whole (T*N)^2 matrix, the released VideoREPA code) or
            "paper" (same-frame mean + cross-frame mean); see the module docstring.
        chunk_size: rows of the relation matrix per block on the memory-bounded path. None picks
            automatically: the plain path when B*(T*N)^2 <= 1024^2, else blocks of about 4M
            entries (238 rows at 13 x 1350 tokens). The value does not change the result.

    Returns:
        [] scalar in float32 (float64 for float64 inputs), computed with autocast disabled.
    """
    _check_pair(student, teacher)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    margin = float(margin)
    if not margin >= 0.0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    B, T, N, _ = student.shape
    M = T * N
    if chunk_size is None:
        chunk_size = _auto_chunk_size(B, M)  # None: plain path
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    with _no_autocast(student.device):
        if chunk_size is None:
            x = _normalized_tokens(student)
            y = _normalized_tokens(teacher).to(x.dtype)
            loss = _trd_dense(x, y, margin, reduction, T)
        else:
            dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
            s = rearrange(student.to(dtype), "b t n d -> b (t n) d").contiguous()
            t = rearrange(teacher.to(dtype), "b t n d -> b (t n) d").contiguous()
            loss = _ChunkedTRD.apply(s, t, margin, reduction, T, min(chunk_size, M))
    _check_finite(loss, student, teacher)
    return loss


def relation_matrices(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine relation matrices of student and teacher, for inspection.

    Args:
        student: [B, T, N, Ds] tokens.
        teacher: [B, T, N, Dt] tokens.

    Returns:
        (S_student, S_teacher), each [B, T*N, T*N] float32 (float64 for float64 inputs); row and
        column index t*N + n is token n of frame t.
    """
    _check_pair(student, teacher)
    with _no_autocast(student.device):
        x = _normalized_tokens(student)
        y = _normalized_tokens(teacher)
        return x @ x.transpose(1, 2), y @ y.transpose(1, 2)


def trd_loss_reference(
    student: torch.Tensor, teacher: torch.Tensor, *, margin: float = 0.1, reduction: str = "joint"
) -> torch.Tensor:
    """Plain autograd TRD on full [B, T*N, T*N] matrices; the oracle for the chunked path."""
    _check_pair(student, teacher)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    T = student.shape[1]
    with _no_autocast(student.device):
        x = _normalized_tokens(student)
        y = _normalized_tokens(teacher).to(x.dtype)
        return _trd_dense(x, y, float(margin), reduction, T)


# ----------------------------------------------------------------------------- internals


def _auto_chunk_size(B: int, M: int) -> int | None:
    """Rows per block for chunk_size=None, or None for the plain path (small inputs)."""
    if B * M * M <= AUTO_UNCHUNKED_MAX:
        return None
    return max(64, min(M, AUTO_BLOCK_ENTRIES // M))


def _normalized_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[B, T, N, D] -> [B, T*N, D] unit vectors in float32 (float64 kept)."""
    dtype = torch.promote_types(tokens.dtype, torch.float32)
    return F.normalize(rearrange(tokens.to(dtype), "b t n d -> b (t n) d"), dim=-1)


def _trd_dense(x: torch.Tensor, y: torch.Tensor, margin: float, reduction: str, T: int) -> torch.Tensor:
    """TRD with autograd on full matrices. x: [B, M, Ds], y: [B, M, Dt] unit tokens, M = T*N."""
    hinge = F.relu((x @ x.transpose(1, 2) - y @ y.transpose(1, 2)).abs() - margin)
    if reduction == "joint":
        return hinge.mean()
    blocks = rearrange(hinge, "b (t n) (u m) -> b t u n m", t=T, u=T)
    same = torch.diagonal(blocks, dim1=1, dim2=2)  # [B, N, N, T]
    spatial = same.mean()
    if T == 1:
        return spatial
    B, _, N, _ = same.shape
    temporal = (hinge.sum() - same.sum()) / (B * T * (T - 1) * N * N)
    return spatial + temporal


def _pair_weights(B: int, T: int, N: int, reduction: str) -> tuple[float, float]:
    """(weight of a same-frame pair, weight of a cross-frame pair) in the loss sum."""
    if reduction == "joint":
        w = 1.0 / (B * (T * N) ** 2)
        return w, w
    w_cross = 1.0 / (B * T * (T - 1) * N * N) if T > 1 else 0.0
    return 1.0 / (B * T * N * N), w_cross


class _ChunkedTRD(torch.autograd.Function):
    """TRD over row blocks of the relation matrix; forward stores d loss / d tokens.

    For one clip with raw tokens s [M, Ds], unit tokens x = s / |s|, y likewise, S = x x^T,
    G = y y^T and pair weights W, L = sum W * relu(|S - G| - m). With
    E = W * sign(S - G) * [|S - G| > m] (symmetric), dL/dx = (E + E^T) x = 2 E x and
    dL/dy = -2 E y, and through the normalization dL/ds = (g - x <x, g>) / |s| for g = dL/dx.
    Row block r of each needs only row block r of E, so forward keeps only [B, M, D] gradients
    and backward scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, margin, reduction, T, chunk):
        B, M, _ = student.shape
        N = M // T
        w_same, w_cross = _pair_weights(B, T, N, reduction)
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # 1 / |token|: the unit tokens are never materialized; a c x D row block is normalized
        # before each matmul and the columns are scaled on the c x M result.
        inv_s, clamped_s = _inverse_norms(student)  # [B, M, 1]
        inv_t, clamped_t = _inverse_norms(teacher)
        grad_s = torch.empty_like(student) if need_s else None
        grad_t = torch.empty_like(teacher) if need_t else None
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for b in range(B):
            sb, tb = student[b], teacher[b]
            col_s, col_t = inv_s[b].t(), inv_t[b].t()  # [1, M]
            for r0 in range(0, M, chunk):
                r1 = min(r0 + chunk, M)
                xr, yr = sb[r0:r1] * inv_s[b, r0:r1], tb[r0:r1] * inv_t[b, r0:r1]  # unit rows [c, D]
                diff = torch.mm(xr, sb.t()).mul_(col_s)  # S block [c, M]
                diff.addcmul_(torch.mm(yr, tb.t()), col_t, value=-1.0)  # S - G
                # softshrink(d, m) = sign(d) relu(|d| - m): |.| is the hinge, sign(.) its gradient
                e = F.softshrink(diff, margin)
                del diff
                total += _block_loss(e, r0, r1, T, N, w_same, w_cross, reduction)
                if not (need_s or need_t):
                    continue
                e.sign_()
                _weight_block(e, r0, r1, T, N, w_same, w_cross, reduction)
                if need_t:  # d/dy = -2 E y, with y = t * inv_t (columns)
                    g = torch.mm(e * col_t, tb, out=grad_t[b, r0:r1])
                    _unnormalize_grad(g, yr, inv_t[b, r0:r1], clamped_t[b, r0:r1])
                if need_s:  # d/dx = 2 E x
                    g = torch.mm(e.mul_(col_s), sb, out=grad_s[b, r0:r1])
                    _unnormalize_grad(g, xr, inv_s[b, r0:r1], clamped_s[b, r0:r1])
                del e
        scale = 2.0 * (w_same if reduction == "joint" else 1.0)
        if need_s:
            grad_s.mul_(scale)
        if need_t:
            grad_t.mul_(-scale)
        ctx.save_for_backward(grad_s, grad_t)
        return total.to(student.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        grad_s, grad_t = ctx.saved_tensors
        # With grad_out == 1 (loss.backward()) hand the stored tensors over: autograd copies them
        # if the graph is retained and takes them over otherwise, so nothing is mutated.
        one = not is_fake(grad_out) and bool(grad_out == 1)  # fake tensors (`gendistill plan`) have no value
        gs = None if grad_s is None else (grad_s if one else grad_s * grad_out)
        gt = None if grad_t is None else (grad_t if one else grad_t * grad_out)
        return gs, gt, None, None, None, None


def _inverse_norms(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, M, D] -> (1 / max(|token|, eps) [B, M, 1], clamped [B, M, 1] bool), eps as F.normalize."""
    norm = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True)
    clamped = norm < _EPS
    return norm.clamp_min_(_EPS).reciprocal_(), clamped


def _unnormalize_grad(g: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor, clamped: torch.Tensor) -> None:
    """In place: gradient wrt unit tokens x [c, D] -> wrt the raw tokens (x / inv_norm [c, 1]).

    Matches F.normalize's autograd: where the norm was clamped at eps only g / eps remains.
    """
    dot = (x * g).sum(dim=-1, keepdim=True)
    dot.masked_fill_(clamped, 0.0)
    g.sub_(x * dot).mul_(inv_norm)


def _same_frame_index(r0: int, r1: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row positions 0..c-1 and each row's frame, to index a block viewed as [c, T, N]."""
    rows = torch.arange(r0, r1, device=device)
    return rows - r0, torch.div(rows, N, rounding_mode="floor")


def _block_loss(shrunk, r0, r1, T, N, w_same, w_cross, reduction) -> torch.Tensor:
    """Weighted hinge sum of one [c, M] softshrink block (hinge = |shrunk|), as float64."""
    hinge = shrunk
    total = hinge.abs().sum().double()  # (vector_norm(ord=1) sums less accurately)
    if reduction == "joint":
        return total * w_same
    local, frame = _same_frame_index(r0, r1, N, hinge.device)
    same = rearrange(hinge, "c (t n) -> c t n", t=T)[local, frame].abs().sum(dtype=torch.float64)
    return same * w_same + (total - same) * w_cross


def _weight_block(grad_s, r0, r1, T, N, w_same, w_cross, reduction) -> None:
    """In place: apply the pair weights of "paper" to a [c, M] block (joint is scaled later)."""
    if reduction == "joint":
        return
    local, frame = _same_frame_index(r0, r1, N, grad_s.device)
    view = rearrange(grad_s, "c (t n) -> c t n", t=T)
    same = view[local, frame] * w_same
    grad_s.mul_(w_cross)
    view[local, frame] = same


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    """ValueError naming what does not match between [B, T, N, D] student and teacher."""
    for name, t in (("student", student), ("teacher", teacher)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, T, N, D] (4 dims), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty: shape {tuple(t.shape)}")
    for i, what in enumerate(("batch size {}", "{} frames", "{} tokens per frame")):
        s, t = student.shape[i], teacher.shape[i]
        if s != t:
            raise ValueError(
                f"student has {what.format(s)}, teacher {t} "
                f"(shapes {tuple(student.shape)} and {tuple(teacher.shape)})"
            )
    if student.device != teacher.device:
        raise ValueError(f"student is on {student.device}, teacher on {teacher.device}")


def _check_finite(loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, name: str = "TRD") -> None:
    """One scalar check; on failure, name the input holding NaN/inf (skipped for fake tensors: no values)."""
    if is_fake(loss) or bool(torch.isfinite(loss)):
        return
    for name, t in (("student", student), ("teacher", teacher)):
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            raise ValueError(f"{name} features contain {int(bad.sum())} NaN/inf values (of {t.numel()})")
    raise ValueError(f"{name} loss is not finite ({loss.item()}) although the inputs are")


def _no_autocast(device: torch.device):
    """Disable autocast on `device` so the relations run in float32."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


__all__ = ["trd_loss", "relation_matrices", "trd_loss_reference", "REDUCTIONS"]
