#!/usr/bin/env bash
# Make detectron2 importable for detection/ (the ViTDet configs need detectron2 + timm).
#   1. an already installed detectron2 is kept;
#   2. else the upstream source at a pinned commit of detectron2's main branch is built, where it can
#      be reached (CUDA ops with FORCE_CUDA=1 or a visible GPU): what a GPU cluster should use;
#   3. else the pure-Python part of PyPI's sal-detectron2 0.7.2 (upstream code of 2024-04) is unpacked
#      beside site-packages: its compiled _C (CUDA 12 / Python 3.10) is left out. The ViTDet path does
#      not need it (RoIAlign and NMS come from torchvision); deformable convolutions and rotated boxes
#      would. Good for CPU runs, tests and debugging.
# An installed detectron2 older than 650c60ed (2023-01-18) lacks comm.create_local_process_group,
# which multi-GPU runs call: it is replaced. tests/test_detection_api.py checks that every detectron2
# API the project uses exists (in the installed one; at the pinned commit given DETECTRON2_GIT_DIR).
# Usage: bash tools/install_detectron2.sh   (PYTHON=/path/to/python to pick the interpreter)
set -euo pipefail
PY=${PYTHON:-python}
# main's head of 2026-06-06 ("Fix CQS signal cppcoreguidelines-pro-type-member-init"); includes
# 650c60ed (local process groups), 70f45430 (numpy 2) and 400a49c1 (random.sample on a set, Python 3.11)
COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
UPSTREAM="https://github.com/facebookresearch/detectron2/archive/${COMMIT}.zip"

# detectron2's runtime dependencies (its model zoo imports pkg_resources: setuptools < 81; LSJ crops of
# polygon masks need shapely) and what its source build needs without build isolation (wheel: a
# setuptools older than 70.1 has no bdist_wheel of its own)
"$PY" -m pip install -q "setuptools<81" wheel fvcore iopath "pycocotools>=2.0.2" termcolor "yacs>=0.1.8" \
    tabulate cloudpickle "omegaconf>=2.1,<2.4" "hydra-core>=1.1" black packaging shapely

if "$PY" -c "import detectron2" 2>/dev/null; then
  where=$("$PY" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')
  if "$PY" -c "from detectron2.utils.comm import create_local_process_group" 2>/dev/null; then
    echo "detectron2 already installed: $where"
    exit 0
  fi
  echo "the detectron2 in $where predates 650c60ed (no comm.create_local_process_group, which multi-GPU" \
       "runs call): replacing it" >&2
  "$PY" -m pip uninstall -y -q detectron2
fi

if "$PY" -c "import urllib.request; urllib.request.urlopen('${UPSTREAM}', timeout=10)" 2>/dev/null; then
  echo "building detectron2 ${COMMIT} from source (a few minutes)"
  if "$PY" -m pip install --no-build-isolation "detectron2 @ ${UPSTREAM}"; then
    exit 0
  fi
  echo "the source build failed: falling back to the pure-Python package" >&2
fi

echo "upstream detectron2 not reachable: installing the pure-Python part of sal-detectron2 0.7.2"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.10 sal-detectron2==0.7.2 -d "$tmp"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
target="$site/detectron2_purepy"
rm -rf "$target"
mkdir -p "$target"
"$PY" -m zipfile -e "$tmp"/sal_detectron2-0.7.2-*.whl "$tmp/wheel"
cp -r "$tmp/wheel/detectron2" "$target/"
rm -f "$target"/detectron2/_C*.so  # built for CUDA 12 / Python 3.10: never loads here
echo "$target" > "$site/detectron2_purepy.pth"  # the stray top-level `tools` package is not copied
"$PY" -c "import detectron2, detectron2.modeling.backbone.vit; print('detectron2', detectron2.__version__, 'importable (pure Python)')"
