"""Robustness evaluation defaults and the benchmark keys."""


DEFAULTS = {
    # arch / img_size: read from the checkpoint where it tells them (ours, MAE); a timm model name
    # for timm state dicts. preprocessing: auto (follows the weights) | mae | timm
    "model": {"checkpoint": None, "arch": None, "img_size": None, "preprocessing": "auto"},
    # source: folder (the benchmark folders below) | demo (tiny trees built from real photos)
    "data": {"source": "folder", "imagenet_val": None, "imagenet_c": None, "imagenet_a": None,
             "imagenet_r": None, "imagenet_sketch": None, "imagenet_c_resize": False, "crop_pct": None,
             "batch_size": 128, "num_workers": 8},
    # resume: auto (skip what results.jsonl holds) | none (evaluate everything again)
    "train": {"output_dir": "output/robustness", "device": "auto", "precision": "auto", "resume": "auto"},
}


DATASETS = ("imagenet_val", "imagenet_c", "imagenet_a", "imagenet_r", "imagenet_sketch")
