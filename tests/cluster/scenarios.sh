#!/usr/bin/env bash
# Failover scenarios on the netns rig (rig.sh): scenarios.sh [NAME...]
#
#   kill-primary  SIGKILL the primary's daemon, RUNS times (default 10) on one rig, killing
#                 whichever node is primary (so it alternates); restart the killed node each time
#   power-off     cut both of the primary's links, kill all its processes; heal, restart;
#                 RUNS times (alternating nodes)
#   cut-client    cut only the primary's client network; heal; RUNS times
#   cut-link      cut only the dedicated link; heal
#   sigstop       SIGSTOP the primary's daemon for STOP_S (5) seconds, then SIGCONT
#   kill-cycles   CYCLES (20) kills in a row, the killed node restarted (and resynced under
#                 load) each time
#   cpu-load      (not in the default set) both CPUs saturated for DURATION (600) seconds
#                 under a light bench: no takeover may happen
#
# Default: all but cpu-load. Each scenario runs on a fresh rig. Every run drives
# `twinsan bench --reconnect --verify --verify-state ACK` from ts-c against the VIP during
# the fault, then a `--verify-only` pass over the same ack log (every acknowledged write
# must read back), samples `has_vip a` / `has_vip b` every 50 ms throughout (never both;
# sigstop reports an overlap: a stopped node cannot drop its address before its lifetime),
# and checks the scenario's invariants. One result line per run, a summary table of the
# stalls (the bench's stall_max_ms) at the end; exit status 1 if any check failed.
#
# Environment: TWINSAN_BIN (default: target/release/twinsan of this tree), OUT_DIR (where
# the per-scenario RIG_DIRs go; default a fresh /tmp/twinsan-scenarios.XXXXXX), RUNS,
# CYCLES, DURATION, STOP_S, BENCH_RW (randrw), BENCH_RWMIX_READ (30), BENCH_IODEPTH (4),
# BENCH_SIZE (64m), IO_TIMEOUT_MS (2000), RECONNECT_TIMEOUT_S (30), KEEP=1 (keep the logs of passing scenarios too),
# FAIL_TAIL (log lines shown per failed run, 12). Needs root; only 198.18.0.0/15 inside the
# rig's namespaces is ever addressed.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${TWINSAN_BIN:=$HERE/../../target/release/twinsan}"
export TWINSAN_BIN
[ -x "$TWINSAN_BIN" ] || { echo "TWINSAN_BIN=$TWINSAN_BIN is not executable" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 2; }
command -v jq >/dev/null || { echo "needs jq" >&2; exit 2; }

: "${OUT_DIR:=$(mktemp -d /tmp/twinsan-scenarios.XXXXXX)}"
mkdir -p "$OUT_DIR"
RIG_DIR=$OUT_DIR/setup
# shellcheck source=rig.sh
source "$HERE/rig.sh"
# rig.sh sets -e for its users; the checks here decide for themselves.
set +e -u -o pipefail

: "${RUNS:=10}" "${CYCLES:=20}" "${DURATION:=600}" "${STOP_S:=5}"
: "${BENCH_RW:=randrw}" "${BENCH_RWMIX_READ:=30}" "${BENCH_IODEPTH:=4}" "${BENCH_SIZE:=64m}"
: "${IO_TIMEOUT_MS:=2000}" "${RECONNECT_TIMEOUT_S:=30}" "${KEEP:=0}" "${FAIL_TAIL:=12}"
BENCH_URL="iscsi://$RIG_VIP/$RIG_TARGET/0"
ALL_SCENARIOS="kill-primary power-off cut-client cut-link sigstop kill-cycles"
KNOWN_SCENARIOS="$ALL_SCENARIOS cpu-load"

# ---------------------------------------------------------------------------------------
# Small helpers

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
other_of() { if [ "$1" = a ]; then echo b; else echo a; fi; }
log() { echo "    $*"; }

# median and max of a list of integers: "median max" ("- -" for none)
stats() {
  printf '%s\n' "$@" | grep -E '^[0-9]+$' | sort -n | awk '
    { v[NR] = $1 }
    END { if (NR == 0) { print "- -"; exit }
          m = (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2)
          print m, v[NR] }'
}

# One status snapshot per call; these parse it.
role_in() { sed -n 's/^role: //p' <<<"$1"; }
replica_states_in() { sed -n 's/^replica lun [^:]*: \([A-Za-z]*\).*/\1/p' <<<"$1" | sort -u | tr '\n' ' '; }
# Absolute time (ms) of the last takeover a status snapshot reports, or "none".
takeover_at_in() {
  local ago
  ago=$(sed -n 's/^  last takeover: \([0-9]*\) ms ago.*/\1/p' <<<"$1")
  if [ -n "$ago" ]; then echo $(( $(now_ms) - ago )); else echo none; fi
}
gaveup_at_in() {
  local ago
  ago=$(sed -n 's/^  last gave up: \([0-9]*\) ms ago.*/\1/p' <<<"$1")
  if [ -n "$ago" ]; then echo $(( $(now_ms) - ago )); else echo none; fi
}
has_split_brain_in() { grep -qi 'splitbrain\|split brain\|split-brain' <<<"$1"; }

