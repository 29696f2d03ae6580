"""Shared helpers of the benchmarks: quiet Lightning, in-memory data, tasks, machine info.

Everything here is deterministic given a seed and uses only data bundled with
scikit-learn, the running Python's own standard-library source, or generated on the fly
(no download).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

Batch = tuple[Tensor, Tensor]


def quiet() -> None:
    """Silence Lightning's start-up chatter and the warnings tiny runs trigger."""
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                 "lightning.fabric", "lr_monitor", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class Batches:
    """A re-iterable list of pre-made batches: no DataLoader, no collate cost.

    Lightning accepts any iterable with ``__len__``; a plain list would be taken as a
    collection of dataloaders. With ``shuffle_seed`` the batch order is permuted every
    epoch by a private generator (the global RNG is untouched).
    """

    def __init__(self, batches: Sequence[Batch], shuffle_seed: int | None = None) -> None:
        self.batches = list(batches)
        self._gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)

    def __iter__(self) -> Iterator[Batch]:
        if self._gen is None:
            return iter(self.batches)
        order = torch.randperm(len(self.batches), generator=self._gen).tolist()
        return iter([self.batches[i] for i in order])

    def __len__(self) -> int:
        return len(self.batches)


def make_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> list[Batch]:
    """Shuffle once with ``seed`` and cut into full batches (the remainder is dropped)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n = len(x) // batch_size * batch_size
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(t - mu) / sd for t in (train, *others)]


def _split(n: int, seed: int, frac: float = 0.8) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(frac * n)
    return perm[:k], perm[k:]


def digits_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits: standardised 64 features, 80/20 split (split seed fixed to 0)."""
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.long)
    tr, va = _split(len(x), 0)
    xtr, xva = _standardise(x[tr], x[va])
    return xtr, y[tr], xva, y[va]


def diabetes_data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's diabetes: standardised features and target, 80/20 split."""
    from sklearn.datasets import load_diabetes

    x_np, y_np = load_diabetes(return_X_y=True)
    x = torch.tensor(x_np, dtype=torch.float32)
    y = torch.tensor(y_np, dtype=torch.float32).unsqueeze(1)
    tr, va = _split(len(x), 0)
    xtr, xva = _standardise(x[tr], x[va])
    ytr, yva = _standardise(y[tr], y[va])
    return xtr, ytr, xva, yva


