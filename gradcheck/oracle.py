"""The exact guidance gradient of the empirical noisy posterior (docs/maths.md D8).

For the training set {(x_i, y_i)}, i = 1..N, the forward process turns the empirical distribution
into a mixture of Gaussians, q(x_t) = 1/N sum_i N(x_t; sqrt(abar_t) x_i, (1 - abar_t) I), so

    w_i(x_t) = softmax_i( -||x_t - sqrt(abar_t) x_i||^2 / (2 (1 - abar_t)) )
    q(y | x_t) = sum_{i: y_i = y} w_i(x_t)
    grad_{x_t} log q(y | x_t) = sqrt(abar_t) / (1 - abar_t) * (E_w[x_i | y_i = y] - E_w[x_i]).

This is what a perfect classifier of the training data would give as guidance. At small t the
posterior collapses onto the nearest training image (w becomes one-hot), so the oracle there is a
nearest-neighbour classifier and its gradient points from that image to the nearest image of y.

Numerics (docs/maths.md D8): a streaming log-sum-exp over class-sorted chunks of the training
set, in float64, with logits (2 sqrt(abar) <x_t, x_i> - abar ||x_i||^2) / (2 (1 - abar)) (the
||x_t||^2 term cancels in every softmax).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gradcheck import CLASS_NAMES
from gradcheck.utils import GradcheckError, resolve_device

_F64 = torch.float64


class EmpiricalOracle(nn.Module):
    """The empirical posterior q(y | x_t) of a labelled image set under the DDPM forward process.

    Calling the module, ``oracle(x_t, t)``, is the same as :meth:`log_prob`: (B, C) log
    probabilities that autograd differentiates exactly (D8), so the oracle can stand in for a
    classifier (log q is already normalised, so log_softmax leaves it unchanged). Unlike a
    classifier it always needs ``t``.
    """

    time_aware = True  # called as model(x_t, t) (models.classifier_logits)

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        chunk_size: int = 4096,
    ) -> None:
        """images (N, 3, H, W) in [-1, 1], labels (N,) int, alphas_cumprod (T,) of the schedule."""
        super().__init__()
        if images.dim() != 4 or not images.is_floating_point():
            raise GradcheckError(
                f"oracle images must be a float tensor (N, 3, H, W), got {tuple(images.shape)} "
                f"{images.dtype}"
            )
        if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
            raise GradcheckError(
                f"oracle labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        if images.shape[0] == 0:
            raise GradcheckError("oracle needs at least one training image, got 0")
        labels = labels.to(device=images.device, dtype=torch.long)
        num_classes = len(CLASS_NAMES)
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise GradcheckError(
                f"oracle labels must lie in 0..{num_classes - 1}, got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        abar = torch.as_tensor(alphas_cumprod).to(device=images.device, dtype=_F64)
        if abar.dim() != 1 or not bool(((abar > 0) & (abar < 1)).all()):
            raise GradcheckError("alphas_cumprod must be a 1-D tensor with values in (0, 1)")
        if chunk_size < 1:
            raise GradcheckError(f"oracle chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.num_classes = num_classes
        self.image_shape = tuple(images.shape[1:])
        # Stored sorted by class, so every chunk is a contiguous slice of one class and feeds
        # that class's running sums; ``order[k]`` is the training index of stored row k. On a
        # GPU the copy is float64 (3.9 GB for 40k 64x64 images): chunks are read without a
        # cast, halving the memory traffic of a bandwidth-bound call. On the CPU it keeps the
        # given dtype (float32 from the data set, half the RAM) and chunks are cast when read.
        order = torch.sort(labels, stable=True).indices
        flat = images.detach().reshape(images.shape[0], -1).index_select(0, order)
        if flat.is_cuda:
            flat = flat.to(_F64)
        self.register_buffer("images", flat, False)
        self.register_buffer("labels", labels[order], False)
        self.register_buffer("order", order, False)
        self.register_buffer("alphas_cumprod", abar, False)
        sq = torch.cat([c.to(_F64).square().sum(1) for c in flat.split(self.chunk_size)])
        self.register_buffer("sq_norms", sq, False)
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        self.class_counts: list[int] = counts  # training images per class, on the host
        self._chunks: list[tuple[int, int, int]] = []  # (class, first row, end row)
        start = 0
        for c, n_c in enumerate(counts):
            for lo in range(start, start + n_c, self.chunk_size):
                self._chunks.append((c, lo, min(lo + self.chunk_size, start + n_c)))
            start += n_c

    @classmethod
    def from_data_root(
        cls,
        data_root: str | Path,
        alphas_cumprod: torch.Tensor,
        device: str | torch.device = "auto",
        split: str = "train",
        chunk_size: int = 4096,
    ) -> EmpiricalOracle:
        """The oracle of one split of a generated SportBalls data set, held on ``device``."""
        from gradcheck.data.sportballs import load_tensors

        dev = resolve_device(device)
        root = Path(data_root)
        if not root.is_dir():
            raise GradcheckError(
                f"the oracle needs the {split} set, but there is no data set at {root}; "
                "generate it with `gradcheck make-dataset` or pass --data-root"
            )
        try:
            images, labels = load_tensors(root, split, device=dev)
        except (FileNotFoundError, OSError) as e:
            raise GradcheckError(
                f"the oracle cannot read the {split} set of {root}: {e}; "
                "generate it with `gradcheck make-dataset`"
            ) from None
        return cls(images, labels, alphas_cumprod, chunk_size=chunk_size)

    @property
    def num_train(self) -> int:
        """N, the number of training images."""
        return self.images.shape[0]

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), t -> (B, C) log q(y | x_t); the oracle as a classifier."""
        return self.log_prob(x_t, t)

    # ---- public API ------------------------------------------------------------------------

    def log_prob(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x_t (B, 3, H, W), t int or (B,) -> (B, C) log q(y | x_t) for every class, x_t's dtype.

        Differentiable in x_t: the backward pass is the closed form of D8, not autograd through
        the chunks. Classes without training images get -inf.
        """
        if torch.is_grad_enabled() and x_t.requires_grad:
            return _OracleLogProb.apply(x_t, self._abar(t, x_t), self)
        with torch.no_grad():
            m, z, _ = self._stream(self._flat(x_t), self._abar(t, x_t), with_sums=False)
        return _log_posterior(m, z).to(device=x_t.device, dtype=x_t.dtype)

    def grad_log_prob(
        self, x_t: torch.Tensor, t: int | torch.Tensor, y: int | torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """x_t (B, 3, H, W), t, y (int or (B,)) -> (B, 3, H, W) grad_{x_t} log q(y | x_t),
        closed form D8, in ``dtype`` (x_t's by default; float64 keeps a gradient that float32
        would flush to 0). With int t and y the checks run on the host (no device sync)."""
        if isinstance(y, int) and not isinstance(y, bool):
            classes = [y]
            y = torch.full((x_t.shape[0],), y, dtype=torch.long, device=self.images.device)
        else:
            y = torch.as_tensor(y, device=self.images.device, dtype=torch.long).reshape(-1)
            classes = y.unique().tolist()
        if y.shape[0] != x_t.shape[0]:
            raise GradcheckError(f"oracle got {x_t.shape[0]} images but {y.shape[0]} labels")
        if min(classes) < 0 or max(classes) >= self.num_classes:
            raise GradcheckError(f"oracle target must lie in 0..{self.num_classes - 1}")
        empty = [c for c in classes if self.class_counts[c] == 0]
        if empty:
            raise GradcheckError(
                f"the oracle's training set has no image of class {CLASS_NAMES[empty[0]]}; "
                "its gradient is undefined"
            )
        with torch.no_grad():
            log_q, coef, means = self._moments(self._flat(x_t), self._abar(t, x_t))
            v = torch.nn.functional.one_hot(y, self.num_classes).to(_F64)
            g = _gradient(v, log_q, coef, means)
        return g.reshape(x_t.shape).to(device=x_t.device, dtype=dtype or x_t.dtype)

    def weights(self, x_t: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
        """x_t (B, 3, H, W), t -> (B, N) posterior weights w_i(x_t) of D8, training-set order."""
        with torch.no_grad():
            x, abar = self._flat(x_t), self._abar(t, x_t)
            logits = torch.empty(x.shape[0], self.num_train, dtype=_F64, device=x.device)
            scratch = self._scratch()
            for _, lo, hi in self._chunks:
                logits[:, self.order[lo:hi]] = self._logits(x, abar, lo, hi, scratch)[0]
            w = torch.softmax(logits, dim=1)
        return w.to(device=x_t.device, dtype=x_t.dtype)

    # ---- internals -------------------------------------------------------------------------

    def _flat(self, x_t: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) float64 on the oracle's device."""
        if tuple(x_t.shape[1:]) != self.image_shape:
            raise GradcheckError(
                f"oracle images are {self.image_shape}, got x_t of shape {tuple(x_t.shape)}"
            )
        return x_t.detach().to(device=self.images.device, dtype=_F64).reshape(x_t.shape[0], -1)

    def _abar(self, t: int | torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """t (int, 0-d or (B,) timestep indices) -> abar_t (B,) float64."""
        n_t = self.alphas_cumprod.shape[0]
        if isinstance(t, int) and not isinstance(t, bool):
            # Checked on the host and indexed with a Python int: no device sync in a loop.
            if not 0 <= t < n_t:
                raise GradcheckError(f"oracle timestep t must lie in 0..{n_t - 1}, got {t}")
            return self.alphas_cumprod[t].expand(x_t.shape[0])
        tt = torch.as_tensor(t, device=self.images.device).reshape(-1).long()
        if tt.numel() == 0 or int(tt.min()) < 0 or int(tt.max()) >= n_t:
            raise GradcheckError(f"oracle timestep t must lie in 0..{n_t - 1}, got {t}")
        if tt.numel() not in (1, x_t.shape[0]):
            raise GradcheckError(f"oracle got {tt.numel()} timesteps for {x_t.shape[0]} images")
        return self.alphas_cumprod[tt].expand(x_t.shape[0])

    def _scratch(self) -> torch.Tensor | None:
        """A float64 buffer for one chunk when the stored images are not float64: refilled in
        place, because allocating a fresh 400 MB cast per chunk costs as much as its matmul."""
        if self.images.dtype == _F64:
            return None
        rows = min(self.chunk_size, self.num_train)
        return torch.empty(rows, self.images.shape[1], dtype=_F64, device=self.images.device)

    def _logits(
        self, x: torch.Tensor, abar: torch.Tensor, lo: int, hi: int, scratch: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """D8 logits (B, n) of stored rows lo..hi, up to a per-row constant; and the chunk (n, D)
        in float64. -||x - sqrt(a) x_i||^2 = 2 sqrt(a) <x, x_i> - a ||x_i||^2 - ||x||^2; the
        last term is dropped because it cancels in every softmax over i."""
        chunk = self.images[lo:hi]
        if scratch is not None:
            chunk = scratch[:hi - lo].copy_(chunk)
        inner = x @ chunk.T
        logits = (2 * abar.sqrt()[:, None] * inner - abar[:, None] * self.sq_norms[None, lo:hi])
        return logits / (2 * (1 - abar))[:, None], chunk

    def _stream(
        self, x: torch.Tensor, abar: torch.Tensor, with_sums: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Streaming log-sum-exp over the training set, per sample and class.

        Returns m (B, C) running maxima of the logits, z (B, C) = sum_{i in c} exp(l_i - m_c),
        and with ``with_sums`` s (B, C, D) = sum_{i in c} exp(l_i - m_c) x_i.
        """
        b, c = x.shape[0], self.num_classes
        m = torch.full((b, c), float("-inf"), dtype=_F64, device=x.device)
        z = torch.zeros(b, c, dtype=_F64, device=x.device)
        s = torch.zeros(b, c, x.shape[1], dtype=_F64, device=x.device) if with_sums else None
        scratch = self._scratch()
        for cls_, lo, hi in self._chunks:
            logits, chunk = self._logits(x, abar, lo, hi, scratch)
            m_new = torch.maximum(m[:, cls_], logits.amax(dim=1))
            scale = torch.exp(m[:, cls_] - m_new)  # exp(-inf) = 0 for a class not yet seen
            p = torch.exp(logits - m_new[:, None])
            z[:, cls_] = z[:, cls_] * scale + p.sum(dim=1)
            if s is not None:
                s[:, cls_] = s[:, cls_] * scale[:, None] + p @ chunk
            m[:, cls_] = m_new
        return m, z, s

    def _moments(
        self, x: torch.Tensor, abar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, D), abar (B,) -> log q(c | x_t) (B, C), coef (B,) = sqrt(abar) / (1 - abar) and
        E_w[x_i | y_i = c] (B, C, D)."""
        m, z, s = self._stream(x, abar, with_sums=True)
        # A class without training images has z = 0 and q = 0: its mean is never used.
        means = torch.where(z[..., None] > 0, s / z.clamp_min(1e-300)[..., None], 0.0)
        return _log_posterior(m, z), abar.sqrt() / (1 - abar), means


def _gradient(
    v: torch.Tensor, log_q: torch.Tensor, coef: torch.Tensor, means: torch.Tensor
) -> torch.Tensor:
    """sum_c v_c grad_x log q(c | x_t) (D8): v (B, C), log_q (B, C), coef (B,), means (B, C, D)
    -> (B, D) float64.

    grad log q(c | x) = coef (E[x | c] - E[x]), and E[x | c] - E[x] is summed as
    sum_k q_k (E[x | c] - E[x | k]): subtracting E[x] itself cancels to 0 where q(c | x) rounds
    to 1, while the pairwise form keeps the exact, tiny gradient there.
    """
    q = log_q.exp()[..., None]
    g = torch.zeros_like(means[:, 0])
    for c in range(means.shape[1]):  # C small: (B, C, D) at a time, not (B, C, C, D)
        g += v[:, c, None] * (q * (means[:, c, None] - means)).sum(dim=1)
    return coef[:, None] * g


def _log_posterior(m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log q(c | x_t) (B, C) from the per-class streaming maxima m and sums z."""
    log_class = m + z.log()  # log sum_{i in c} exp(l_i); -inf for an empty class
    return log_class - torch.logsumexp(log_class, dim=1, keepdim=True)


class _OracleLogProb(torch.autograd.Function):
    """log q(. | x_t) (B, C) with the exact D8 gradient as its backward pass."""

    @staticmethod
    def forward(ctx, x_t: torch.Tensor, abar: torch.Tensor, oracle: EmpiricalOracle):
        log_q, coef, means = oracle._moments(oracle._flat(x_t), abar)
        ctx.save_for_backward(log_q, coef, means)
        ctx.x_meta = (x_t.shape, x_t.device, x_t.dtype)
        return log_q.to(device=x_t.device, dtype=x_t.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        log_q, coef, means = ctx.saved_tensors
        shape, device, dtype = ctx.x_meta
        g = _gradient(grad_out.to(device=means.device, dtype=_F64), log_q, coef, means)
        return g.reshape(shape).to(device=device, dtype=dtype), None, None


def oracle_available(data_root: str | Path, split: str = "train") -> bool:
    """Whether the split of a data set exists, so that an oracle can be built from it."""
    from gradcheck.data.sportballs import load_split

    try:
        load_split(data_root, split)
    except (GradcheckError, OSError):
        return False
    return True
