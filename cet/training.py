"""Seeded training of the FP32 reference model, cached as a checkpoint keyed by its settings.

Training runs in float32 by default, or in float64 for a run that must give the same model on other
machines. The reference model is returned in float32 either way.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm import tqdm

from .io import save_atomic
from .models import fashion_resnet34
from .reproducibility import seed_everything

__all__ = [
    "FineTuneConfig",
    "TrainConfig",
    "TrainResult",
    "cache_dir",
    "checkpoint_path",
    "evaluate",
    "fine_tune_or_load",
    "reference_model",
    "train",
    "train_or_load",
]

logger = logging.getLogger(__name__)

# Bump when the model definition or the training procedure changes, so that old checkpoints are not reused.
_RECIPE_VERSION = 2
_PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run; together they key the checkpoint cache."""

    epochs: int = 10              # passes over the training subset
    batch_size: int = 128
    learning_rate: float = 0.05   # peak of the one-cycle schedule
    gradient_clip: float = 5.0    # max global gradient norm per step
    momentum: float = 0.9         # Nesterov momentum of SGD
    weight_decay: float = 5e-4    # on convolution and linear weights only
    train_size: int = 60_000      # first images of a seeded permutation of the training split
    augment: bool = True          # random 2-pixel shifts and horizontal flips
    seed: int = 0
    # The arithmetic of training. A short run is chaotic. In float32, two threads instead of one moved
    # the smoke model's curvatures by 20 to 60%. In float64 they changed 2 of its 21 million weights, by
    # one float32 step, but its training took 587 s on one thread of a 2-core CPU, where the whole
    # float32 chapter that trained it took 73 s.
    precision: str = "float32"

    def __post_init__(self):
        if self.precision not in _PRECISIONS:
            raise ValueError(f"invalid precision {self.precision!r}: expected one of {sorted(_PRECISIONS)}")

    @property
    def dtype(self) -> torch.dtype:
        """Torch dtype of the training arithmetic."""
        return _PRECISIONS[self.precision]

    def settings(self) -> dict:
        """Return the settings as stored in a checkpoint.

        The default precision is left out, so checkpoints trained before the setting existed keep their keys.
        """
        settings = dataclasses.asdict(self)
        if self.precision == "float32":
            del settings["precision"]
        return settings

    def key(self) -> str:
        """Return a short hash of the settings and of the training recipe's version."""
        payload = json.dumps({"recipe": _RECIPE_VERSION, **self.settings()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class FineTuneConfig:
    """A second training stage from a trained checkpoint: SGD with a cosine decay to zero.

    The one-cycle schedule ends at a learning rate near zero. A short second cycle from a tenth of the
    first peak lowers the training loss further at little cost.
    """

    epochs: int = 4
    learning_rate: float = 0.005  # start of the cosine decay
    seed: int = 1

    def key(self, base: TrainConfig) -> str:
        """Return a short hash of the base settings and of this stage's settings."""
        payload = json.dumps({"base": base.key(), **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    """A trained model with the facts about its run."""

    model: nn.Module
    config: TrainConfig
    train_seconds: float    # wall time of the training run that produced the checkpoint
    from_cache: bool        # whether this call loaded the checkpoint instead of training
    path: Path


def cache_dir() -> Path:
    """Return the checkpoint cache: ``$CET_CACHE``, else ``$XDG_CACHE_HOME/cet``, else ``~/.cache/cet``."""
    if os.environ.get("CET_CACHE"):
        return Path(os.environ["CET_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cet"


def checkpoint_path(config: TrainConfig) -> Path:
    """Return where the checkpoint for ``config`` is cached."""
    return cache_dir() / "checkpoints" / f"fashion-resnet34-{config.key()}.pt"


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 1000, device: str | torch.device = "cpu") -> float:
    """Return the top-1 accuracy of ``model`` on ``dataset``, in percent, in eval mode."""
    was_training = model.training
    model.eval()
    images, labels = dataset.tensors
    # Inputs follow the model's dtype, so that a model trained in float64 is evaluated as it is.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), images.dtype)
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start:start + batch_size].to(device, dtype))
        correct += (logits.argmax(dim=1).cpu() == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return 100.0 * correct / len(labels)


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to 2 pixels (zero padding in normalised units) and flip half of them."""
    n, _, height, width = images.shape
    background = images.amin()
    padded = F.pad(images, (2, 2, 2, 2), value=background.item())
    offsets = torch.randint(0, 5, (n, 2), generator=generator)
    shifted = torch.stack([padded[i, :, y:y + height, x:x + width] for i, (y, x) in enumerate(offsets.tolist())])
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decayed = [p for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in [m.weight]]
    decayed_ids = {id(p) for p in decayed}
    others = [p for p in model.parameters() if id(p) not in decayed_ids]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]


def _training_subset(
    train_set: TensorDataset, config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first ``config.train_size`` images and labels of a permutation drawn with ``generator``."""
    images, labels = train_set.tensors
    if not 0 < config.train_size <= len(labels):
        raise ValueError(f"invalid train_size {config.train_size}: must be between 1 and {len(labels)}")
    subset = torch.randperm(len(labels), generator=generator)[:config.train_size]
    return images[subset], labels[subset]


def train(config: TrainConfig, train_set: TensorDataset, device: str | torch.device = "cpu") -> tuple[nn.Module, float]:
    """Train the Fashion-MNIST ResNet-34 from scratch; return the model (eval mode) and the wall time in seconds."""
    seed_everything(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, labels = _training_subset(train_set, config, generator)

    model = fashion_resnet34().to(device=device, dtype=config.dtype)
    optimizer = torch.optim.SGD(
        _parameter_groups(model, config.weight_decay), lr=config.learning_rate, momentum=config.momentum, nesterov=True
    )
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.learning_rate, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )

    start = time.perf_counter()
    _run_epochs(model, optimizer, scheduler, images, labels, config, config.epochs, generator, device, "training ResNet-34")
    return model, time.perf_counter() - start


def _run_epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, epochs: int,
    generator: torch.Generator, device: str | torch.device, description: str,
) -> None:
    """Run SGD epochs with the scheduler stepped per batch; leave the model in eval mode."""
    steps_per_epoch = math.ceil(len(labels) / config.batch_size)
    model.train()
    progress = tqdm(total=epochs * steps_per_epoch, desc=description, unit="step")
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        running_loss = torch.zeros((), device=device)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            inputs = _augment(images[batch], generator) if config.augment else images[batch]
            loss = F.cross_entropy(model(inputs.to(device, config.dtype)), labels[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
            optimizer.step()
            scheduler.step()
            running_loss += loss.detach()
            progress.update()
        mean_loss = running_loss.item() / steps_per_epoch
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: mean loss {mean_loss}; lower learning_rate")
        progress.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}")
        logger.info("%s, epoch %d/%d: mean training loss %.4f", description, epoch + 1, epochs, mean_loss)
    progress.close()
    model.eval()


def _load_checkpoint(path: Path, settings: dict, dtype: torch.dtype) -> tuple[nn.Module, float]:
    """Load a cached checkpoint; any unreadable or mismatched file raises ValueError naming it."""
    advice = f"delete {path} or pass retrain=True to train again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"cached checkpoint {path} is unreadable ({type(error).__name__}); {advice}") from error
    if not isinstance(state, dict) or not {"config", "state_dict", "train_seconds"} <= state.keys():
        raise ValueError(f"cached checkpoint {path} is not a cet checkpoint; {advice}")
    if state["config"] != settings:
        raise ValueError(f"cached checkpoint {path} was trained with other settings {state['config']}; {advice}")
    model = fashion_resnet34().to(dtype)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"cached checkpoint {path} does not fit the model: {error}; {advice}") from error
    return model, float(state["train_seconds"])


@contextlib.contextmanager
def _training_lock(path: Path):
    """Hold an exclusive lock for training the checkpoint ``path``, so that concurrent processes train it once.

    The lock is ``flock`` on ``<path>.lock``, which the operating system releases when its holder exits.
    """
    try:
        import fcntl
    except ImportError:
        # NOTE: without fcntl (Windows) there is no lock, so concurrent runs may both train the checkpoint.
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("Another process is training %s; waiting for it to finish", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create_cache_folder(path: Path) -> None:
    # Fail before training, not after, when the cache cannot be written.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the checkpoint cache {path.parent}: {error}; set CET_CACHE to a writable directory") from error


def train_or_load(config: TrainConfig, train_set: TensorDataset, device: str | torch.device = "cpu", retrain: bool = False) -> TrainResult:
    """Load the cached checkpoint for ``config``, or train and cache it.

    The model and its checkpoint are in ``config.precision``. The checkpoint is written atomically, so
    an interrupted run never leaves a partial checkpoint behind. A process that finds another one
    training the same checkpoint waits for it and loads its result.
    """
    path = checkpoint_path(config)
    settings = config.settings()
    if path.exists() and not retrain:
        return _load_cached(path, settings, config, device)

    _create_cache_folder(path)
    with _training_lock(path):
        # Another process may have trained this checkpoint while this one waited for the lock.
        if path.exists() and not retrain:
            return _load_cached(path, settings, config, device)
        model, seconds = train(config, train_set, device)
        state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        save_atomic({"config": settings, "state_dict": state_dict, "train_seconds": seconds}, path)
    logger.info("Trained in %.0f s; checkpoint saved to %s", seconds, path)
    return TrainResult(model, config, seconds, False, path)


def _load_cached(path: Path, settings: dict, config: TrainConfig, device: str | torch.device) -> TrainResult:
    model, seconds = _load_checkpoint(path, settings, config.dtype)
    logger.info("Loaded cached checkpoint %s", path)
    return TrainResult(model.to(device).eval(), config, seconds, True, path)


def fine_tune_or_load(
    base: TrainResult, fine_tune: FineTuneConfig, train_set: TensorDataset,
    device: str | torch.device = "cpu", retrain: bool = False,
) -> TrainResult:
    """Load the cached fine-tuned checkpoint, or fine-tune ``base`` and cache the result.

    ``base`` is not modified; the returned model is a trained copy. Its ``train_seconds`` counts both
    stages.
    """
    settings = {"base": base.config.settings(), "fine_tune": dataclasses.asdict(fine_tune)}
    path = cache_dir() / "checkpoints" / f"fashion-resnet34-{fine_tune.key(base.config)}.pt"
    if path.exists() and not retrain:
        return _load_cached(path, settings, base.config, device)
    if fine_tune.epochs < 1:
        raise ValueError(f"invalid fine-tuning epochs {fine_tune.epochs}: must be at least 1")

    _create_cache_folder(path)
    with _training_lock(path):
        # Another process may have fine-tuned this checkpoint while this one waited for the lock.
        if path.exists() and not retrain:
            return _load_cached(path, settings, base.config, device)
        return _fine_tune(base, fine_tune, train_set, device, settings, path)


def _fine_tune(
    base: TrainResult, fine_tune: FineTuneConfig, train_set: TensorDataset, device: str | torch.device,
    settings: dict, path: Path,
) -> TrainResult:
    """Fine-tune a copy of ``base`` and save it to ``path``."""
    config = base.config
    seed_everything(fine_tune.seed)
    generator = torch.Generator().manual_seed(fine_tune.seed)
    # A generator seeded like the first stage's draws the same training subset.
    images, labels = _training_subset(train_set, config, torch.Generator().manual_seed(config.seed))
    # The base model is in the training precision unless it came from reference_model (float32).
    model = copy.deepcopy(base.model).to(device=device, dtype=config.dtype)
    optimizer = torch.optim.SGD(
        _parameter_groups(model, config.weight_decay), lr=fine_tune.learning_rate, momentum=config.momentum, nesterov=True
    )
    steps = fine_tune.epochs * math.ceil(len(labels) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    start = time.perf_counter()
    _run_epochs(model, optimizer, scheduler, images, labels, config, fine_tune.epochs, generator, device, "fine-tuning ResNet-34")
    seconds = base.train_seconds + time.perf_counter() - start

    state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    save_atomic({"config": settings, "state_dict": state_dict, "train_seconds": seconds}, path)
    logger.info("Fine-tuned in %.0f s; checkpoint saved to %s", seconds - base.train_seconds, path)
    return TrainResult(model, config, seconds, False, path)


def reference_model(
    config: TrainConfig, fine_tune: FineTuneConfig | None, train_set: TensorDataset, device: str | torch.device = "cpu"
) -> TrainResult:
    """Return the float32 model of the book: trained with ``config``, then fine-tuned unless ``fine_tune`` is None.

    A model trained in float64 (``config.precision``) is rounded to float32 once, after the last stage.
    The returned ``config`` still names the training precision.
    """
    base = train_or_load(config, train_set, device=device)
    result = base if fine_tune is None else fine_tune_or_load(base, fine_tune, train_set, device=device)
    return dataclasses.replace(result, model=result.model.float())