def markov_data(vocab: int = 16, seq_len: int = 16, n_train: int = 1280, n_val: int = 256
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sequences from a fixed random Markov chain (each token has 2 likely successors).

    Inputs are tokens ``0..T-2``, targets tokens ``1..T-1``; the best achievable
    next-token accuracy is about 0.7.
    """
    g = torch.Generator().manual_seed(1234)
    probs = torch.full((vocab, vocab), 0.02 / vocab)
    for s in range(vocab):
        a, b = torch.randperm(vocab, generator=g)[:2].tolist()
        probs[s, a] += 0.7
        probs[s, b] += 0.28
    probs /= probs.sum(1, keepdim=True)
    n = n_train + n_val
    seq = torch.empty(n, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = torch.multinomial(probs[seq[:, t]], 1, generator=g).squeeze(1)
    x, y = seq[:, :-1], seq[:, 1:]
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


#: Bytes of standard-library source the character LM reads (train and validation).
CHAR_TEXT_BYTES = 300_000
#: Share of the text (its start) used for training; the rest is the validation text.
CHAR_TRAIN_FRAC = 0.9
#: Context length of the character LM (tokens per window): 16 keeps a batch-256 step near
#: 80 ms on one CPU thread (64 took 350 ms; see SUITE_NOTES.md).
CHAR_CONTEXT = 16
#: Validation windows: non-overlapping windows from the start of the validation text.
CHAR_VAL_WINDOWS = 1024
#: Batch of the bf16 variant: bf16 matmuls on a CPU without AVX512-BF16/AMX run ~8× slower
#: than float32, so batch 256 would cost ~2 min per 150-step run; 16 costs ~10 s (SUITE_NOTES.md).
CHAR_BF16_BATCH = 16
#: Random training windows make one "epoch" (the unit of EarlyStopping's epoch-end check).
CHAR_BATCHES_PER_EPOCH = 50


@functools.lru_cache(maxsize=2)
def stdlib_text(n_bytes: int = CHAR_TEXT_BYTES) -> tuple[bytes, list[str]]:
    """The first ``n_bytes`` of the running Python's top-level stdlib ``.py`` files.

    Files are read whole in sorted name order (``__future__.py``, ``__hello__.py``, …) and
    concatenated; the result is cut to exactly ``n_bytes``. Deterministic for one Python
    version (the text differs between versions, so the results record it).

    Args:
        n_bytes: Number of bytes to return.

    Returns:
        The text as bytes and the names of the files it came from.

    Raises:
        RuntimeError: If the stdlib directory holds fewer than ``n_bytes`` of ``.py`` text.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    names: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        names.append(path.name)
        total += len(data)
        if total >= n_bytes:
            return b"".join(chunks)[:n_bytes], names
    raise RuntimeError(f"only {total} bytes of .py source in {stdlib}, need {n_bytes}")


def char_vocab() -> list[int]:
    """The byte values present in the character LM's text, sorted (token id = index)."""
    return sorted(set(stdlib_text()[0]))


def char_data(context: int = CHAR_CONTEXT, n_val_windows: int = CHAR_VAL_WINDOWS
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Standard-library source as token ids: a contiguous train text and validation windows.

    The first ``CHAR_TRAIN_FRAC`` of :func:`stdlib_text` is the training text, the rest the
    validation text (a fixed split by position, so no validation window overlaps training).
    Token ids index :func:`char_vocab`.

    Args:
        context: Tokens per validation window.
        n_val_windows: Number of non-overlapping validation windows, from the start of the
            validation text.

    Returns:
        ``(train_inputs, train_targets, val_x, val_y)``: the training text as a 1-D stream
        (``train_targets`` is ``train_inputs`` shifted by one; :class:`CharWindows` cuts
        windows from it) and ``[n_val_windows, context]`` validation inputs and targets.

    Raises:
        ValueError: If the validation text is too short for ``n_val_windows`` windows.
    """
    text, _ = stdlib_text()
    lookup = torch.full((256,), -1, dtype=torch.long)
    vocab = sorted(set(text))
    lookup[torch.tensor(vocab)] = torch.arange(len(vocab))
    ids = lookup[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    cut = int(CHAR_TRAIN_FRAC * len(ids))
    train, val = ids[:cut], ids[cut:]
    need = n_val_windows * context + 1
    if len(val) < need:
        raise ValueError(f"validation text of {len(val)} tokens, need {need}")
    val_x = val[:need - 1].view(n_val_windows, context)
    val_y = val[1:need].view(n_val_windows, context)
    return train[:-1], train[1:], val_x, val_y


class CharWindows:
    """Training batches of random windows of a token stream, drawn from a seeded generator.

    Each iteration (one "epoch" for Lightning) yields ``batches_per_epoch`` batches of
    ``batch_size`` windows of ``context`` tokens at uniformly random offsets. The private
    generator continues across epochs, so a run's whole batch sequence is fixed by ``seed``
    (the global RNG is untouched).
    """

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int, seed: int,
                 context: int = CHAR_CONTEXT,
                 batches_per_epoch: int = CHAR_BATCHES_PER_EPOCH) -> None:
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.context = context
        self.batches_per_epoch = batches_per_epoch
        self._gen = torch.Generator().manual_seed(seed)
        self._offsets = torch.arange(context)

    def __iter__(self) -> Iterator[Batch]:
        high = len(self.inputs) - self.context + 1
        for _ in range(self.batches_per_epoch):
            starts = torch.randint(high, (self.batch_size, 1), generator=self._gen)
            index = starts + self._offsets
            yield self.inputs[index], self.targets[index]

    def __len__(self) -> int:
        return self.batches_per_epoch


def char_windows(inputs: Tensor, targets: Tensor, batch_size: int, seed: int
                 ) -> CharWindows:
    """:class:`CharWindows` with the default context and epoch length (``Task.make_train``)."""
    return CharWindows(inputs, targets, batch_size, seed)


# -- models ------------------------------------------------------------------------------


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions on the 8×8 digit images, max-pool, linear head (~3k params)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(x.view(-1, 1, 8, 8)).flatten(1))


class TinyLM(nn.Module):
    """A one-layer causal Transformer (d=32, 2 heads), no dropout."""

    mask: Tensor  # registered as a buffer in __init__

    def __init__(self, vocab: int = 16, d: int = 32, seq_len: int = 16, layers: int = 1,
                 heads: int = 2, ff: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab)
        mask = torch.triu(torch.full((seq_len, seq_len), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.out(h)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused QKV projection, SDPA with ``is_causal``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        shape = (b, t, self.n_heads, d // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(h.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU, 4×)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    """A small GPT-style character LM: token + position embeddings, pre-LN blocks, final LN.

    The output head is tied to the token embedding. Initialisation as in GPT-2: normal(0,
    0.02) for linear and embedding weights, zero biases, and the residual output
    projections scaled by ``1/sqrt(2 · n_layers)``. No dropout.
    """

    def __init__(self, vocab: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 context: int = CHAR_CONTEXT) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            assert isinstance(block, Block)
            for proj in (block.attn.proj, block.mlp[2]):
                assert isinstance(proj, nn.Linear)
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} tokens, context is {self.context}")
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def decay_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict[str, Any]]:
    """AdamW-style parameter groups: ``weight_decay`` on linear weights, none elsewhere.

    Matrices of :class:`torch.nn.Linear` layers decay; biases, LayerNorm parameters and
    embeddings (including a head tied to the token embedding) do not. Each parameter is
    listed once, in ``model.parameters()`` order within its group.

    Args:
        model: The model.
        weight_decay: Decay of the matrix group.

    Returns:
        ``[{"params": matrices, "weight_decay": weight_decay},
        {"params": the rest, "weight_decay": 0.0}]``.
    """
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay_ids -= embedding_ids
    params = list(model.parameters())
    return [
        {"params": [p for p in params if id(p) in decay_ids], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decay_ids], "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, total_steps: int, warmup_frac: float = 0.1,
                  final_frac: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup_frac`` of the run, cosine to ``final_frac``.

    Meant for ``LambdaLR`` stepped once per optimizer step: ``step`` 0 is the first step.
    The warm-up rises from ``1/w`` to 1 over ``w = max(1, round(warmup_frac · total))``
    steps; the cosine then falls from 1 to ``final_frac`` at ``total_steps``.

    Args:
        step: Optimizer steps taken so far.
        total_steps: Length of the run in optimizer steps.
        warmup_frac: Share of the run spent warming up.
        final_frac: Multiplier at the end of the run.

    Returns:
        The multiplier of the peak learning rate.
    """
    warmup = max(1, round(warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Task:
    """A training task of the divergence suite.

    ``higher_is_better`` tells how to read ``metric``; ``init_loss`` is the loss of an
    untrained model (ln C for classification, ≈1 for the standardised regression), used
    for EarlyStopping's absolute ``divergence_threshold``.

    The optional fields describe a training recipe beyond "one parameter group, constant
    LR, float32"; left at their defaults, a task trains exactly as before they existed:

    * ``make_train(train_x, train_y, batch_size, seed)`` builds the training iterable
      (default: :func:`make_batches` shuffled once, then :class:`Batches` reshuffled every
      epoch with ``seed``).
    * ``param_groups(model)`` returns the optimizer's parameter groups (e.g.
      :func:`decay_groups`); a group's ``weight_decay`` is passed to every optimizer.
    * ``lr_lambda(step, total_steps)`` is a per-step LR multiplier (e.g.
      :func:`warmup_cosine`), run as ``LambdaLR`` with interval ``"step"``.
    * ``dtype`` is the dtype of the model's parameters (the loss function decides the
      dtype the loss is computed in).
    """

    name: str
    metric: str
    higher_is_better: bool
    init_loss: float
    batch_size: int
    make_model: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    eval_fn: Callable[[Tensor, Tensor], float]
    make_train: Callable[[Tensor, Tensor, int, int], Iterable[Batch]] | None = None
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None
    lr_lambda: Callable[[int, int], float] | None = None
    dtype: torch.dtype = torch.float32


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _acc(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def _mse(pred: Tensor, y: Tensor) -> float:
    v = float(nn.functional.mse_loss(pred, y))
    return v if math.isfinite(v) else math.inf


def _ce_float32(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy computed in float32 whatever the logits' dtype (for bf16 models)."""
    return _ce(logits.float(), y)


def _bits_per_char(logits: Tensor, y: Tensor) -> float:
    """Validation cross-entropy in bits per character (float32); inf when not finite."""
    v = float(_ce_float32(logits, y)) / math.log(2)
    return v if math.isfinite(v) else math.inf


def _char_gpt() -> nn.Module:
    return CharGPT(len(char_vocab()))


def _char_gpt_bf16() -> nn.Module:
    return _char_gpt().to(torch.bfloat16)


def _char_gpt_tiny() -> nn.Module:
    return CharGPT(len(char_vocab()), d_model=16, n_heads=2, n_layers=1)


def _char_task(name: str, batch_size: int, make_model: Callable[[], nn.Module],
               dtype: torch.dtype = torch.float32) -> Task:
    """A :class:`CharGPT` task: decay groups, warm-up + cosine, random windows, val bpc."""
    return Task(name, "val_bpc", False, math.log(len(char_vocab())), batch_size, make_model,
                char_data, _ce_float32, _bits_per_char, make_train=char_windows,
                param_groups=decay_groups, lr_lambda=warmup_cosine, dtype=dtype)


TASKS: dict[str, Task] = {
    "digits_mlp": Task("digits_mlp", "val_acc", True, math.log(10), 128,
                       lambda: mlp([64, 64, 10]), digits_data, _ce, _acc),
    "digits_cnn": Task("digits_cnn", "val_acc", True, math.log(10), 64,
                       DigitsCNN, digits_data, _ce, _acc),
    "markov_lm": Task("markov_lm", "val_token_acc", True, math.log(16), 32,
                      TinyLM, markov_data, _ce, _acc),
    "diabetes": Task("diabetes", "val_mse", False, 1.0, 64,
                     lambda: mlp([10, 32, 1]), diabetes_data, nn.functional.mse_loss, _mse),
    "char_gpt": _char_task("char_gpt", 256, _char_gpt),
    "char_gpt_b8": _char_task("char_gpt_b8", 8, _char_gpt),
    "char_gpt_bf16": _char_task("char_gpt_bf16", CHAR_BF16_BATCH, _char_gpt_bf16,
                                torch.bfloat16),
    # One block of width 16: the end-to-end check of the suite's smoke mode and tests.
    "char_gpt_tiny": _char_task("char_gpt_tiny", 8, _char_gpt_tiny),
}


# -- machine -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, Python/torch/Lightning versions (and wandb when installed)."""
    import pytorch_lightning as pl

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import wandb

        info["wandb"] = wandb.__version__
    except ImportError:
        info["wandb"] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
            text=True, check=False).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) ignoring NaN; NaN for an empty input.

    Args:
        values: The sample.
        q: Quantile in ``[0, 1]``.

    Returns:
        The ``q`` quantile of the non-NaN values.
    """
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    pos = q * (len(vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """Median ignoring NaN; NaN for an empty input."""
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    k = len(vals) // 2
    return vals[k] if len(vals) % 2 else 0.5 * (vals[k - 1] + vals[k])
