# Sourced by scripts/demo.sh and scripts/demo-sharded.sh (from the repository root): the demo's settings, inputs
# and question, in one place so that both demos ask the same thing of the same data.
BUILD_DIR="${BUILD_DIR:-build}"
DATA="${RAPIDIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}"
WORK="${RAPIDIN_DEMO_DIR:-demo}"
LIMIT="${RAPIDIN_DEMO_LIMIT:-0}"
CLI="$BUILD_DIR/client/rapidin"
SERVER="$BUILD_DIR/server/rapidin-server"
[ -x "$CLI" ] || { echo "build first: bash scripts/setup.sh" >&2; exit 1; }
MODEL="$DATA/models/stories260K.bin"
TRAIN="$DATA/instructions/alpaca_5000.json"
for f in "$MODEL" "$DATA/models/tok512.bin" "$TRAIN"; do
  [ -f "$f" ] || { echo "missing $f (set RAPIDIN_SHARED_DATA to the shared data folder)" >&2; exit 1; }
done
INSTRUCTION="Give three tips for staying healthy."
GENERATION="1. Eat a balanced diet and make sure to include plenty of fruits and vegetables. 2. Exercise regularly to keep your body active and strong. 3. Get enough sleep and maintain a consistent sleep schedule."
mkdir -p "$WORK"
