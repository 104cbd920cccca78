"""Whole base-to-new runs (one seed: few-shot sample, train on base, test base and new) of both
styles, timed end to end through the same protocol code (`run_protocol`): the fast style with
fastprompt's Session, the official style with fastprompt.official's OfficialSession."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from ..clip import load_clip
from ..config import load_config
from ..official import OfficialSession
from ..protocols import Session, run_protocol, silent
from .stepper import method_options
from .timing import peak_memory, reset_memory, sync

__all__ = ["whole_run"]


def whole_run(style: str, method: str, *, data_root: Path, out: Path, model: str, device: torch.device,
              shots: int, epochs: int, batch: int, num_workers: int, compile: bool = False,
              text_chunk_size: Optional[int] = None, feature_cache_dir: Optional[Path] = None) -> dict:
    """Wall time, peak memory and accuracies of one base-to-new run on the ImageFolder at data_root."""
    reset_memory(device)
    t0 = time.perf_counter()
    overrides = [f"output_dir={out}", f"model.name={model}", "model.pretrained=null", "data.dataset=imagefolder",
                 f"data.root={data_root}", "data.seeds=[1]", f"data.shots={shots}", f"train.epochs={epochs}",
                 f"train.batch_size={batch}", "train.precision=bf16", f"train.device={device}",
                 f"train.num_workers={num_workers}", "train.progress=false", f"train.compile={compile}",
                 "method.name=" + method, "protocol.name=base2new"]
    if text_chunk_size:
        overrides.append(f"train.text_chunk_size={text_chunk_size}")
    if feature_cache_dir is not None:
        overrides.append(f"data.cache_dir={feature_cache_dir}")
    # Prompt depths clipped to the model's layers (MaPLe, DPL, IVLP, PromptSRC).
    overrides += [f"method.options.{key}={value}" for key, value in method_options(method, load_clip(model, None)).items()]
    session = OfficialSession if style == "official" else Session
    run = run_protocol(load_config(None, overrides), say=silent, session=session)["runs"][0]
    sync(device)
    return {"style": style, "method": method, "seconds": time.perf_counter() - t0,
            "peak_memory_bytes": peak_memory(device), "accuracy": {"base": run["base"], "new": run["new"]}}
