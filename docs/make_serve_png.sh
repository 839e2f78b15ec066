#!/usr/bin/env bash
# Regenerates docs/serve.png, README's screenshot of `python -m utils.retrieve serve`.
#
# Usage, from anywhere:  docs/make_serve_png.sh  [work folder, default /tmp/docs_runs]
# Uses the digits demo run and index of docs/make_pictures.sh (CDNE(MB), 5 epochs, 32 bits; made
# here, in the same way, when the work folder lacks them), then runs the browser test of
# tests/test_serve.py against that index: the screenshot is taken by the test's own code
# (screenshot() there), after every step of the page it checks has passed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/docs_runs}"
DATA="$WORK/data"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cd "$REPO"

if [ ! -f "$WORK/demo/checkpoint_best.pth" ]; then
    rm -rf "$WORK/demo"
    "$PY" train_MB/main.py --dataset digits --no-pretrained --img-size 32 -b 64 --lr 0.01 --dim 32 \
        --epochs 5 --num_workers 1 --out "$WORK" --name demo --data "$DATA"
fi
if [ ! -d "$WORK/digits.index" ]; then
    "$PY" -m utils.retrieve index --checkpoint "$WORK/demo/checkpoint_best.pth" --dataset digits \
        --data "$DATA" --out "$WORK/digits.index"
fi

# CDNE_SERVE_ITEM: the query shown (an item of the index; by default the one the test clicks).
CDNE_SERVE_INDEX="$WORK/digits.index" CDNE_SERVE_SCREENSHOT=docs/serve.png \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_serve.py -k headless_chromium
echo "wrote docs/serve.png"
