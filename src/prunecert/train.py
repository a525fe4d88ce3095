"""Training and distillation: the models prunecert prunes, and the fine-tuning that pruning may ask for.

Architectures are plain `torch.nn.Sequential` factories built only from ops the IR supports (Linear,
Conv2d, ReLU, Flatten, AvgPool2d), so every trained module converts to a `Network` exactly.
`fit` trains any such module with Adam and a cosine learning-rate schedule, seeded and deterministic
on one machine; given a `teacher` it distils (Hinton et al. 2015): the loss is
``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``, where the T^2 keeps the
soft term's gradients on the scale of the hard one. Optional augmentation (the teacher then sees the
same augmented view, computed online) and adversarial distillation live in `objectives.py`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from prunecert import __version__
from prunecert.data import Dataset, load_dataset
from prunecert.errors import ConfigError, DataError, ShapeMismatchError
from prunecert.io.torch_io import network_from_module, network_to_module
from prunecert.network import Network
from prunecert.progress import progress_task
from prunecert.objectives import Adversarial, adversarial_points, augment_batch, check_augment, \
    worst_logit_deviation

Model = nn.Module | Network


# ----------------------------------------------------------------------------- architectures
def mlp(in_features: int, hidden: Sequence[int], classes: int = 10) -> nn.Sequential:
    """Flatten, then fully connected ReLU layers: the shape of LeNet-300-100 and of its pruned students."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(in_features)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, int(classes)))
    return nn.Sequential(*layers)


def lenet_300_100(in_features: int = 784, classes: int = 10) -> nn.Sequential:
    """LeNet-300-100 (the paper's fully connected benchmark); Flatten first so it takes (1, 28, 28) images."""
    return mlp(in_features, (300, 100), classes)


def small_vgg(input_shape: Sequence[int] = (1, 28, 28), classes: int = 10) -> nn.Sequential:
    """conv3x3(16)-conv3x3(16)-avgpool2-conv3x3(32)-avgpool2-fc(100)-fc(classes), ReLU between.

    Average (not max) pooling keeps the network piecewise linear in the IR's sense.
    """
    c, h, w = (int(s) for s in input_shape)
    if h < 4 or w < 4:
        raise ShapeMismatchError(f"small_vgg: input {tuple(input_shape)} is too small for two 2x2 poolings")
    flat = 32 * (h // 2 // 2) * (w // 2 // 2)
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 100), nn.ReLU(),
        nn.Linear(100, int(classes)),
    )


ARCHS: dict[str, Callable[[tuple[int, ...], int], nn.Sequential]] = {
    "lenet300": lambda shape, classes: lenet_300_100(math.prod(shape), classes),
    "vgg-small": lambda shape, classes: small_vgg(shape, classes),
}


