"""Image classification for any timm model (mdlrnn's pLSTM-ViT and LightNet-ViT, and timm's own).

    python train/classify.py --model plstm_vit_tiny_patch16_224 --dataset cifar10 --data-dir DIR \\
        --img-size 32 --model-kwargs patch_size=4 --epochs 100 --batch-size 128 --out runs/cifar
    python train/classify.py --model vit_tiny_patch16_224 --dataset arrows --img-size 192 --eval-sizes 192 384
    torchrun --nproc_per_node 2 train/classify.py ...                # distributed data parallel

Data sets: `arrows` (generated, mdlrnn.data.ArrowPointing), `cifar10`/`cifar100` (torchvision; downloaded
only with --download), `imagefolder` (DIR/train and DIR/val, ImageNet layout), `fake` (torchvision FakeData).
--batch-size is per process, as in timm. Every epoch writes OUT/checkpoint.safetensors (weights),
OUT/checkpoint_state.pt (optimizer, scheduler, EMA, every rank's RNG state, history), OUT/log.csv and
OUT/curves.png; the end writes OUT/summary.json. `--resume OUT` continues such a run where it stopped and
ends with the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DATASETS = ("arrows", "cifar10", "cifar100", "imagefolder", "fake")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def model_kwarg(text: str):
    """'name=value' with value read as a Python literal where it is one (ints, floats, booleans, tuples)."""
    import ast

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name, value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model", required=True, help="any timm model name (mdlrnn's are registered on import)")
    add("--model-kwargs", nargs="*", type=model_kwarg, default=[], metavar="NAME=VALUE",
        help="extra keyword arguments for timm.create_model, e.g. patch_size=8 embed_dim=64 depth=4")
    add("--dataset", default="arrows", choices=DATASETS)
    add("--data-dir", default="data", help="cifar root, or imagefolder root holding train/ and val/")
    add("--download", action="store_true", help="download cifar if it is missing")
    add("--img-size", type=int, default=None, help="training resolution (default: the model's)")
    add("--eval-sizes", type=int, nargs="+", default=None, help="evaluation resolutions (default: --img-size)")
    add("--train-samples", type=int, default=100_000, help="arrows/fake: training images")
    add("--val-samples", type=int, default=5_120, help="arrows/fake: validation images per resolution")
    add("--fake-classes", type=int, default=10)
    add("--arrow-padding", type=int, default=30)
    add("--arrow-radius", type=float, nargs=2, default=(15, 30), metavar=("LO", "HI"))
    add("--arrow-length", type=int, nargs=2, default=(15, 30), metavar=("LO", "HI"))
    add("--arrow-width", type=int, nargs=2, default=(2, 4), metavar=("LO", "HI"))
    add("--epochs", type=int, default=50)
    add("--batch-size", type=int, default=128, help="per process")
    add("--lr", type=float, default=1e-3)
    add("--weight-decay", type=float, default=0.05)
    add("--warmup-epochs", type=float, default=1.0)
    add("--min-lr-ratio", type=float, default=0.0, help="cosine decays to lr * this")
    add("--clip-grad", type=float, default=1.0, help="gradient norm clip (0: off)")
    add("--smoothing", type=float, default=0.0, help="label smoothing")
    add("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    add("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    add("--aug", default="none", choices=("none", "timm"),
        help="training augmentation: none, or timm's (random resized crop, flip, colour jitter)")
    add("--ema", action="store_true", help="keep and evaluate an exponential moving average of the weights")
    add("--ema-decay", type=float, default=0.9998)
    add("--grad-checkpointing", action="store_true")
    add("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA)")
    add("--workers", type=int, default=4)
    add("--seed", type=int, default=0)
    add("--device", default=None, help="cpu, cuda (default: cuda when available)")
    add("--out", default="runs/classify")
    add("--resume", default=None, help="output folder of an interrupted run to continue")
    add("--stop-after-epochs", type=int, default=None,
        help="end this run after that many epochs (a later --resume continues), e.g. for job time limits")
    add("--no-progress", action="store_true", help="no tqdm bars")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "train_samples", "val_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


# ----------------------------------------------------------------------------------------- distributed


class Dist:
    """Rank, world size and device of this process (torchrun's environment, or a single process)."""

    def __init__(self, device: str | None):
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kind.startswith("cuda") and not torch.cuda.is_available():
            fail("--device cuda: no CUDA device is available")
        self.device = torch.device(f"cuda:{local}" if kind == "cuda" else kind)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Sums of these numbers over all ranks (float64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def rng_state() -> dict:
    """This process's random states, as numpy arrays (all_gather_object pickles them; tensors would not do)."""
    state = dict(torch=torch.get_rng_state().numpy(), python=random.getstate(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().numpy()
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.from_numpy(state["torch"]))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(state["cuda"]))


# -------------------------------------------------------------------------------------------- data


def datasets(args, config: dict):
    """(train set, {size: validation set}, number of classes)."""
    import torchvision
    from torchvision import transforms as T

    mean, std = config["mean"], config["std"]
    sizes = args.eval_sizes

    def timm_transform(size: int, training: bool):
        from timm.data import create_transform

        return create_transform(size, is_training=training, no_aug=args.aug == "none", mean=mean, std=std,
                                crop_pct=1.0, interpolation="bicubic")

    if args.dataset == "arrows":
        from mdlrnn.data import ArrowPointing

        shapes = dict(padding=args.arrow_padding, radius=tuple(args.arrow_radius),
                      arrow_length=tuple(args.arrow_length), line_width=tuple(args.arrow_width))
        normalize = T.Normalize(mean, std)
        try:
            train = ArrowPointing(args.train_samples, args.img_size, seed=args.seed, transform=normalize, **shapes)
            # validation images come from another seed: never the training images
            val = {s: ArrowPointing(args.val_samples, s, seed=args.seed + 1_000_003, transform=normalize, **shapes)
                   for s in sizes}
        except ValueError as error:
            fail(str(error))
        return train, val, 2
    if args.dataset == "fake":
        def fake(count, size, offset, training):
            return torchvision.datasets.FakeData(count, (3, size, size), args.fake_classes,
                                                 transform=timm_transform(size, training), random_offset=offset)

        val = {s: fake(args.val_samples, s, 10**6, False) for s in sizes}
        return fake(args.train_samples, args.img_size, 0, True), val, args.fake_classes
    root = Path(args.data_dir)
    if args.dataset.startswith("cifar"):
        cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            train = cls(str(root), train=True, download=args.download, transform=timm_transform(args.img_size, True))
            val = {s: cls(str(root), train=False, download=False, transform=timm_transform(s, False)) for s in sizes}
        except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
            fail(f"{args.dataset} in {root}: {error} (pass --download to fetch it)")
        return train, val, len(train.classes)
    for part in ("train", "val"):
        if not (root / part).is_dir():
            fail(f"--dataset imagefolder needs {root / part} (one folder per class)")
    train = torchvision.datasets.ImageFolder(str(root / "train"), timm_transform(args.img_size, True))
    val = {s: torchvision.datasets.ImageFolder(str(root / "val"), timm_transform(s, False)) for s in sizes}
    return train, val, len(train.classes)


# ------------------------------------------------------------------------------------------- model


def data_config(name: str) -> dict:
    """The model's default input size, mean and std (timm's pretrained config), without building it."""
    import timm
    from timm.data import resolve_data_config

    import mdlrnn  # noqa: F401  (registers mdlrnn's models with timm)

    if not timm.is_model(name):
        fail(f"unknown model {name!r}; list them with timm.list_models('*vit*') (mdlrnn's: "
             f"{', '.join(timm.list_models('plstm*') + timm.list_models('lightnet*'))})")
    cfg = timm.get_pretrained_cfg(name)
    return resolve_data_config({}, pretrained_cfg=cfg.to_dict() if cfg else {})


def create_model(args, num_classes: int) -> nn.Module:
    import timm

    kwargs = dict(args.model_kwargs, num_classes=num_classes)
    sized = dict(kwargs, img_size=args.img_size)
    if any(s != args.img_size for s in args.eval_sizes) and not args.model.startswith(("plstm", "lightnet")):
        sized["dynamic_img_size"] = True  # timm's ViTs resample their position embedding only when asked
    try:
        try:
            model = timm.create_model(args.model, **sized)
        except TypeError:  # models without img_size (CNNs) take any resolution
            model = timm.create_model(args.model, **kwargs)
    except (TypeError, ValueError) as error:
        fail(f"cannot build {args.model} with {args.model_kwargs}: {error}")
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch = patch if isinstance(patch, int) else patch[0]
        bad = sorted({s for s in (args.img_size, *args.eval_sizes) if s % patch})
        if bad:
            fail(f"image sizes {bad} are not divisible by {args.model}'s patch size {patch}")
    return model


# ---------------------------------------------------------------------------------------- training


def evaluate(model, loader, ctx: Dist, amp: bool) -> dict:
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # correct, loss, count: on the device, no sync per batch
    with torch.no_grad(), torch.autocast(ctx.device.type, torch.bfloat16, enabled=amp):
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            logits = model(images).float()
            totals += torch.stack([(logits.argmax(-1) == labels).sum(), nn.functional.cross_entropy(
                logits, labels, reduction="sum"), torch.tensor(labels.numel(), device=ctx.device)]).double()
    correct, loss, count = ctx.sum(*totals.tolist())
    return dict(accuracy=correct / max(count, 1), loss=loss / max(count, 1), count=int(count))


def save_checkpoint(out: Path, model, ema, optimizer, scheduler, epoch: int, history: list, ctx: Dist, args):
    from safetensors.torch import save_file

    rngs = ctx.gather(rng_state())
    if not ctx.main:
        return
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "checkpoint.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, str(out / "checkpoint_ema.safetensors"))
    state = dict(epoch=epoch, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rngs,
                 history=history, model=args.model, world=ctx.world)
    torch.save(state, out / "checkpoint_state.tmp")
    os.replace(out / "checkpoint_state.tmp", out / "checkpoint_state.pt")  # the state never half-written


def load_checkpoint(folder: Path, model, ema, optimizer, scheduler, ctx: Dist, args) -> tuple[int, list]:
    from safetensors.torch import load_file

    if not (folder / "checkpoint_state.pt").exists():
        fail(f"--resume {folder}: no checkpoint_state.pt there")
    state = torch.load(folder / "checkpoint_state.pt", map_location="cpu", weights_only=False)
    if state["model"] != args.model or state["world"] != ctx.world:
        fail(f"--resume {folder}: that run trained {state['model']} on {state['world']} process(es), "
             f"this one {args.model} on {ctx.world}")
    model.load_state_dict(load_file(str(folder / "checkpoint.safetensors"), device=str(ctx.device)))
    if ema is not None:
        ema.module.load_state_dict(load_file(str(folder / "checkpoint_ema.safetensors"), device=str(ctx.device)))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][ctx.rank])
    return state["epoch"] + 1, state["history"]


