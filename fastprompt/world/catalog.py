"""The world's dataset names: `world_<task>` (clean domain) and `world_<task>_<domain>`.

Kept apart from dataset.py (which renders and reads images) so that the dataset registry can list
the names without importing the data layer back into itself.
"""
from __future__ import annotations

from .domains import DOMAINS
from .tasks import TASKS

FOLDER = "world"  # under the data root
LAYOUT = (
    "<data root>/world/<domain>/{train,val,test}/<colour>_<shape>/*.png   (rendered by fastprompt on first "
    "use; delete the folder to render it again)"
)


def dataset_name(task: str, domain: str = "clean") -> str:
    return f"world_{task}" if domain == "clean" else f"world_{task}_{domain}"


def dataset_names() -> dict[str, tuple[str, str]]:
    """Every world dataset name -> (task, domain)."""
    return {dataset_name(t, d): (t, d) for t in TASKS for d in DOMAINS}
