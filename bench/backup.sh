#!/usr/bin/env bash
# Measures backups against a local cairn: the rate of a full backup to a local
# folder next to the rate at which the same objects are read from cairn (each
# once, one and three requests at a time) and, for scale, next to a plain
# rclone copy of them (when rclone is installed; RCLONE=0 skips it); then the
# time and bytes of an incremental backup after about 1% of the objects were
# overwritten.
#
#   bench/backup.sh [TOTAL_MIB] [OBJECT_MIB]      (default 10240 and 16)
#
# Uses target/release/cairn (CAIRN_BIN to change), a scratch folder under
# BENCH_DIR (default /tmp) for cairn's data and, unless TARGET_DIR names
# another place, the backups; ports 19000-19001. As root, the page cache is
# dropped before each measured read, so that reads come from the disk.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${CAIRN_BIN:-target/release/cairn}
TOTAL=${1:-10240}
SIZE=${2:-16}
N=$((TOTAL / SIZE))
CHANGED=$(((N + 99) / 100))
WORK=$(mktemp -d "${BENCH_DIR:-/tmp}/cairn-bench-backup.XXXXXX")
export CAIRN_ACCESS_KEY=BENCHBACKUPACCESS001 CAIRN_SECRET_KEY=bench-backup-secret-0123456789abcdefgh
S3=http://127.0.0.1:19000
# The backups' folder: TARGET_DIR (another disk, say), else next to the data.
TARGET=${TARGET_DIR:-$WORK}/cairn-bench-target-$$
"$BIN" serve --data-dir "$WORK/data" --s3-address 127.0.0.1:19000 \
  --admin-address 127.0.0.1:19001 >"$WORK/serve.out" 2>"$WORK/serve.log" &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$WORK" "$TARGET" "$TARGET.rclone"' EXIT
for _ in $(seq 100); do grep -q '^ready' "$WORK/serve.out" && break; sleep 0.1; done
grep -q '^ready' "$WORK/serve.out" || { cat "$WORK/serve.log"; exit 1; }

field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
now() { date +%s.%N; }

# Every measured read starts from the disk, not the page cache, when the
# caches can be dropped (root); otherwise both read from memory.
cold() { sync; [ "$(id -u)" = 0 ] && echo 3 >/proc/sys/vm/drop_caches || true; }

echo "== $N objects of $SIZE MiB written"
"$BIN" bench --endpoint $S3 --bucket media --op get --size "${SIZE}MiB" \
  --keys "$N" --ops 1 --concurrency 1 --json >/dev/null
cold
# The read rate: each object once, in order, as the backup reads them (at
# random, about a third of the reads would be of objects read before, from
# the page cache); one at a time, and three at a time as the backup reads. The
# faster of the two is the rate the backup is measured against.
READ=0
for c in 1 3; do
  echo "== read back, $c at a time"
  "$BIN" bench --endpoint $S3 --bucket media --op get --prepared --in-order \
    --size "${SIZE}MiB" --keys "$N" --ops "$N" --concurrency $c --json >"$WORK/read$c.json"
  cold
  r=$(field "['mib_per_sec']" <"$WORK/read$c.json" 2>/dev/null || true)
  [ -n "$r" ] || { cat "$WORK/read$c.json"; exit 1; }
  echo "   $r MiB/s"
  READ=$(python3 -c "print(max($READ, $r))")
done

echo "== full backup"
t0=$(now)
"$BIN" backup create --endpoint $S3 --target "$TARGET" --bucket media \
  --type full --json 2>/dev/null >"$WORK/full.json"
t1=$(now)
FULL_S=$(python3 -c "print($t1 - $t0)")
FULL_BYTES=$(field "['bytes_new']" <"$WORK/full.json")
FULL_STORED=$(field "['bytes_stored']" <"$WORK/full.json")

echo "== $CHANGED of $N objects overwritten, incremental backup"
"$BIN" bench --endpoint $S3 --bucket media --op put --size "${SIZE}MiB" \
  --keys "$N" --ops "$CHANGED" --concurrency 1 --json >/dev/null
t0=$(now)
"$BIN" backup create --endpoint $S3 --target "$TARGET" --bucket media \
  --json 2>/dev/null >"$WORK/incr.json"
t1=$(now)
INCR_S=$(python3 -c "print($t1 - $t0)")
INCR_BYTES=$(field "['bytes_new']" <"$WORK/incr.json")
INCR_STORED=$(field "['bytes_stored']" <"$WORK/incr.json")

# For scale, when rclone is installed (RCLONE=0 to skip): a plain copy of the
# same objects by rclone into a folder next to the backups, until on disk.
COPY_S=0
if [ "${RCLONE:-1}" != 0 ] && command -v rclone >/dev/null 2>&1; then
  echo "== for scale: rclone copy of the bucket next to the target, then sync"
  cold
  t0=$(now)
  env -u AWS_CA_BUNDLE RCLONE_CONFIG_CAIRN_TYPE=s3 RCLONE_CONFIG_CAIRN_PROVIDER=Other \
    RCLONE_CONFIG_CAIRN_ENDPOINT=$S3 RCLONE_CONFIG_CAIRN_REGION=us-east-1 \
    RCLONE_CONFIG_CAIRN_ACCESS_KEY_ID=$CAIRN_ACCESS_KEY \
    RCLONE_CONFIG_CAIRN_SECRET_ACCESS_KEY=$CAIRN_SECRET_KEY \
    rclone copy cairn:media "$TARGET.rclone" --transfers 4 --ignore-checksum \
    --config /dev/null 2>"$WORK/rclone.log" && sync && t1=$(now) &&
    COPY_S=$(python3 -c "print($t1 - $t0)") ||
    { echo "   rclone failed, left out:"; sed 's/^/   /' "$WORK/rclone.log"; }
  rm -rf "$TARGET.rclone"
fi

python3 - "$READ" "$COPY_S" "$FULL_S" "$FULL_BYTES" "$FULL_STORED" "$INCR_S" "$INCR_BYTES" "$INCR_STORED" <<'PY'
import sys
read, copy_s, full_s, full_b, full_st, incr_s, incr_b, incr_st = map(float, sys.argv[1:])
mib = 1 << 20
full_rate = full_b / mib / full_s
print(f"read from cairn:    {read:8.1f} MiB/s (GET, each object once, the faster of 1 and 3 at a time)")
print(f"full backup:        {full_rate:8.1f} MiB/s ({full_b / mib:.0f} MiB in {full_s:.1f} s, "
      f"{full_st / mib:.0f} MiB stored): {100 * full_rate / read:.0f}% of the read rate")
if copy_s > 0:
    copy_rate = full_b / mib / copy_s
    print(f"for scale, rclone:  {copy_rate:8.1f} MiB/s (a plain copy of the bucket to a folder beside the "
          f"target, until synced): {100 * copy_rate / read:.0f}% of the read rate")
print(f"incremental backup: {incr_s:8.1f} s, {incr_b / mib:.0f} MiB read, {incr_st / mib:.0f} MiB stored: "
      f"{100 * incr_s / full_s:.1f}% of the full backup's time, {100 * incr_st / full_st:.1f}% of its bytes")
PY
