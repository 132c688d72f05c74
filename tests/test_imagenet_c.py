"""The ImageNet-C generator: layout, reproducibility (per-image seeds), and the original algorithms of
elastic_transform and frost, checked against what their definitions imply."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from fixtures import ROOT
from PIL import Image

from rcmae.robustness.imagenet_c import (
    ELASTIC,
    FROST_FILES,
    JPEG_QUALITY,
    elastic_transform,
    frost,
    frost_image,
    make_imagenet_c,
)

# Every corruption with random draws that the tests exercise, each of the fork's generators among them:
# NumPy's global state (gaussian / shot / speckle noise, spatter), numba's (glass_blur), skimage's
# Generator (impulse_noise), and this module's RandomState (frost).
RANDOM = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "spatter", "frost"]


def _photo_folder(root, wnids, per_class, size=(60, 40), same=False):
    """``root/<wnid>/<i>.JPEG``; with ``same`` every file holds the same image."""
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for w in wnids:
        (root / w).mkdir(parents=True)
        for i in range(per_class):
            img = shared if same else rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / w / f"{i}.JPEG")
    return root


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*.JPEG"))}


@pytest.fixture(scope="module")
def identical(tmp_path_factory):
    """16 identical source images, generated with 1 worker and with 2 (separate runs; the 1-worker run
    first, so that the forked workers inherit glass_blur's compiled numba code)."""
    tmp = tmp_path_factory.mktemp("identical")
    val = _photo_folder(tmp / "val", ["n01440764", "n02102040"], 8, same=True)
    assert make_imagenet_c(val, tmp / "w1", RANDOM, [1], workers=1, show_progress=False).written == 16 * len(RANDOM)
    assert make_imagenet_c(val, tmp / "w2", RANDOM, [1], workers=2, show_progress=False).written == 16 * len(RANDOM)
    return val, tmp


def test_every_file_gets_its_own_draws(identical):
    _, tmp = identical
    for corruption in RANDOM:
        images = [np.asarray(Image.open(p)) for p in sorted((tmp / "w2" / corruption / "1").rglob("*.JPEG"))]
        assert len(images) == 16
        distinct = {a.tobytes() for a in images}
        assert len(distinct) == 16, f"{corruption}: {len(distinct)} distinct outputs of 16 identical images"


def test_output_does_not_depend_on_workers_reruns_or_interruptions(identical):
    val, tmp = identical
    reference = _files(tmp / "w2")
    assert len(reference) == 16 * len(RANDOM) and _files(tmp / "w1") == reference
    # interrupted: some files missing, one half-written .tmp left behind
    gone = [tmp / "w1" / c / "1" / "n02102040" / f"{i}.JPEG" for c in ("glass_blur", "impulse_noise", "frost")
            for i in (0, 5)]
    for f in gone:
        f.unlink()
    (tmp / "w1" / "spatter" / "1" / "n01440764" / "3.JPEG.tmp").write_bytes(b"partial")
    assert make_imagenet_c(val, tmp / "w1", RANDOM, [1], workers=2, show_progress=False).written == len(gone)
    assert _files(tmp / "w1") == reference and not list((tmp / "w1").rglob("*.tmp"))


def test_seed_changes_every_random_file_and_is_kept_on_resume(identical, tmp_path):
    val, tmp = identical
    shown = ["gaussian_noise", "impulse_noise", "glass_blur", "frost"]
    make_imagenet_c(val, tmp_path / "s1", shown, [1], seed=1, show_progress=False)
    seed0, seed1 = _files(tmp / "w2"), _files(tmp_path / "s1")
    assert len(seed1) == 16 * len(shown) and all(seed1[k] != seed0[k] for k in seed1)
    with pytest.raises(ValueError, match=r"generated with seed 1 .*resume it with that seed"):
        make_imagenet_c(val, tmp_path / "s1", shown, [1], seed=0, show_progress=False)


def test_generation_leaves_the_callers_numpy_state_alone(tmp_path):
    val = _photo_folder(tmp_path / "val", ["n01440764"], 1)
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    make_imagenet_c(val, tmp_path / "c", ["gaussian_noise", "frost"], [2], show_progress=False)
    assert np.array_equal(np.random.random(3), expected)


def test_generator_layout_size_quality_and_resume(tmp_path):
    val = _photo_folder(tmp_path / "val", ["n02123045", "n07920052"], 1, size=(300, 200))
    generated = make_imagenet_c(val, tmp_path / "c", corruptions=["gaussian_noise", "fog"], severities=[1, 5],
                                show_progress=False)
    assert generated.written == 2 * 2 * 2 and generated.unreadable == {}
    files = sorted(p.relative_to(tmp_path / "c").as_posix() for p in (tmp_path / "c").rglob("*.JPEG"))
    assert files[0] == "fog/1/n02123045/0.JPEG" and len(files) == 8
    ref = tmp_path / "ref.jpg"
    Image.new("RGB", (224, 224), (9, 99, 199)).save(ref, quality=JPEG_QUALITY)
    for f in (tmp_path / "c").rglob("*.JPEG"):
        img = Image.open(f)
        assert img.size == (224, 224) and img.format == "JPEG"
        assert img.quantization == Image.open(ref).quantization  # the tables of quality 85
    assert make_imagenet_c(val, tmp_path / "c", corruptions=["gaussian_noise", "fog"], severities=[1, 5],
                           show_progress=False).written == 0  # resumable: finished files are kept


def test_clear_errors(tmp_path):
    val = _photo_folder(tmp_path / "val", ["n02123045"], 1)
    with pytest.raises(ValueError, match="unknown corruptions"):
        make_imagenet_c(val, tmp_path / "c", corruptions=["rain"])
    with pytest.raises(ValueError, match=r"severities must be in \(1, 2, 3, 4, 5\), got \[6\]"):
        make_imagenet_c(val, tmp_path / "c", severities=[6])
    with pytest.raises(TypeError, match="seed must be an integer"):
        make_imagenet_c(val, tmp_path / "c", seed=1.5)
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        make_imagenet_c(val, tmp_path / "c", workers=0)
    with pytest.raises(FileNotFoundError, match="--val: image folder .*missing does not exist"):
        make_imagenet_c(tmp_path / "missing", tmp_path / "c")
    Image.new("RGB", (40, 40)).save(val / "n02123045" / "0.png")
    with pytest.raises(ValueError, match=r"n02123045/0.JPEG and n02123045/0.png would both be written as"):
        make_imagenet_c(val, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing is written before the checks pass


def _tool():
    spec = importlib.util.spec_from_file_location("make_imagenet_c_tool", ROOT / "tools" / "make_imagenet_c.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_seed_and_errors(tmp_path, capsys):
    main = _tool()
    val = _photo_folder(tmp_path / "val", ["n02123045"], 2)
    main(["--val", str(val), "--out", str(tmp_path / "cli"), "--corruptions", "shot_noise", "--severities", "3",
          "--seed", "5", "--workers", "2"])
    assert "wrote 2 images" in capsys.readouterr().out
    make_imagenet_c(val, tmp_path / "api", ["shot_noise"], [3], seed=5, show_progress=False)
    assert _files(tmp_path / "cli") == _files(tmp_path / "api")
    with pytest.raises(SystemExit, match="error: --val: image folder .* does not exist"):
        main(["--val", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="error: .*generated with seed 5"):
        main(["--val", str(val), "--out", str(tmp_path / "cli"), "--corruptions", "shot_noise"])


@pytest.mark.parametrize("workers", [1, 2])
def test_unreadable_images_are_skipped_counted_and_reported(tmp_path, capsys, caplog, workers):
    """A truncated JPEG (a real photo cut mid-scan) and an empty file: every other image is generated, the two
    are named in the log, the tool's summary and <out>/unreadable.json."""
    import json

    import skimage.data

    val = _photo_folder(tmp_path / "val", ["n02123045"], 2)
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.jpg", quality=90)
    data = (tmp_path / "cat.jpg").read_bytes()
    (val / "n02123045" / "truncated.JPEG").write_bytes(data[:len(data) // 2])
    (val / "n02123045" / "empty.JPEG").write_bytes(b"")
    out = tmp_path / "c"
    _tool()(["--val", str(val), "--out", str(out), "--corruptions", "fog", "contrast", "--severities", "1",
             "--workers", str(workers)])
    printed = capsys.readouterr()
    assert sorted(_files(out)) == [f"{c}/1/n02123045/{i}.JPEG" for c in ("contrast", "fog") for i in (0, 1)]
    assert "wrote 4 images" in printed.out and "skipped 2 unreadable images" in printed.out
    for name in ("n02123045/empty.JPEG", "n02123045/truncated.JPEG"):
        assert name in printed.out and name in caplog.text  # the summary and the log
    report = json.loads((out / "unreadable.json").read_text())
    assert sorted(report["unreadable"]) == ["n02123045/empty.JPEG", "n02123045/truncated.JPEG"]
    assert "truncated" in report["unreadable"]["n02123045/truncated.JPEG"]


# ---- the original algorithms (hendrycks/robustness make_imagenet_c.py), from their definitions ----


def _find_window(haystack, needle):
    """Top-left corners where ``needle`` occurs in ``haystack`` (exact)."""
    h, w = needle.shape[:2]
    H, W = haystack.shape[0] - h + 1, haystack.shape[1] - w + 1
    candidates = np.ones((H, W), bool)
    for y, x in [(0, 0), (h - 1, w - 1), (h // 2, w // 3), (h // 3, w - 1), (h - 1, 0), (7, 101)]:
        candidates &= (haystack[y:y + H, x:x + W] == needle[y, x]).all(-1)
    return [(y, x) for y, x in np.argwhere(candidates) if np.array_equal(haystack[y:y + h, x:x + w], needle)]


def test_frost_is_a_native_resolution_window_of_one_of_the_first_five_photos():
    # on a black image, severity 1 (image weight 1, frost weight 0.4) leaves 0.4 x the frost window
    # (frost2.png and frost3.png hold the same pixels: a window of one is found in both)
    scaled = {name: np.uint8(0.4 * frost_image(name)) for name in (*FROST_FILES, "frost6.jpg")}
    used = set()
    for s in range(12):
        out = np.uint8(frost(Image.new("RGB", (224, 224)), 1, np.random.RandomState(s)))
        hits = tuple(name for name, photo in scaled.items() if _find_window(photo, out))
        assert hits and "frost6.jpg" not in hits, (s, hits)
        used.add(hits)
    assert len(used) >= 3  # the photo is drawn, not fixed


def test_elastic_transform_is_an_affine_warp_plus_a_smoothed_uniform_field():
    # A coordinate ramp (value = column, row) comes back as the source coordinate of every pixel.
    # Severity 5 of the original: affine anchors moved by up to 0.02 x 244 px, field = uniform(-1, 1)
    # smoothed with sigma 0.01 x 244 (truncated at 3 sigma), times alpha 0.12 x 244. So the field's
    # per-axis std is alpha x sqrt(1/3) x sum(g^2) of the normalised 1-D kernel g, and the rest of the
    # displacement is affine, up to ~the anchor shift.
    alpha, sigma, shift = (244 * v for v in ELASTIC[4])
    n, m = 224, 24
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramp = np.stack([cols, rows, np.zeros_like(rows)], -1).astype(np.float32)
    k = np.arange(-int(3 * sigma + 0.5), int(3 * sigma + 0.5) + 1)
    g = np.exp(-k ** 2 / (2 * sigma ** 2))
    expected_std = alpha * np.sqrt(1 / 3) * np.sum((g / g.sum()) ** 2)  # 1.95 px
    inner = (slice(m, n - m), slice(m, n - m))
    design = np.stack([cols[inner].ravel(), rows[inner].ravel(), np.ones((n - 2 * m) ** 2)], 1)
    stds, affine = [], []
    for s in range(4):
        out = elastic_transform(ramp, 5, np.random.RandomState(s))
        disp = np.stack([out[..., 0] - cols, out[..., 1] - rows], -1)[inner].reshape(-1, 2)
        coef, *_ = np.linalg.lstsq(design, disp, rcond=None)
        stds.append((disp - design @ coef).std(0))
        affine.append(np.abs(design @ coef).max())
    assert np.allclose(np.mean(stds, 0), expected_std, rtol=0.12), (np.mean(stds, 0), expected_std)
    assert 0.3 < max(affine) < 2.5 * shift, affine
    assert np.array_equal(elastic_transform(ramp, 5, np.random.RandomState(0)),
                          elastic_transform(ramp, 5, np.random.RandomState(0)))
