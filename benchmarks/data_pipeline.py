"""Training-input throughput: in-memory tensor batches vs the naive per-image pipeline.

dnnmod keeps a dataset as one uint8 tensor on the device and builds each batch with tensor
ops (index, normalise, random crop + flip for the whole batch). The naive way, common in
research code, is a torchvision Dataset that turns every image into a PIL image and runs
per-sample transforms inside a DataLoader. Both produce the same kind of batch; this measures
images per second for one epoch of each, and one epoch of training of a base model for scale,
and prints the ratios from one run.

    python benchmarks/data_pipeline.py --dataset digits --arch simcnn --width 0.125
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision import transforms
from torchvision.transforms import functional

from dnnmod.data import load_dataset, prepare
from dnnmod.models import build_model
from dnnmod.training.train import augment


class PerImageDataset(torch.utils.data.Dataset):
    """The naive baseline: one PIL image and a chain of per-sample transforms per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std) -> None:
        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.RandomCrop(images.shape[-1], padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(mean.flatten().tolist(),
                                                        std.flatten().tolist())])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(functional.to_pil_image(self.images[index])), self.labels[index]


def time_epoch(batches) -> float:
    started = time.perf_counter()
    for x, _ in batches:
        x.sum().item()  # consume the batch
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--root", default="data")
    parser.add_argument("--arch", default="simcnn")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    root = Path(args.root)
    if not (root / args.dataset / "images.safetensors").exists():
        prepare(args.dataset, root)
    train = load_dataset(root, args.dataset, seed=0).train
    n = len(train)

    def tensor_batches():
        generator = torch.Generator().manual_seed(0)
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, args.batch_size):
            x, y = train.float_batch(order[start:start + args.batch_size])
            yield augment(x, ("crop", "flip"), generator), y

    naive = torch.utils.data.DataLoader(
        PerImageDataset(train.images, train.labels, train.mean, train.std),
        batch_size=args.batch_size, shuffle=True, num_workers=0)

    tensor_seconds = min(time_epoch(tensor_batches()) for _ in range(3))
    naive_seconds = min(time_epoch(naive) for _ in range(3))

    model = build_model(args.arch, train.num_classes, args.width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    started = time.perf_counter()
    for x, y in tensor_batches():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - started

    print(f"dataset {args.dataset}: {n} training images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    print(f"in-memory tensor batches : {n / tensor_seconds:10.0f} images/s")
    print(f"per-image PIL pipeline   : {n / naive_seconds:10.0f} images/s")
    print(f"{args.arch} x{args.width} training step: {n / train_seconds:10.0f} images/s")
    print(f"speed-up of tensor batches over the naive pipeline: "
          f"{naive_seconds / tensor_seconds:.1f}x")
    print(f"input pipeline share of a training epoch: tensor "
          f"{100 * tensor_seconds / train_seconds:.1f} %, naive "
          f"{100 * naive_seconds / train_seconds:.1f} %")


if __name__ == "__main__":
    main()
