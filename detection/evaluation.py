"""COCO box / mask AP through detectron2's COCOEvaluator (pycocotools), with exact zeros for no output."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

log = logging.getLogger(__name__)


def has_compiled_ops() -> bool:
    try:
        from detectron2 import _C  # noqa: F401
        return True
    except ImportError:
        return False


class COCOEval(COCOEvaluator):
    """COCOEvaluator for bbox + segm. A model with no detections scores AP 0 (detectron2 reports NaN);
    the fast C++ COCOeval is used only when detectron2's compiled ops are there."""

    def __init__(self, dataset_name: str, output_dir: str | None = None, distributed: bool = True):
        super().__init__(dataset_name, tasks=("bbox", "segm"), distributed=distributed,
                         output_dir=output_dir, use_fast_impl=has_compiled_ops())
        self.across_processes = distributed

    def evaluate(self, img_ids=None):
        detections = sum(len(p.get("instances", [])) for p in self._predictions)  # this process's images
        if self.across_processes:
            detections = sum(comm.all_gather(detections))
        results = super().evaluate(img_ids)
        if not results:  # not the main process
            return results
        if detections == 0:
            results = {task: {k: 0.0 if isinstance(v, float) and math.isnan(v) else v
                              for k, v in metrics.items()} for task, metrics in results.items()}
        return results


def write_results(results: dict, output_dir: str | Path, name: str, evaluated: dict | None = None
                  ) -> tuple[Path, Path]:
    """``<name>.json`` (every number, and ``evaluated``: what the numbers rest on) and ``<name>.md`` (a
    readable table of the main APs)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    js = output_dir / f"{name}.json"
    js.write_text(json.dumps({**results, **({"evaluated": evaluated} if evaluated else {})}, indent=2) + "\n")
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    lines = ["| task | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for task in ("bbox", "segm"):
        if task in results:
            lines.append(f"| {task} | " + " | ".join(f"{results[task].get(k, float('nan')):.1f}"
                                                  for k in keys) + " |")
    md = output_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    log.info("evaluation results:\n%s", "\n".join(lines))
    return js, md
