#!/usr/bin/env bash
# The batched synthesis before and after issue 29, side by side: ops per batch (all of a
# batch's top-level aten ops, its draws on the host included; `pouta bench synthesis --profile`
# splits them into host and device), ops that read a tensor back on the host, and images/s on
# one core, for two checkouts measured in turns (medians of ROUNDS; this machine is shared and
# noisy, so read the ratios).
#   bench/synthesis_profile.sh OLD_CHECKOUT [ROUNDS]     e.g. a `git worktree add /tmp/old d84efc2`
set -euo pipefail
old=${1:?usage: bench/synthesis_profile.sh OLD_CHECKOUT [ROUNDS]}
rounds=${2:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
py=$here/.venv/bin/python
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for size in 64 224; do
  for batch in 8 32; do
    for clean in 0.0 0.5; do
      for _ in $(seq "$rounds"); do
        for side in old new; do
          root=$here; [ "$side" = old ] && root=$old
          line=$(cd "$root" && PYTHONPATH=$root "$py" "$here/bench/synthesis_profile.py" --image-size "$size" \
                 --batch-size "$batch" --clean-ratio "$clean" 2>/dev/null | tail -1)
          echo "{\"side\": \"$side\", \"m\": $line}" >> "$out"
        done
      done
    done
  done
done
"$py" - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
keys = sorted({(r["m"]["image_size"], r["m"]["batch_size"], r["m"]["clean_ratio"]) for r in rows})
print("ops: top-level aten ops per batch, all of it (new: of which on the device, and the device's reads on the host)")
print(f"{'px':>4} {'batch':>5} {'clean':>5} | {'ops old':>7} {'ops new':>7} {'ratio':>6} {'device':>6} | "
      f"{'syncs old':>9} {'new':>3} {'device':>6} | {'img/s old':>9} {'new':>7} {'new/old':>7}")
for key in keys:
    def med(side, field):
        return statistics.median(r["m"][field] for r in rows if r["side"] == side
                                 and (r["m"]["image_size"], r["m"]["batch_size"], r["m"]["clean_ratio"]) == key)
    o, n = med("old", "ops_per_batch"), med("new", "ops_per_batch")
    ro, rn = med("old", "images_per_s_per_core"), med("new", "images_per_s_per_core")
    print(f"{key[0]:>4} {key[1]:>5} {key[2]:>5} | {o:>7.0f} {n:>7.0f} {n / o:>6.3f} {med('new', 'device_ops'):>6.0f} | "
          f"{med('old', 'syncs_per_batch'):>9.0f} {med('new', 'syncs_per_batch'):>3.0f} "
          f"{med('new', 'device_syncs'):>6.0f} | {ro:>9.1f} {rn:>7.1f} {rn / ro:>7.2f}")
PY
