"""fastprompt's data layer: dataset layouts, few-shot and base/new splits, the decoded training
image cache, batched on-device augmentation and the evaluation loader."""
from .augment import GpuAugment, sample_crop_boxes
from .datasets import DATASETS, DatasetSpec, load_dataset, locate_dataset
from .digits import DIGIT_NAMES, write_digits_imagefolder
from .errors import DatasetError
from .eval_loader import EvalLoader, eval_loader, eval_transform
from .few_shot import few_shot_split
from .image_cache import TrainImageCache
from .splits import DatasetSplits, Sample, split_base_new, subset_classes

__all__ = [
    "DATASETS", "DIGIT_NAMES", "DatasetError", "DatasetSpec", "DatasetSplits", "EvalLoader", "GpuAugment",
    "Sample", "TrainImageCache", "eval_loader", "eval_transform", "few_shot_split", "load_dataset", "locate_dataset",
    "sample_crop_boxes", "split_base_new", "subset_classes", "write_digits_imagefolder",
]