def build_arch(arch: str, input_shape: Sequence[int], classes: int) -> nn.Sequential:
    """A freshly initialised module of a named architecture (initialisation uses torch's global RNG)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    shape = tuple(int(s) for s in input_shape)
    if arch == "vgg-small" and len(shape) != 3:
        raise ShapeMismatchError(f"vgg-small needs (C, H, W) image inputs, the data set has shape {shape}")
    return ARCHS[arch](shape, int(classes))


# ----------------------------------------------------------------------------- training
def _train_arrays(dataset: Dataset | tuple[npt.ArrayLike, npt.ArrayLike]) -> tuple[torch.Tensor, torch.Tensor]:
    x_given, y_given = (dataset.x_train, dataset.y_train) if isinstance(dataset, Dataset) else dataset
    x = torch.from_numpy(np.array(x_given, dtype=np.float32))  # a writable copy: data set arrays are read-only
    y = torch.from_numpy(np.array(y_given, dtype=np.int64))
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(f"training data: need x of shape (N, ...) and N labels, got x {tuple(x.shape)}, "
                        f"y {tuple(y.shape)}")
    return x, y


def _logits(model: Model, x: torch.Tensor) -> torch.Tensor:
    """float32 logits of a module or a Network, without gradients."""
    with torch.no_grad():
        if isinstance(model, Network):
            return model.forward(x, torch.float32)
        out: torch.Tensor = model(x)  # nn.Module.__call__ is typed Any
        return out


def _batched_logits(model: Model, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        return torch.cat([_logits(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        if was_training and isinstance(model, nn.Module):
            model.train()


def _check_fits(model: Model, x: torch.Tensor, n_classes: int, role: str) -> int:
    """Run one sample through `model` so that a shape mismatch is a clear error, not a torch trace."""
    try:
        out = _batched_logits(model, x[:1])
    except (RuntimeError, ShapeMismatchError) as exc:
        raise ShapeMismatchError(f"{role}: cannot take inputs of shape {tuple(x.shape[1:])} "
                                 f"({str(exc).splitlines()[0]})") from exc
    if out.ndim != 2 or out.shape[1] < n_classes:
        raise ShapeMismatchError(f"{role}: output shape {tuple(out.shape[1:])} does not cover the "
                                 f"{n_classes} classes of the labels")
    return int(out.shape[1])


def _validate(epochs: int, lr: float, batch_size: int, temperature: float, alpha: float) -> None:
    if int(epochs) < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"learning rate must be > 0, got {lr}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"distillation weight alpha must lie in [0, 1], got {alpha}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, labels)."""
    soft = F.kl_div(F.log_softmax(student / temperature, dim=1), F.log_softmax(teacher / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return alpha * temperature ** 2 * soft + (1.0 - alpha) * F.cross_entropy(student, labels)


def fit(module: nn.Module, dataset: Dataset | tuple[npt.ArrayLike, npt.ArrayLike], epochs: int = 20,
        lr: float = 1e-3, batch_size: int = 64, seed: int = 0, teacher: Model | None = None,
        temperature: float = 4.0, alpha: float = 0.5, weight_decay: float = 0.0,
        progress: bool = True, augment: str | None = None, adversarial: Adversarial | None = None,
        input_range: tuple[float, float] = (0.0, 1.0)) -> nn.Module:
    """Train `module` in place on the training split (and return it).

    With `teacher` (an nn.Module or a `Network`, e.g. the unpruned original) the student is trained by
    knowledge distillation; the student is any dense module (e.g. a smaller `mlp`). `augment` ('shift',
    'shift-flip') augments each batch (the teacher is then evaluated on the augmented view);
    `adversarial` (needs a teacher) adds PGD points on |f - g| in boxes around the batch, clipped to
    `input_range`. Batches are drawn with a seeded torch.Generator, so the result is bit-for-bit
    reproducible on one machine.
    """
    _validate(epochs, lr, batch_size, temperature, alpha)
    check_augment(augment)
    if adversarial is not None and teacher is None:
        raise ConfigError("adversarial distillation needs a teacher (the original network)")
    x, y = _train_arrays(dataset)
    n_classes = int(y.max()) + 1
    out_dim = _check_fits(module, x, n_classes, "student" if teacher is not None else "model")
    soft_targets = None
    if teacher is not None:
        if _check_fits(teacher, x, n_classes, "teacher") != out_dim:
            raise ShapeMismatchError(f"teacher and student disagree on the number of outputs "
                                     f"({_batched_logits(teacher, x[:1]).shape[1]} vs {out_dim})")
        # a fixed teacher on fixed inputs: its logits once; on augmented/adversarial inputs: online
        if augment is None and adversarial is None:
            soft_targets = _batched_logits(teacher, x)
        teacher_module = network_to_module(teacher).eval() if isinstance(teacher, Network) else teacher

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(epochs) * steps_per_epoch)
    module.train()
    with _progress(progress, "distil" if teacher is not None else "train", int(epochs)) as advance:
        for _ in range(int(epochs)):
            perm = torch.randperm(len(x), generator=gen)
            total, count = 0.0, 0
            for start in range(0, len(x), batch_size):
                idx = perm[start:start + batch_size]
                xb = x[idx] if augment is None else augment_batch(x[idx], augment, gen)
                out = module(xb)
                if teacher is None:
                    loss = F.cross_entropy(out, y[idx])
                else:
                    with torch.no_grad():
                        t_out = soft_targets[idx] if soft_targets is not None else teacher_module(xb)
                    loss = distillation_loss(out, t_out, y[idx], temperature, alpha)
                    if adversarial is not None:
                        xa = adversarial_points(module, teacher_module, xb, adversarial, *input_range, gen)
                        out_a = module(xa)
                        with torch.no_grad():
                            t_a = teacher_module(xa)
                        loss = loss + distillation_loss(out_a, t_a, y[idx], temperature, alpha) \
                            + adversarial.weight * worst_logit_deviation(out_a, t_a)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            if not math.isfinite(total):
                raise ConfigError(f"training diverged (loss is {total}); lower the learning rate (now {lr})")
            advance(total / count)
    module.eval()
    return module


@contextlib.contextmanager
def _progress(enabled: bool, label: str, epochs: int) -> Iterator[Callable[[float], None]]:
    """One step per epoch on the progress channel (prunecert.progress), or nothing when disabled."""
    with progress_task(f"{label} epochs", epochs, enabled, unit="epochs") as task:
        def advance(loss: float) -> None:
            task.advance(1, f"loss {loss:.4f}")
        yield advance


def evaluate(model: Model, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int = 2048) -> float:
    """Top-1 accuracy of a module or a Network on (x, y), in float32."""
    labels = np.asarray(y)
    # a writable copy: torch refuses read-only (cached data set) arrays
    inputs = np.array(x, dtype=np.float32)
    if len(inputs) != len(labels) or len(labels) == 0:
        raise DataError(f"evaluate: {len(inputs)} inputs but {len(labels)} labels")
    if isinstance(model, Network):
        pred = model.predict(inputs, batch_size)
    else:
        pred = _batched_logits(model, torch.from_numpy(inputs), batch_size).argmax(1).numpy()
    return float(np.mean(pred == labels))


# ----------------------------------------------------------------------------- end to end
def train_model(arch: str, dataset_spec: str | Dataset, epochs: int = 20, seed: int = 0, lr: float = 1e-3,
                batch_size: int = 64, progress: bool = True, name: str | None = None) -> Network:
    """Train a named architecture on a data set and return it as a `Network` over the box [0, 1].

    The data set's canonical split is used (see `prunecert.data`); `seed` drives initialisation and
    batch order. The Network's metadata["training"] records the provenance and test accuracy.
    """
    if arch not in ARCHS:  # fail before the (possibly slow) data loading
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    ds = load_dataset(dataset_spec) if isinstance(dataset_spec, str) else dataset_spec
    torch.manual_seed(int(seed))
    module = build_arch(arch, ds.input_shape, ds.n_classes)
    fit(module, ds, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    net = network_from_module(module, ds.input_shape, lo=ds.lo, hi=ds.hi, name=name or f"{arch}-{ds.name}")
    net.metadata["training"] = {
        "arch": arch, "dataset": ds.name, "dataset_description": ds.description, "epochs": int(epochs),
        "seed": int(seed), "lr": float(lr), "batch_size": int(batch_size), "optimizer": "adam+cosine",
        "train_accuracy": evaluate(net, ds.x_train, ds.y_train),
        "test_accuracy": evaluate(net, ds.x_test, ds.y_test),
        "prunecert_version": __version__, "torch_version": torch.__version__,
    }
    return net
