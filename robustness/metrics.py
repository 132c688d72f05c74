"""ImageNet-C corruption errors, normalised by AlexNet (Hendrycks & Dietterich, 2019).

CE_c = sum_s E(s, c) / sum_s E_AlexNet(s, c); mCE = 100 x mean of CE_c over the 15 benchmark
corruptions. Relative CE_c = sum_s (E(s, c) - E_clean) / sum_s (E_AlexNet(s, c) - E_AlexNet_clean).
"""
from __future__ import annotations

# AlexNet top-1 error per corruption, mean over severities 1-5 (hendrycks/robustness).
ALEXNET_ERR = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948, "zoom_blur": 0.798360,
    "snow": 0.866816, "frost": 0.826572, "fog": 0.819324, "brightness": 0.564592, "contrast": 0.853204,
    "elastic_transform": 0.646056, "pixelate": 0.717840, "jpeg_compression": 0.606500,
}
# AlexNet's clean top-1 error: torchvision's AlexNet (56.52 % top-1), the model the table above was
# measured with; used only for the relative mCE.
ALEXNET_CLEAN_ERR = 0.43478
ALEXNET_CLEAN_SOURCE = "torchvision's AlexNet: acc@1 56.522 % on ImageNet val (error 43.478 %)"
BENCHMARK = tuple(ALEXNET_ERR)
# AlexNet top-1 error of the 4 extra corruptions (hendrycks/robustness README table): their CE is
# reported apart, never in mCE.
ALEXNET_ERR_EXTRA = {"speckle_noise": 0.845388, "gaussian_blur": 0.787108, "spatter": 0.717512,
                     "saturate": 0.658248}
EXTRA = tuple(ALEXNET_ERR_EXTRA)
SEVERITIES = (1, 2, 3, 4, 5)


def _ce(errors: dict, names: tuple, alexnet: dict, clean_error: float | None):
    """CE (and relative CE) of each complete corruption of ``names``, and what is missing."""
    ce, rel_ce, missing = {}, {}, []
    for c in names:
        cells = errors.get(c, {})
        absent = [s for s in SEVERITIES if s not in cells]
        if absent:
            missing.append(f"{c} (severities {absent})" if cells else c)
            continue
        total = sum(cells[s] for s in SEVERITIES)
        ce[c] = 100 * total / (len(SEVERITIES) * alexnet[c])
        if clean_error is not None:
            rel_ce[c] = 100 * (total - len(SEVERITIES) * clean_error) / (
                len(SEVERITIES) * (alexnet[c] - ALEXNET_CLEAN_ERR))
    return ce, rel_ce, missing


def corruption_errors(errors: dict[str, dict[int, float]], clean_error: float | None = None) -> dict:
    """``errors[corruption][severity]`` = top-1 error in [0, 1].

    Returns CE (and relative CE with ``clean_error``) per complete benchmark corruption, mCE
    (complete only when all 15 x 5 cells are there: otherwise ``mCE`` is None and ``mCE_status``
    says what is missing, never an average over fewer), the unnormalised mean error / accuracy over
    the benchmark cells present, and the same for the 4 extra corruptions, apart (``extra_*``).
    """
    ce, rel_ce, missing = _ce(errors, BENCHMARK, ALEXNET_ERR, clean_error)
    extra_ce, extra_rel_ce, extra_missing = _ce(errors, EXTRA, ALEXNET_ERR_EXTRA, clean_error)

    def status(absent):
        return "complete" if not absent else "incomplete: missing " + ", ".join(absent)

    cells = [e for c in BENCHMARK for e in errors.get(c, {}).values()]
    out = {
        "CE": ce,
        "mCE": sum(ce.values()) / len(ce) if not missing else None,
        "mCE_status": status(missing),
        "mean_error": 100 * sum(cells) / len(cells) if cells else None,
        "mean_accuracy": 100 * (1 - sum(cells) / len(cells)) if cells else None,
        "extra_CE": extra_ce,
        "extra_mCE": sum(extra_ce.values()) / len(extra_ce) if not extra_missing else None,
        "extra_mCE_status": status(extra_missing),
        "extra_mean_error": {c: 100 * sum(v.values()) / len(v) for c in EXTRA if (v := errors.get(c))},
    }
    if clean_error is not None:
        out["relative_CE"] = rel_ce
        out["relative_mCE"] = sum(rel_ce.values()) / len(rel_ce) if not missing else None
        out["extra_relative_CE"] = extra_rel_ce
        out["clean_error"] = 100 * clean_error
        out["alexnet_clean_error"] = 100 * ALEXNET_CLEAN_ERR
        out["alexnet_clean_error_source"] = ALEXNET_CLEAN_SOURCE
    return out
