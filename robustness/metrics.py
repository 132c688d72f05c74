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
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")  # held out: never in mCE
SEVERITIES = (1, 2, 3, 4, 5)


def corruption_errors(errors: dict[str, dict[int, float]], clean_error: float | None = None) -> dict:
    """``errors[corruption][severity]`` = top-1 error in [0, 1].

    Returns CE (and relative CE with ``clean_error``) per benchmark corruption, mCE (complete
    only when all 15 x 5 cells are there: otherwise ``mCE`` is None and ``mCE_status`` says what
    is missing, never an average over fewer), the unnormalised mean error / accuracy over the
    cells present, and the extra corruptions' mean errors, reported apart.
    """
    ce, rel_ce, missing = {}, {}, []
    for c in BENCHMARK:
        cells = errors.get(c, {})
        absent = [s for s in SEVERITIES if s not in cells]
        if absent:
            missing.append(f"{c} (severities {absent})" if cells else c)
            continue
        total = sum(cells[s] for s in SEVERITIES)
        ce[c] = total / (len(SEVERITIES) * ALEXNET_ERR[c])
        if clean_error is not None:
            rel_ce[c] = (total - len(SEVERITIES) * clean_error) / (
                len(SEVERITIES) * (ALEXNET_ERR[c] - ALEXNET_CLEAN_ERR))
    complete = not missing
    cells = [e for c in BENCHMARK for e in errors.get(c, {}).values()]
    out = {
        "CE": {c: 100 * v for c, v in ce.items()},
        "mCE": 100 * sum(ce.values()) / len(ce) if complete else None,
        "mCE_status": "complete" if complete else "incomplete: missing " + ", ".join(missing),
        "mean_error": 100 * sum(cells) / len(cells) if cells else None,
        "mean_accuracy": 100 * (1 - sum(cells) / len(cells)) if cells else None,
        "extra_mean_error": {c: 100 * sum(v.values()) / len(v) for c in EXTRA
                             if (v := errors.get(c))},
    }
    if clean_error is not None:
        out["relative_CE"] = {c: 100 * v for c, v in rel_ce.items()}
        out["relative_mCE"] = 100 * sum(rel_ce.values()) / len(rel_ce) if complete else None
        out["clean_error"] = 100 * clean_error
        out["alexnet_clean_error"] = 100 * ALEXNET_CLEAN_ERR
        out["alexnet_clean_error_source"] = ALEXNET_CLEAN_SOURCE
    return out
