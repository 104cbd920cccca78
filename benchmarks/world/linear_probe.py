"""How far a classifier on fastprompt-world's frozen image features gets on each half of a world task:
the part of zero-shot's headroom that any method leaving the image encoder as it is can reach.

For each half (base, new) of each dataset: a linear classifier (Adam, 1,500 full-batch steps on the
L2-normalised image features, no augmentation) trained on the first SHOTS training images of every
class of that half, tested on all its test images; printed beside zero-shot CLIP on the same half.
docs/world.md ("Choosing the split") quotes its output.

    OMP_NUM_THREADS=1 python benchmarks/world/linear_probe.py runs/world/data world_by_shape_clutter ...
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastprompt.clip import load_clip
from fastprompt.data import load_dataset
from fastprompt.world.probe import class_text_features, image_features


def _features(clip, samples) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = np.stack([np.asarray(Image.open(s.path).convert("RGB")) for s in samples])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return image_features(clip.model, images, clip.mean, clip.std), torch.tensor([s.label for s in samples])


def _linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 1500) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(head(x), y).backward()
        optimizer.step()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="the data root the world is rendered into")
    parser.add_argument("datasets", nargs="+", help="world_* dataset names")
    parser.add_argument("--shots", type=int, nargs="+", default=[8, 32], help="training images per class (8 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clip = load_clip("fastprompt-world", "world")
    print(f"load average {os.getloadavg()[0]:.2f}")
    for name in args.datasets:
        splits = load_dataset(name, args.root)
        n_base = (len(splits.classnames) + 1) // 2
        text = class_text_features(clip.model, clip.tokenizer, splits.classnames)
        x_test, y_test = _features(clip, splits.test)
        for part, labels in (("base", range(n_base)), ("new", range(n_base, len(splits.classnames)))):
            lo, hi = labels.start, labels.stop
            test = (y_test >= lo) & (y_test < hi)
            zero_shot = ((x_test[test] @ text[lo:hi].T).argmax(1) == y_test[test] - lo).float().mean() * 100
            cells = [f"zero-shot {zero_shot:.2f}"]
            for shots in args.shots:
                train = [s for label in labels for s in [t for t in splits.train if t.label == label][:shots]]
                x, y = _features(clip, train)
                head = _linear_probe(x, y - lo, hi - lo)
                with torch.no_grad():
                    accuracy = (head(x_test[test]).argmax(1) == y_test[test] - lo).float().mean() * 100
                cells.append(f"linear probe {shots} shots {accuracy:.2f}")
            print(f"{name} {part}: " + ", ".join(cells), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
