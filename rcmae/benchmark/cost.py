"""What a backbone costs: parameters, FLOPs per image, inference throughput and peak memory (``rcmae-measure-cost``).

The encoder is measured as it is used downstream: timm's VisionTransformer without a head (``num_classes=0``),
class-token pooled, in eval mode, without gradients. It comes from a checkpoint of any supported origin (ours,
official MAE / RC-MAE, an exported encoder, a timm ViT state dict), which also tells its architecture and input
size, or is a random ``model.arch``. torch, timm and fvcore are imported where they are used, so that the
command line's ``--help`` answers without them.
"""
from __future__ import annotations

import json
import logging
import math
import platform
import resource
import time
import warnings

from rcmae.core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULTS = {
    # checkpoint: any supported origin (None: a random model.arch); which: auto | teacher | student (pretraining
    # checkpoints); arch / img_size: read from the checkpoint (arch is required without one)
    "model": {"checkpoint": None, "which": "auto", "arch": None, "img_size": None},
    # the throughput: batch_size random images, warmup_iters untimed forwards, then iters timed ones
    "cost": {"batch_size": 64, "warmup_iters": 3, "iters": 10},
    "train": {"output_dir": "output/cost", "device": "auto", "precision": "auto"},
}

DEFAULT_IMG_SIZE = 224  # the input of every registered arch's timm model, for a random model without img_size

FLOPS_COUNTING = ("fvcore's count for one image: one multiply-add is one flop (so these are MACs); matrix "
                  "products, convolutions, attention (Q K^T and weights x V) and layer norms (5 per element) are "
                  "counted, the operators in uncounted_ops (additions, GELU, ...) are not")


def checkpoint_spec(path: str, which: str) -> tuple[str, int]:
    """(arch, input size) of the encoder a checkpoint holds, read off its tensor shapes."""
    from rcmae.core.checkpoint import encoder_arch, read_checkpoint

    _, sd = read_checkpoint(path).model(which)
    return encoder_arch(sd, f"model.checkpoint: {path}")


def model_spec(m: dict) -> tuple[str, int]:
    """The (arch, input size) to measure: the checkpoint's, or ``model.arch``; ``model.img_size`` overrides the
    checkpoint's size (the position embedding is interpolated), 224 px for a random model without one."""
    from rcmae.core.vit import ARCHS, check_arch

    if m["checkpoint"] is None:
        if m["arch"] is None:
            raise ConfigError(f"model.arch (--arch) is required without model.checkpoint (--checkpoint): the ViT "
                              f"to measure, one of {', '.join(ARCHS)}")
        arch, size = m["arch"], DEFAULT_IMG_SIZE
    else:
        arch, size = checkpoint_spec(m["checkpoint"], m["which"])
        if m["arch"] not in (None, arch):
            raise ConfigError(f"model.arch={m['arch']}, but {m['checkpoint']} holds a {arch}: drop model.arch "
                              "(--arch), which is read from the checkpoint")
    img_size = size if m["img_size"] is None else m["img_size"]
    check_arch(arch, img_size)
    return arch, img_size