def write_log(out: Path, history: list) -> None:
    with (out / "log.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train_loss"] for row in history], label="train")
    for key in history[0]:
        if key.startswith("val") and key.endswith("_loss"):
            left.plot(epochs, [row[key] for row in history], label=key[:-5])
        if key.endswith("_acc"):
            right.plot(epochs, [row[key] for row in history], label=key[:-4])
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for axis in (left, right):
        axis.legend()
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader, DistributedSampler, Subset
    from tqdm import tqdm

    from mdlrnn.training import optimizer_step, warmup_cosine

    args = parse_args(argv)
    ctx = Dist(args.device)
    out = Path(args.out)
    if args.resume and not Path(args.resume).is_dir():
        fail(f"--resume {args.resume}: no such folder")
    amp = ctx.device.type == "cuda" if args.amp is None else args.amp
    seed_everything(args.seed)  # the same initial weights on every rank
    config = data_config(args.model)
    args.img_size = args.img_size or config["input_size"][-1]
    args.eval_sizes = args.eval_sizes or [args.img_size]
    train_set, val_sets, num_classes = datasets(args, config)
    model = create_model(args, num_classes)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(ctx.device)
    ema = ModelEmaV3(model, decay=args.ema_decay) if args.ema else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None) \
        if ctx.world > 1 else model
    seed_everything(args.seed + ctx.rank)  # different dropout and augmentation per rank

    sampler = DistributedSampler(train_set, ctx.world, ctx.rank, shuffle=True, seed=args.seed)
    loader_kw = dict(num_workers=args.workers, pin_memory=ctx.device.type == "cuda", persistent_workers=False)
    batch = min(args.batch_size, len(sampler))
    train_loader = DataLoader(train_set, batch, sampler=sampler, drop_last=True, **loader_kw)
    val_loaders = {s: DataLoader(Subset(v, range(ctx.rank, len(v), ctx.world)), args.batch_size, **loader_kw)
                   for s, v in val_sets.items()}
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay)
    steps = args.epochs * len(train_loader)
    warmup = max(1, round(args.warmup_epochs * len(train_loader)))
    scheduler = warmup_cosine(optimizer, steps, warmup, args.min_lr_ratio)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        if batch % 2:
            fail("--mixup/--cutmix need an even --batch-size")
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
    loss_fn = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=args.smoothing)

    start, history = 0, []
    if args.resume:
        start, history = load_checkpoint(Path(args.resume), model, ema, optimizer, scheduler, ctx, args)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    last = args.epochs if args.stop_after_epochs is None else min(args.epochs, start + args.stop_after_epochs)
    began = time.time()
    for epoch in range(start, last):
        sampler.set_epoch(epoch)
        net.train()
        totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, seen
        tick = time.time()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not ctx.main or args.no_progress,
                   leave=False)
        for images, labels in bar:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with torch.autocast(ctx.device.type, torch.bfloat16, enabled=amp):
                logits = net(images)
            loss = loss_fn(logits.float(), targets)
            optimizer_step(loss, model, optimizer, scheduler, args.clip_grad)
            if ema is not None:
                ema.update(model)
            totals += torch.stack([loss.detach() * labels.numel(), (logits.argmax(-1) == labels).sum(),
                                   torch.tensor(labels.numel(), device=ctx.device)]).double()
            if bar.n % 20 == 0 and not bar.disable:  # reading the totals waits for the device: not every step
                loss_sum, correct, seen = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{seen * ctx.world / (time.time() - tick):.0f}")
        loss_sum, correct, seen = ctx.sum(*totals.tolist())
        row = dict(epoch=epoch + 1, lr=optimizer.param_groups[0]["lr"], train_loss=loss_sum / seen,
                   train_acc=correct / seen, img_per_s=seen / (time.time() - tick))
        for size, loader in val_loaders.items():
            metrics = evaluate(model, loader, ctx, amp)
            row[f"val{size}_loss"], row[f"val{size}_acc"] = metrics["loss"], metrics["accuracy"]
            if ema is not None:
                row[f"ema{size}_acc"] = evaluate(ema.module, loader, ctx, amp)["accuracy"]
        history.append(row)
        save_checkpoint(out, model, ema, optimizer, scheduler, epoch, history, ctx, args)
        if ctx.main:
            write_log(out, history)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    summary = dict(config=vars(args), world_size=ctx.world, device=str(ctx.device),
                   device_name=torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
                   finished=last == args.epochs, seconds_this_run=time.time() - began,
                   params=sum(p.numel() for p in model.parameters()), history=history,
                   final=history[-1] if history else None)
    if ctx.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if ctx.world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
