#!/usr/bin/env bash
# Regenerates the pictures of docs/method.md:
#   docs/retrieval_digits.png  test queries of the digits demo and their top-8 retrievals
#   <work folder>/method.png    a PNG rendering of docs/method.svg, to check it (when rsvg-convert exists)
#
# Usage, from anywhere:  docs/make_pictures.sh  [work folder, default /tmp/docs_runs]
# Trains the digits demo (CDNE(MB), 5 epochs, 32 bits, random init; a few minutes on a CPU),
# indexes its train split and queries it with the first test image of six classes.
# On the same machine the result is reproducible byte for byte (seed 0, CPU).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${1:-/tmp/docs_runs}"
DATA="$WORK/data"
PY="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
cd "$REPO"

# 1. Train the demo (skipped when its best checkpoint is already there).
if [ ! -f "$WORK/demo/checkpoint_best.pth" ]; then
    rm -rf "$WORK/demo"
    "$PY" train_MB/main.py --dataset digits --no-pretrained --img-size 32 -b 64 --lr 0.01 --dim 32 \
        --epochs 5 --num_workers 1 --out "$WORK" --name demo --data "$DATA"
fi

# 2. Index the database (the train split).
"$PY" -m utils.retrieve index --checkpoint "$WORK/demo/checkpoint_best.pth" --dataset digits \
    --data "$DATA" --out "$WORK/digits.index" --overwrite

# 3. Queries: the first test-split image of classes 0, 2, 3, 5, 7 and 8 (docs/method.md section 1).
mapfile -t QUERIES < <("$PY" - "$DATA" <<'EOF'
import sys
from utils.data import SceneDataset
test = SceneDataset(sys.argv[1], "digits", "test", "png")
for wanted in ("0", "2", "3", "5", "7", "8"):
    label = test.classes.index(wanted)
    print(next(path for path, y in test.samples if y == label))
EOF
)

"$PY" -m utils.retrieve query --index "$WORK/digits.index" "${QUERIES[@]}" --topk 8 \
    --grid "$WORK/retrieval_digits_small.png"

# 4. The grid's thumbnails are 64 px; double the picture (nearest neighbour keeps the digits
#    and the distance labels sharp) so that it is legible on GitHub.
"$PY" - "$WORK/retrieval_digits_small.png" docs/retrieval_digits.png <<'EOF'
import sys
from PIL import Image
img = Image.open(sys.argv[1])
img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(sys.argv[2], optimize=True)
print(f"wrote {sys.argv[2]} ({img.width * 2} x {img.height * 2})")
EOF

# 5. Optional: render the diagram to check it (needs rsvg-convert from librsvg2-bin).
if command -v rsvg-convert >/dev/null; then
    rsvg-convert -w 1800 docs/method.svg -o "$WORK/method.png" && echo "rendered docs/method.svg to $WORK/method.png"
fi