def validate(cfg: dict, world: int) -> None:
    """Check a config before any work: the counts, the checkpoint file and that it holds one of our ViTs (one
    measurement whatever the number of processes ``world``)."""
    from rcmae.core.checkpoint import check_checkpoint_option, check_which

    m, c = cfg["model"], cfg["cost"]
    for key, value, least in (("model.img_size", m["img_size"], 1), ("cost.warmup_iters", c["warmup_iters"], 0),
                              ("cost.iters", c["iters"], 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise ConfigError(f"{key} must be an integer of {least} or more, got {value!r}")
    check_which("model.which", m["which"])
    check_checkpoint_option("model.checkpoint", m["checkpoint"])
    model_spec(m)


def sdpa_flop_jit(inputs: list, outputs: list) -> int:
    """fvcore's handle for ``aten::scaled_dot_product_attention`` (timm's fused attention, which fvcore does not
    know): the multiply-adds of Q K^T and of the attention weights times V. The softmax is left out, as fvcore
    leaves out GELU and additions."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])  # (..., L, E), (..., S, E), (..., S, Ev)
    return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def count_flops(model, img_size: int) -> tuple[int, dict[str, int]]:
    """fvcore's FLOPs of ``model`` (on the CPU) for one image, and the operators it met but did not count (name ->
    times)."""
    import torch

    with warnings.catch_warnings():  # fvcore's deprecations and the tracer's notes on timm's shape checks
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = (FlopCountAnalysis(model, torch.zeros(1, 3, img_size, img_size))
                    .set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
                    .unsupported_ops_warnings(False).uncalled_modules_warnings(False))
        return analysis.total(), dict(analysis.unsupported_ops())


def time_forwards(model, device, amp_dtype, batch_size: int, img_size: int, warmup_iters: int,
                  iters: int) -> tuple[float, float, str]:
    """Images per second over ``iters`` forwards of a random batch after ``warmup_iters`` untimed ones, the peak
    memory in GiB and what that peak is: on CUDA the memory allocated during the timed forwards, on the CPU the
    process's peak resident set (everything it ever held, not only the model's working memory)."""
    import torch

    from rcmae.core.progress import progress

    cuda = device.type == "cuda"
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    bar = progress(total=warmup_iters + iters, desc="forwards (warm-up, timed)")
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        for _ in range(warmup_iters):
            model(images)
            bar.update()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
            bar.update()
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    bar.close()
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated(device) / 2 ** 30, "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, "process_peak_rss"  # KiB
    return batch_size * iters / seconds, peak, kind


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"


def measure(cfg: dict, run) -> dict:
    """Build (and load) the encoder, then count and time it: the record cost.json holds."""
    import torch

    from rcmae.core.vit import build_classifier
    from rcmae.finetune.models import load_backbone

    m, c = cfg["model"], cfg["cost"]
    arch, img_size = model_spec(m)
    model = build_classifier(arch, img_size, num_classes=0, global_pool="token")
    if m["checkpoint"]:
        which = load_backbone(model, m["checkpoint"], m["which"]).which  # teacher / student; the load logs its report
    else:
        which = None
        log.warning("no model.checkpoint: measuring a randomly initialised %s", arch)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    flops, uncounted = count_flops(model, img_size)
    throughput, memory, memory_kind = time_forwards(model.to(run.device), run.device, run.amp_dtype,
                                                    c["batch_size"], img_size, c["warmup_iters"], c["iters"])
    return {"arch": arch, "img_size": img_size, "checkpoint": m["checkpoint"], "which": which,
            "params": params, "params_m": round(params / 1e6, 6),
            "flops_per_image": flops, "gflops_per_image": round(flops / 1e9, 6), "flops_counting": FLOPS_COUNTING,
            "uncounted_ops": uncounted, "throughput_img_per_s": round(throughput, 2),
            "batch_size": c["batch_size"], "warmup_iters": c["warmup_iters"], "iters": c["iters"],
            "precision": run.precision, "device": device_name(run.device),
            "peak_memory_gib": round(memory, 4), "memory_kind": memory_kind, "torch": torch.__version__}


def summary(r: dict) -> str:
    """The record in one line, for the log."""
    return (f"{r['arch']} at {r['img_size']} px: {r['params_m']:.4g} M parameters, {r['gflops_per_image']:.4g} "
            f"GFLOPs per image (multiply-adds), {r['throughput_img_per_s']:.1f} img/s at batch {r['batch_size']} "
            f"({r['precision']}, {r['device']}), peak memory {r['peak_memory_gib']:.2f} GiB ({r['memory_kind']})")


def main(cfg: dict) -> dict:
    """Measure on the main process and write ``cost.json``; under several processes the others wait. Returns the
    output paths and, on the main process, the numbers."""
    from rcmae.core.distributed import barrier
    from rcmae.core.run import start_run

    run = start_run(cfg, validate)  # checked before the output directory is touched
    path = run.out_dir / "cost.json"
    out = {"output_dir": str(run.out_dir), "result": str(path)}
    if run.env.is_main:
        result = measure(cfg, run)
        path.write_text(json.dumps(result, indent=2) + "\n")
        log.info(summary(result))
        out.update({k: result[k] for k in ("params", "flops_per_image", "throughput_img_per_s", "peak_memory_gib")})
    barrier()  # one measurement, alone on the machine: the other processes wait for it
    return out