# The VIP on N, unless N is powered off (then its address is nobody's concern).
vip_live() { [ ! -e "$RIG_DIR/off.$1" ] && has_vip "$1"; }
# N serves: primary with the VIP, the peer without it.
serving() { primary_is "$1" && ! vip_live "$(other_of "$1")"; }
# The pair is healthy with N serving: N primary + VIP, the other secondary, both in sync.
healthy_with() {
  local o; o=$(other_of "$1")
  serving "$1" && [ "$(role_of "$o")" = secondary ] && in_sync "$1" && in_sync "$o"
}
current_primary() {
  local n
  for n in a b; do if serving "$n"; then echo "$n"; return 0; fi; done
  return 1
}
is_role() { [ "$(role_of "$1")" = "$2" ]; }

# Daemons and the witness leave the job table (no "Killed" notices when they die).
start_node_q() { start_node "$1"; disown "$(node_pid "$1")" 2>/dev/null; }
start_witness_q() { start_witness; disown "$(cat "$RIG_DIR/witness.pid")" 2>/dev/null; }
pid_gone() { ! kill -0 "$1" 2>/dev/null || grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null; }
# kill_daemon N SIGNAL: signal the daemon; for KILL, wait until it is gone.
kill_daemon() {
  local pid; pid=$(node_pid "$1")
  kill -"$2" "$pid" 2>/dev/null
  if [ "$2" = KILL ] || [ "$2" = 9 ]; then wait_until 10 pid_gone "$pid"; fi
}
# power_off N: every process of the node's namespace (daemon, VIP guard) killed at once.
ns_empty() { [ -z "$(ip netns pids "ts-$1" 2>/dev/null)" ]; }
power_off() {
  local p
  for p in $(ip netns pids "ts-$1" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  wait_until 10 ns_empty "$1"
}

# ---------------------------------------------------------------------------------------
# Per-run bookkeeping: checks append to RUN_FAILS; run_end prints the result line.

declare -A STALLS TAKEOVERS RESULTS_PASS RESULTS_FAIL
RUN_FAILS=()
RUN_NOTES=()
ANY_FAIL=0
SCEN_FAILED=0

fail() { RUN_FAILS+=("$*"); echo "    FAIL: $*"; }
note() { RUN_NOTES+=("$*"); }

run_begin() { RUN_FAILS=(); RUN_NOTES=(); RUN_LABEL=$1; }
# run_end SCENARIO STALL TAKEOVER [RECORD]: RECORD=0 shows the figures without adding
# them to the summary (kill-cycles adds each cycle's itself).
run_end() {
  local scen=$1 stall=$2 takeover=$3 record=${4:-1} st notes=""
  if [ "$record" = 1 ]; then
    [ "$stall" != - ] && STALLS[$scen]="${STALLS[$scen]:-} $stall"
    [ "$takeover" != - ] && TAKEOVERS[$scen]="${TAKEOVERS[$scen]:-} $takeover"
  fi
  [ ${#RUN_NOTES[@]} -gt 0 ] && notes=$(printf '%s; ' "${RUN_NOTES[@]}")
  if [ ${#RUN_FAILS[@]} -eq 0 ]; then
    st=PASS; RESULTS_PASS[$scen]=$(( ${RESULTS_PASS[$scen]:-0} + 1 ))
  else
    st=FAIL; RESULTS_FAIL[$scen]=$(( ${RESULTS_FAIL[$scen]:-0} + 1 )); ANY_FAIL=1; SCEN_FAILED=1
  fi
  echo "RESULT $st $RUN_LABEL stall=${stall}ms takeover=${takeover}ms ${notes%; }"
  if [ "$st" = FAIL ]; then
    echo "  failed checks: $(printf '[%s] ' "${RUN_FAILS[@]}")"
    echo "  logs: $RIG_DIR"
    show_tails
  fi
}

show_tails() {
  local f
  [ "$FAIL_TAIL" -gt 0 ] || return 0
  for f in "$RIG_DIR/a/daemon.log" "$RIG_DIR/b/daemon.log" "$RIG_DIR/witness.log"; do
    [ -s "$f" ] || continue
    echo "  --- tail -$FAIL_TAIL $f"
    tail -n "$FAIL_TAIL" "$f" | sed 's/^/  | /'
  done
}

# ---------------------------------------------------------------------------------------
# The rig around a scenario

scenario_begin() {
  SCEN_NAME=$1
  RIG_DIR=$OUT_DIR/$1
  rm -rf "$RIG_DIR"
  mkdir -p "$RIG_DIR"
  ACK=$RIG_DIR/ack.log
  BENCH_N=0
  SCEN_FAILED=0
  if ! ( set -e; rig_up ) >"$RIG_DIR/rig_up.log" 2>&1; then
    echo "    rig_up failed: $(tail -3 "$RIG_DIR/rig_up.log")"; return 1
  fi
  start_witness_q
  start_node_q a
  start_node_q b
  if ! wait_until 30 healthy_with a; then
    echo "    the fresh pair did not come up (a primary with the VIP, both in sync) within 30 s"
    status_of a | sed 's/^/    a| /'; status_of b | sed 's/^/    b| /'
    return 1
  fi
  sampler_start
}

scenario_end() {
  sampler_stop
  roles_stop
  snap end
  compare_images
  rig_down 2>/dev/null
  if [ "$SCEN_FAILED" = 0 ] && [ "$KEEP" != 1 ]; then rm -rf "$RIG_DIR"
  else echo "  kept: $RIG_DIR"; fi
}

# With the pair in sync and idle, both LUN images must be byte for byte the same: both
# daemons are killed (no I/O is running) and the files compared.
compare_images() {
  local fa=$RIG_DIR/a/data/lun0.img fb=$RIG_DIR/b/data/lun0.img out
  [ -f "$fa" ] && [ -f "$fb" ] || return 0
  if ! both_in_sync; then echo "    (images not compared: the pair is not in sync at the end)"; return 0; fi
  kill_daemon a KILL; kill_daemon b KILL
  if out=$(cmp "$fa" "$fb" 2>&1); then
    echo "    images: a and b identical"
  else
    echo "    FAIL: images: a's and b's LUN images differ although both said UpToDate: $out ($(cmp -l "$fa" "$fb" 2>/dev/null | wc -l) bytes differ)"
    ANY_FAIL=1; SCEN_FAILED=1; IMAGE_FAILS="${IMAGE_FAILS:-} $SCEN_NAME"
  fi
}

# The VIP sampler: "ms A B" every 50 ms (1 held, 0 not, - the node is powered off).
SAMPLER_PID=
sampler_start() {
  rm -f "$RIG_DIR/sampler.stop"
  (
    while [ ! -e "$RIG_DIR/sampler.stop" ]; do
      va=0; vb=0
      if [ -e "$RIG_DIR/off.a" ]; then va=-; elif has_vip a; then va=1; fi
      if [ -e "$RIG_DIR/off.b" ]; then vb=-; elif has_vip b; then vb=1; fi
      echo "$(now_ms) $va $vb"
      sleep 0.05
    done >>"$RIG_DIR/vip.samples"
  ) &
  SAMPLER_PID=$!
}
sampler_stop() {
  [ -n "$SAMPLER_PID" ] || return 0
  touch "$RIG_DIR/sampler.stop"
  wait "$SAMPLER_PID" 2>/dev/null
  SAMPLER_PID=
}
# sampler_check FROM_MS [note]: no sample since FROM_MS had the VIP on both nodes (with
# "note", an overlap is reported, not failed: a SIGSTOPped node cannot remove its address,
# which stays until its lifetime ends; what must hold there is "never two writers").
sampler_check() {
  local from=$1 mode=${2:-fail} total both first
  total=$(awk -v f="$from" '$1 >= f' "$RIG_DIR/vip.samples" | wc -l)
  both=$(awk -v f="$from" '$1 >= f && $2 == 1 && $3 == 1' "$RIG_DIR/vip.samples" | wc -l)
  if [ "$total" -lt 10 ]; then fail "vip-sampler: only $total samples taken"; fi
  if [ "$both" -gt 0 ]; then
    first=$(awk -v f="$from" '$1 >= f && $2 == 1 && $3 == 1 { print $1; exit }' "$RIG_DIR/vip.samples")
    if [ "$mode" = note ]; then
      note "vip-overlap: the VIP was on both nodes in $both of $total samples ($(( first - from )) ms into the run; the stopped node's address lifetime)"
    else
      fail "vip-on-both: the VIP was on both nodes in $both of $total samples (first at $first, $(( first - from )) ms into the run)"
    fi
  fi
}

# The role sampler (cut-link, sigstop, cut-client, cpu-load): "ms ROLE_A ROLE_B".
ROLES_PID=
roles_start() {
  local every=${1:-0.2}
  rm -f "$RIG_DIR/roles.stop"
  (
    while [ ! -e "$RIG_DIR/roles.stop" ]; do
      ra=$(RIG_STATUS_TIMEOUT=2 role_of a); rb=$(RIG_STATUS_TIMEOUT=2 role_of b)
      echo "$(now_ms) ${ra:-?} ${rb:-?}"
      sleep "$every"
    done >>"$RIG_DIR/roles.samples"
  ) &
  ROLES_PID=$!
}
roles_stop() {
  [ -n "$ROLES_PID" ] || return 0
  touch "$RIG_DIR/roles.stop"
  wait "$ROLES_PID" 2>/dev/null
  ROLES_PID=
}
# roles_both FROM_MS: how many role samples since FROM_MS said primary on both nodes.
roles_both() { awk -v f="$1" '$1 >= f && $2 == "primary" && $3 == "primary"' "$RIG_DIR/roles.samples" 2>/dev/null | wc -l; }
roles_both_span() {
  awk -v f="$1" '$1 >= f && $2 == "primary" && $3 == "primary" { if (!s) s = $1; e = $1 }
                 END { if (s) print s, e; }' "$RIG_DIR/roles.samples" 2>/dev/null
}

# ---------------------------------------------------------------------------------------
# The bench

BENCH_PID=
# bench_start RUNTIME [extra bench options]: the load, against the VIP, in the background.
bench_start() {
  local runtime=$1; shift
  BENCH_N=$((BENCH_N + 1))
  BENCH_OUT=$RIG_DIR/bench-$BENCH_N
  ip netns exec ts-c "$TWINSAN_BIN" bench "$BENCH_URL" --rw "$BENCH_RW" --rwmix-read "$BENCH_RWMIX_READ" \
    --iodepth "$BENCH_IODEPTH" --size "$BENCH_SIZE" --runtime "$runtime" \
    --verify --verify-state "$ACK" --reconnect --io-timeout-ms "$IO_TIMEOUT_MS" --reconnect-timeout-s "$RECONNECT_TIMEOUT_S" \
    --json --quiet "$@" >"$BENCH_OUT.json" 2>"$BENCH_OUT.err" &
  BENCH_PID=$!
  BENCH_T0=$(now_ms)
}

# bench_wait: waits for it and checks it; sets B_STALL B_RECONNECTS B_OUTAGES B_IOS.
bench_wait() {
  local rc j
  wait "$BENCH_PID"; rc=$?
  BENCH_PID=
  B_STALL=-; B_RECONNECTS=-; B_OUTAGES=-; B_IOS=0
  j=$BENCH_OUT.json
  if [ -z "$(jq -r '.ios // empty' "$j" 2>/dev/null)" ]; then
    fail "bench: no JSON report (exit $rc): $(tail -3 "$BENCH_OUT.err" | tr '\n' ' ')"
    return 1
  fi
  B_STALL=$(jq -r '.stall_max_ms' "$j")
  B_RECONNECTS=$(jq -r '.reconnects' "$j")
  B_IOS=$(jq -r '.ios' "$j")
  B_OUTAGES=$(jq -r '[.outages[] | "\(.start_ms|floor)+\(.first_io_after_ms // "never"|if type=="number" then floor else . end)ms/\(.connection_failures)f"] | join(",")' "$j")
  [ -n "$B_OUTAGES" ] || B_OUTAGES=none
  [ "$rc" = 0 ] || fail "bench: exit status $rc: $(tail -3 "$BENCH_OUT.err" | tr '\n' ' ')"
  [ "$(jq -r '.verify_mismatches' "$j")" = 0 ] ||
    fail "bench-verify: $(jq -r '.verify_mismatches' "$j") mismatches during the run ($j)"
  [ "$(jq -r '.errors' "$j")" = 0 ] || fail "bench: $(jq -r '.errors' "$j") I/O errors ($j)"
  [ "$(jq -r '.failures | length' "$j")" = 0 ] || fail "bench: failures $(jq -c '.failures' "$j" | cut -c1-300)"
  [ "$B_IOS" -gt 0 ] 2>/dev/null || fail "bench: no I/O completed"
  jq -e '.outages | all(.first_io_after_ms != null)' "$j" >/dev/null ||
    fail "bench: an outage never ended (no I/O completed after it): $B_OUTAGES"
  return 0
}

# verify_only: re-reads every block of the ack log through the VIP; 0 mismatches.
verify_only() {
  local rc j=$RIG_DIR/verify-$BENCH_N.json n
  V_BLOCKS=0
  if [ ! -s "$ACK" ]; then fail "verify-only: no ack log $ACK (the bench did not save it)"; return 1; fi
  ip netns exec ts-c "$TWINSAN_BIN" bench "$BENCH_URL" --verify-only --verify-state "$ACK" \
    --size "$BENCH_SIZE" --json --quiet >"$j" 2>"${j%.json}.err"; rc=$?
  if [ -z "$(jq -r '.verified_ios // empty' "$j" 2>/dev/null)" ]; then
    fail "verify-only: no report (exit $rc): $(tail -3 "${j%.json}.err" | tr '\n' ' ')"; return 1
  fi
  n=$(jq -r '.verified_ios' "$j")
  V_MISMATCHES=$(jq -r '.verify_mismatches' "$j")
  [ "$rc" = 0 ] || fail "verify-only: exit status $rc: $(tail -3 "${j%.json}.err" | tr '\n' ' ')"
  [ "$V_MISMATCHES" = 0 ] || fail "verify-only: $V_MISMATCHES of $n acknowledged blocks did not read back ($j)"
  [ "$(jq -r '.errors' "$j")" = 0 ] || fail "verify-only: $(jq -r '.errors' "$j") I/O errors ($j)"
  [ "$n" -gt 0 ] 2>/dev/null || fail "verify-only: nothing verified ($j)"
  V_BLOCKS=$n
}

# ---------------------------------------------------------------------------------------
# Shared checks

# after_fault_takeover SURVIVOR T_FAULT: waits (20 s) for SURVIVOR to be primary with the
# VIP (sets TAKEOVER_MS), then (10 s) for the old primary to hold the VIP no more.
after_fault_takeover() {
  local s=$1 o; o=$(other_of "$1")
  TAKEOVER_MS=-
  if wait_until 20 primary_is "$s"; then
    TAKEOVER_MS=$(( $(now_ms) - $2 ))
    if vip_live "$o"; then
      if wait_until 10 no_vip "$o"; then
        note "the old primary $o dropped the VIP only $(( $(now_ms) - $2 ))ms after the fault ($s had it at ${TAKEOVER_MS}ms)"
      else
        fail "vip: the old primary $o still holds the VIP 10 s after $s took over"
      fi
    fi
    snap takeover
  else
    snap no-takeover
    fail "takeover: $s did not become primary with the VIP within 20 s of the fault (role a=$(role_of a) b=$(role_of b), vip a=$(has_vip a && echo y || echo n) b=$(has_vip b && echo y || echo n))"
  fi
}
no_vip() { ! vip_live "$1"; }
# snap LABEL: both nodes' status, for the record.
snap() {
  local n
  for n in a b; do
    { echo "# $(date +%T.%3N) $1"; RIG_STATUS_TIMEOUT=1 status_of "$n"; } >>"$RIG_DIR/status-$n.txt"
  done
}

# rejoin KILLED SURVIVOR: KILLED (just restarted) must come back secondary and resync,
# and the VIP must stay with SURVIVOR (no failback, observed for 3 s more).
rejoin() {
  local x=$1 s=$2 t0 st_x st_s
  t0=$(now_ms)
  if ! wait_until 30 is_role "$x" secondary; then
    fail "rejoin: restarted $x not secondary within 30 s (role '$(role_of "$x")')"
  fi
  if wait_until 30 both_in_sync; then
    RESYNC_MS=$(( $(now_ms) - t0 ))
    note "resync=${RESYNC_MS}ms"
  else
    st_x=$(status_of "$x"); st_s=$(status_of "$s")
    fail "resync: not UpToDate on both within 30 s of the restart ($x: $(role_in "$st_x") $(replica_states_in "$st_x")/ $s: $(role_in "$st_s") $(replica_states_in "$st_s"))"
  fi
  sleep 3
  if ! serving "$s"; then
    fail "no-failback: $s no longer serves after $x rejoined (role $s=$(role_of "$s") $x=$(role_of "$x"), vip $x=$(has_vip "$x" && echo y || echo n))"
  fi
  is_role "$x" secondary || fail "no-failback: $x is '$(role_of "$x")' after rejoining, not secondary"
  has_vip "$x" && fail "no-failback: $x holds the VIP after rejoining"
  no_split_brain
}
both_in_sync() { in_sync a && in_sync b; }

no_split_brain() {
  local n s
  for n in a b; do
    s=$(status_of "$n")
    if has_split_brain_in "$s"; then fail "split-brain: $n's status reports it: $(grep -i 'split' <<<"$s" | head -2 | tr '\n' ' ')"; fi
  done
}

# ---------------------------------------------------------------------------------------
# Scenarios

scen_kill_primary() {
  local i p o t_fault t_run
  for i in $(seq 1 "$RUNS"); do
    p=$(current_primary) || { echo "    no node serves before run $i: stopping the scenario"; ANY_FAIL=1; SCEN_FAILED=1; return; }
    o=$(other_of "$p")
    run_begin "kill-primary#$i (kill $p)"
    t_run=$(now_ms)
    bench_start 8
    sleep 3
    t_fault=$(now_ms)
    kill_daemon "$p" KILL || fail "kill: $p's daemon did not die within 10 s"
    after_fault_takeover "$o" "$t_fault"
    bench_wait
    verify_only
    start_node_q "$p"
    rejoin "$p" "$o"
    sampler_check "$t_run"
    note "reconnects=$B_RECONNECTS outages=$B_OUTAGES ios=$B_IOS verified=${V_BLOCKS:-0}"
    run_end kill-primary "$B_STALL" "$TAKEOVER_MS"
    healthy_with "$o" || { echo "    the pair is not healthy with $o serving after run $i: stopping the scenario"; return; }
  done
}

# repeat_runs FN: FN RUN_INDEX, RUNS times, each against whichever node serves then (so the
# fault alternates); stops when no node serves or the pair does not heal.
repeat_runs() {
  local fn=$1 i p
  for i in $(seq 1 "$RUNS"); do
    p=$(current_primary) || { echo "    no node serves before run $i: stopping the scenario"; ANY_FAIL=1; SCEN_FAILED=1; return; }
    "$fn" "$i"
    healthy_with "$(other_of "$p")" || wait_until 30 healthy_with "$(other_of "$p")" ||
      { echo "    the pair is not healthy with $(other_of "$p") serving after run $i: stopping the scenario"; return; }
  done
}

scen_power_off() { repeat_runs one_power_off; }

one_power_off() {
  local i=$1 p o t_fault t_run
  p=$(current_primary); o=$(other_of "$p")
  run_begin "power-off#$i (node $p)"
  t_run=$(now_ms)
  bench_start 10
  sleep 3
  t_fault=$(now_ms)
  cut_link; cut_client "$p"
  touch "$RIG_DIR/off.$p"
  power_off "$p" || fail "power-off: processes of ts-$p still alive after 10 s"
  after_fault_takeover "$o" "$t_fault"
  bench_wait
  verify_only
  # A powered-off machine comes back without its runtime addresses: the VIP it held
  # (nothing was left to remove it) goes with the "reboot", as it would.
  if has_vip "$p"; then
    note "VIP left configured on the dead $p (guard killed too), removed as a reboot would"
    ip -n "ts-$p" addr del "$RIG_VIP/24" dev "$p-cli" 2>/dev/null
  fi
  heal_link; heal_client "$p"
  rm -f "$RIG_DIR/off.$p"
  start_node_q "$p"
  rejoin "$p" "$o"
  sampler_check "$t_run"
  note "reconnects=$B_RECONNECTS outages=$B_OUTAGES verified=${V_BLOCKS:-0}"
  run_end power-off "$B_STALL" "$TAKEOVER_MS"
}

scen_cut_client() { repeat_runs one_cut_client; }

one_cut_client() {
  local i=$1 p o t_fault t_run st
  p=$(current_primary); o=$(other_of "$p")
  roles_start 0.2
  run_begin "cut-client#$i (node $p)"
  t_run=$(now_ms)
  bench_start 12
  sleep 3
  t_fault=$(now_ms)
  cut_client "$p"
  after_fault_takeover "$o" "$t_fault"
  # The cut-off node must let go of the VIP and of the primary role.
  if wait_until 15 not_holding "$p"; then
    note "$p dropped VIP+primary $(( $(now_ms) - t_fault ))ms after the cut"
  else
    fail "cut-client: $p still primary or holding the VIP 15 s after its client network was cut (role $(role_of "$p"), vip $(has_vip "$p" && echo y || echo n))"
  fi
  snap during-cut
  bench_wait
  st=$(status_of "$p")
  note "$p while cut: role=$(role_in "$st") $(replica_states_in "$st")"
  heal_client "$p"
  if wait_until 30 both_in_sync; then note "in sync $(( $(now_ms) - t_fault ))ms after the cut"
  else fail "resync: not UpToDate on both within 30 s of the heal ($(replica_states_in "$(status_of a)")/ $(replica_states_in "$(status_of b)"))"; fi
  sleep 3
  serving "$o" || fail "after heal: $o does not serve (roles a=$(role_of a) b=$(role_of b))"
  is_role "$p" secondary || fail "after heal: $p is '$(role_of "$p")', not secondary"
  no_split_brain
  verify_only
  roles_stop
  local both; both=$(roles_both "$t_run")
  [ "$both" = 0 ] || fail "two-primaries: both nodes reported role primary in $both role samples ($(roles_both_span "$t_run"))"
  sampler_check "$t_run"
  note "reconnects=$B_RECONNECTS outages=$B_OUTAGES verified=${V_BLOCKS:-0}"
  run_end cut-client "$B_STALL" "$TAKEOVER_MS"
}
not_holding() { ! is_role "$1" primary && ! has_vip "$1"; }

scen_cut_link() {
  local p o t_fault t_run both serving_after
  p=$(current_primary); o=$(other_of "$p")
  roles_start 0.2
  run_begin "cut-link (primary $p)"
  t_run=$(now_ms)
  bench_start 14
  sleep 3
  t_fault=$(now_ms)
  cut_link
  sleep 6
  # Exactly one node serves while the link is cut.
  serving_after=$(current_primary) || fail "cut-link: no node serves (primary + VIP) 6 s into the cut (roles a=$(role_of a) b=$(role_of b), vip a=$(has_vip a && echo y || echo n) b=$(has_vip b && echo y || echo n))"
  snap during-cut
  local st_a st_b; st_a=$(status_of a); st_b=$(status_of b)
  note "during the cut: a=$(role_in "$st_a") $(replica_states_in "$st_a")b=$(role_in "$st_b") $(replica_states_in "$st_b")"
  heal_link
  local t_heal; t_heal=$(now_ms)
  bench_wait
  if wait_until 30 both_in_sync; then note "in sync $(( $(now_ms) - t_heal ))ms after the heal"
  else fail "resync: not UpToDate on both within 30 s of the heal ($(replica_states_in "$(status_of a)")/ $(replica_states_in "$(status_of b)"))"; fi
  no_split_brain
  [ -n "${serving_after:-}" ] && { serving "$serving_after" || fail "after heal: $serving_after no longer serves"; }
  [ -n "${serving_after:-}" ] && note "served by $serving_after during the cut"
  verify_only
  roles_stop
  both=$(roles_both "$t_run")
  [ "$both" = 0 ] || fail "two-primaries: both nodes reported role primary in $both role samples ($(roles_both_span "$t_run"))"
  [ "$B_STALL" != - ] && [ "$B_STALL" -gt "${CUT_LINK_MAX_STALL_MS:-3000}" ] &&
    fail "stall: ${B_STALL} ms > ${CUT_LINK_MAX_STALL_MS:-3000} ms while only the dedicated link was cut"
  sampler_check "$t_run"
  note "reconnects=$B_RECONNECTS outages=$B_OUTAGES verified=${V_BLOCKS:-0}"
  run_end cut-link "$B_STALL" -
}

scen_sigstop() {
  local p o t_fault t_run t_cont both span
  p=$(current_primary); o=$(other_of "$p")
  roles_start 0.2
  run_begin "sigstop (node $p, ${STOP_S}s)"
  t_run=$(now_ms)
  bench_start 16
  sleep 3
  t_fault=$(now_ms)
  kill_daemon "$p" STOP
  after_fault_takeover "$o" "$t_fault"
  while [ $(( $(now_ms) - t_fault )) -lt $(( STOP_S * 1000 )) ]; do sleep 0.05; done
  kill_daemon "$p" CONT
  t_cont=$(now_ms)
  if wait_until 15 is_role "$p" secondary; then
    note "$p secondary $(( $(now_ms) - t_cont ))ms after SIGCONT"
  else
    fail "give-up: $p is '$(role_of "$p")' 15 s after SIGCONT, not secondary"
  fi
  snap after-cont
  has_vip "$p" && fail "vip: $p holds the VIP after SIGCONT"
  bench_wait
  if wait_until 30 both_in_sync; then note "in sync $(( $(now_ms) - t_cont ))ms after SIGCONT"
  else fail "resync: not UpToDate on both within 30 s of SIGCONT ($(replica_states_in "$(status_of a)")/ $(replica_states_in "$(status_of b)"))"; fi
  serving "$o" || fail "after SIGCONT: $o does not serve (roles a=$(role_of a) b=$(role_of b))"
  no_split_brain
  verify_only
  roles_stop
  both=$(roles_both "$t_run")
  if [ "$both" != 0 ]; then
    span=$(roles_both_span "$t_run")
    note "status said primary on both in $both samples ($(( ${span% *} - t_cont ))..$(( ${span#* } - t_cont )) ms after SIGCONT; a stalled node's own view, writes judged by verify)"
  fi
  sampler_check "$t_run" note
  note "reconnects=$B_RECONNECTS outages=$B_OUTAGES verified=${V_BLOCKS:-0}"
  run_end sigstop "$B_STALL" "$TAKEOVER_MS"
}

scen_kill_cycles() {
  local c p o t_fault t_run t_restart line stalls=() takes=() worst=0
  run_begin "kill-cycles ($CYCLES cycles)"
  t_run=$(now_ms)
  for c in $(seq 1 "$CYCLES"); do
    p=$(current_primary) || { fail "cycle $c: no node serves before the kill"; break; }
    o=$(other_of "$p")
    bench_start 6
    sleep 1.5
    t_fault=$(now_ms)
    kill_daemon "$p" KILL || fail "cycle $c: $p's daemon did not die"
    after_fault_takeover "$o" "$t_fault"
    # Restart at once: the resync runs under the bench's load.
    start_node_q "$p"
    t_restart=$(now_ms)
    line="cycle $c: killed $p, $o serving after ${TAKEOVER_MS}ms"
    if wait_until 30 is_role "$p" secondary && wait_until 30 both_in_sync; then
      line="$line, $p in sync $(( $(now_ms) - t_restart ))ms after restart"
    else
      fail "cycle $c: $p not back in sync within 30 s of its restart ($(replica_states_in "$(status_of a)")/ $(replica_states_in "$(status_of b)"))"
    fi
    bench_wait
    verify_only
    has_vip "$p" && fail "cycle $c: $p holds the VIP after rejoining"
    line="$line; stall ${B_STALL}ms reconnects=$B_RECONNECTS verified=${V_BLOCKS:-0}"
    log "$line"
    [ "$B_STALL" != - ] && stalls+=("$B_STALL") && STALLS[kill-cycles]="${STALLS[kill-cycles]:-} $B_STALL"
    [ "$TAKEOVER_MS" != - ] && takes+=("$TAKEOVER_MS") && TAKEOVERS[kill-cycles]="${TAKEOVERS[kill-cycles]:-} $TAKEOVER_MS"
    [ ${#RUN_FAILS[@]} -gt 0 ] && { log "stopping after the first failing cycle"; break; }
  done
  no_split_brain
  sampler_check "$t_run"
  local med mx tmed tmx
  read -r med mx < <(stats "${stalls[@]}")
  read -r tmed tmx < <(stats "${takes[@]}")
  note "cycles done=$c stall median=${med}ms takeover median=${tmed}ms (stall and takeover shown: the worst cycle's)"
  run_end kill-cycles "$mx" "$tmx" 0
}

LOAD_PIDS=()
load_stop() {
  local p
  for p in "${LOAD_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  LOAD_PIDS=()
}
scen_cpu_load() {
  local t_run st_a0 st_b0 st_a1 st_b1 ta0 tb0 ta1 tb1 ga0 gb0 ga1 gb1 i n changes
  run_begin "cpu-load (${DURATION}s)"
  st_a0=$(status_of a); st_b0=$(status_of b)
  ta0=$(takeover_at_in "$st_a0"); tb0=$(takeover_at_in "$st_b0")
  ga0=$(gaveup_at_in "$st_a0"); gb0=$(gaveup_at_in "$st_b0")
  roles_start 1
  t_run=$(now_ms)
  n=$(( $(nproc) * 2 ))
  if command -v stress-ng >/dev/null; then
    stress-ng --cpu "$(nproc)" --timeout "$(( DURATION + 30 ))s" >/dev/null 2>&1 &
    LOAD_PIDS+=($!); disown $! 2>/dev/null
  else
    for i in $(seq 1 "$n"); do
      sh -c 'while :; do :; done' & LOAD_PIDS+=($!); disown $! 2>/dev/null
    done
  fi
  note "load: ${#LOAD_PIDS[@]} spinners on $(nproc) CPUs"
  # A light load: one session, one command at a time.
  BENCH_IODEPTH=1 bench_start "$DURATION"
  bench_wait
  load_stop
  roles_stop
  st_a1=$(status_of a); st_b1=$(status_of b)
  ta1=$(takeover_at_in "$st_a1"); tb1=$(takeover_at_in "$st_b1")
  ga1=$(gaveup_at_in "$st_a1"); gb1=$(gaveup_at_in "$st_b1")
  # Same takeover instants (within 3 s: the "ms ago" figures are read at different times).
  same_at() { [ "$1" = none ] && [ "$2" = none ] && return 0; [ "$1" != none ] && [ "$2" != none ] && [ $(( $1 - $2 )) -le 3000 ] && [ $(( $2 - $1 )) -le 3000 ]; }
  same_at "$ta0" "$ta1" || fail "takeover on a during the load: last takeover moved ($(grep 'last takeover' <<<"$st_a1"))"
  same_at "$tb0" "$tb1" || fail "takeover on b during the load: last takeover moved ($(grep 'last takeover' <<<"$st_b1"))"
  same_at "$ga0" "$ga1" || fail "a gave up during the load ($(grep 'last gave up' <<<"$st_a1"))"
  same_at "$gb0" "$gb1" || fail "b gave up during the load ($(grep 'last gave up' <<<"$st_b1"))"
  serving a || fail "a no longer serves after the load (roles a=$(role_in "$st_a1") b=$(role_in "$st_b1"))"
  changes=$(awk '$2 != "primary" || $3 != "secondary"' "$RIG_DIR/roles.samples" | wc -l)
  local unknown; unknown=$(awk '$2 == "?" || $3 == "?"' "$RIG_DIR/roles.samples" | wc -l)
  [ $(( changes - unknown )) -eq 0 ] || fail "roles: $(( changes - unknown )) role samples were not a=primary b=secondary (first: $(awk '($2 != "primary" || $3 != "secondary") && $2 != "?" && $3 != "?" {print; exit}' "$RIG_DIR/roles.samples"))"
  [ "$unknown" -eq 0 ] || note "$unknown role samples unanswered (status took > 2 s under load)"
  [ "$B_RECONNECTS" = 0 ] || note "the bench reconnected $B_RECONNECTS times (outages $B_OUTAGES)"
  verify_only
  sampler_check "$t_run"
  note "reconnects=$B_RECONNECTS ios=$B_IOS verified=${V_BLOCKS:-0}"
  run_end cpu-load "$B_STALL" -
}

# ---------------------------------------------------------------------------------------

cleanup() {
  load_stop
  [ -n "${BENCH_PID:-}" ] && kill -9 "$BENCH_PID" 2>/dev/null
  sampler_stop 2>/dev/null
  roles_stop 2>/dev/null
  rig_down 2>/dev/null
}
trap 'cleanup' EXIT
trap 'echo "interrupted"; exit 130' INT TERM

names=("$@")
[ ${#names[@]} -gt 0 ] || read -r -a names <<<"$ALL_SCENARIOS"
for n in "${names[@]}"; do
  grep -qw -- "$n" <<<"$KNOWN_SCENARIOS" || { echo "unknown scenario '$n' (known: $KNOWN_SCENARIOS)" >&2; exit 2; }
done

echo "twinsan failover scenarios: ${names[*]}  (binary $TWINSAN_BIN, logs under $OUT_DIR)"
T_ALL=$(now_ms)
for n in "${names[@]}"; do
  echo "== $n"
  t0=$(now_ms)
  if scenario_begin "$n"; then
    "scen_${n//-/_}"
  else
    RESULTS_FAIL[$n]=$(( ${RESULTS_FAIL[$n]:-0} + 1 )); ANY_FAIL=1; SCEN_FAILED=1
    echo "RESULT FAIL $n setup (logs: $RIG_DIR)"; show_tails
  fi
  scenario_end
  echo "   ($n took $(( ($(now_ms) - t0) / 1000 )) s)"
done

echo
echo "== summary ($(( ($(now_ms) - T_ALL) / 1000 )) s)"
printf '%-14s %5s %5s  %14s %14s  %18s\n' scenario pass fail "stall median" "stall max" "takeover med/max"
for n in "${names[@]}"; do
  read -r sm sx < <(stats ${STALLS[$n]:-})
  read -r tm tx < <(stats ${TAKEOVERS[$n]:-})
  printf '%-14s %5s %5s  %11s ms %11s ms  %10s/%s ms\n' "$n" "${RESULTS_PASS[$n]:-0}" "${RESULTS_FAIL[$n]:-0}" "$sm" "$sx" "$tm" "$tx"
done
echo "(stall: the bench's stall_max_ms, the longest time without a completed I/O; takeover: fault to the survivor primary with the VIP, as polled)"
[ -n "${IMAGE_FAILS:-}" ] && echo "LUN images differed at the end of:${IMAGE_FAILS}"
if [ "$ANY_FAIL" = 0 ]; then echo "ALL PASSED"; else echo "SOME CHECKS FAILED (logs kept under $OUT_DIR)"; fi
exit "$ANY_FAIL"
