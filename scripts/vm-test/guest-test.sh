#!/bin/sh
# The test sequence inside the VM-test guest (busybox sh; /bin/guest-test.sh in the initramfs).
#
#   guest-test.sh write             conformance on A/1 and A/2, a short bench on B/1, mkfs on
#                                   A/2, then powercut-write on A/2, which prints "ACK <n>"
#                                   lines until the host kills the VM (it never returns)
#   guest-test.sh verify <acked>    fsck on A/2, then powercut-verify that every write up to
#                                   <acked> survived the power cut
#
# NVME_A (controller with two namespaces) and NVME_B (one namespace) are PCI addresses set by
# guest-init.sh. Every step prints "STEP <name>" before and "PASS step <name>" or
# "FAIL step <name> rc=<rc>" after; run.sh reads these lines. Exit status: 0 if all passed.

PATH=/bin:/sbin
export PATH

# The bench steps: sluice-bench device against controller B (TCG timings are functional,
# not performance figures).
BENCH_W="device --dev nvme://$NVME_B/1 --rw randwrite --bs 4k --qd 16 --runtime 2s --quiet --json /tmp/bench-w.json"
BENCH_R="device --dev nvme://$NVME_B/1 --rw randread --bs 4k --qd 16 --runtime 2s --quiet --json /tmp/bench-r.json"

# A step that runs longer than this is killed and fails (rc 143), so a hung binary produces a
# FAIL line instead of a silent VM timeout. TCG is slow: keep it generous.
STEP_TIMEOUT=${STEP_TIMEOUT:-150}

PHASE=$1
ACKED=$2
failed=0

# step <name> <binary> [args...]
step() {
    name=$1; shift
    echo "STEP $name"
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "FAIL step $name rc=127 ($1 not found in the initramfs)"
        failed=1
        return 127
    fi
    echo "+ $*"
    timeout "$STEP_TIMEOUT" "$@"
    rc=$?
    if [ $rc = 0 ]; then
        echo "PASS step $name"
    else
        [ $rc = 143 ] && echo "(step $name killed after ${STEP_TIMEOUT}s)"
        echo "FAIL step $name rc=$rc"
        failed=1
    fi
    return $rc
}

# sluice-osd run (standalone: no cluster configuration) opens every shard on its own
# reactor and queue pair over VFIO, runs for a few seconds, and stops on SIGTERM (queues
# deleted, controller shut down). $1: the device.
OSD_RUN='sluice-osd run --dev "$1" --cpus none >/tmp/osd-run.log 2>&1 &
pid=$!
sleep 4
kill -TERM $pid
wait $pid
rc=$?
cat /tmp/osd-run.log
[ $rc = 0 ] || exit $rc
grep -q "open on 2 reactor(s)" /tmp/osd-run.log || { echo "osd-run: the shards did not open"; exit 1; }'

[ -n "$NVME_A" ] && [ -n "$NVME_B" ] || { echo "FAIL guest-test: NVME_A/NVME_B not set"; exit 1; }
echo "GUEST-TEST: phase $PHASE, A=$NVME_A B=$NVME_B, acked=${ACKED:-none}"

case $PHASE in
write)
    step conformance-a1 sluice-vm-test conformance "nvme://$NVME_A/1"
    step conformance-a2 sluice-vm-test conformance "nvme://$NVME_A/2"
    # shellcheck disable=SC2086  # the arguments are split into words on purpose
    step bench-randwrite sluice-bench $BENCH_W
    # shellcheck disable=SC2086
    step bench-randread sluice-bench $BENCH_R
    # Two shards: `sluice-osd run` in the verify phase then opens two queue pairs.
    step mkfs sluice-osd mkfs --dev "nvme://$NVME_A/2" --shards 2 --force
    if [ $failed != 0 ]; then
        echo "GUEST-TEST: an earlier step failed; skipping powercut-write"
        exit 1
    fi
    if ! command -v sluice-vm-test >/dev/null 2>&1; then
        echo "FAIL step powercut-write rc=127 (sluice-vm-test not found)"
        exit 127
    fi
    # Never returns while all is well: the host kills QEMU (the power cut) once it has seen
    # enough ACK lines. If it does return, that is a failure.
    echo "STEP powercut-write"
    sluice-vm-test powercut-write "nvme://$NVME_A/2"
    rc=$?
    echo "FAIL step powercut-write rc=$rc (returned; it should run until the power cut)"
    exit 1
    ;;
verify)
    if [ -z "$ACKED" ]; then
        echo "FAIL guest-test: verify phase without sluice.acked="
        exit 1
    fi
    step fsck sluice-osd fsck --dev "nvme://$NVME_A/2"
    step powercut-verify sluice-vm-test powercut-verify "nvme://$NVME_A/2" "$ACKED"
    step osd-run sh -c "$OSD_RUN" osd-run "nvme://$NVME_A/2"
    exit $failed
    ;;
*)
    echo "FAIL guest-test: unknown phase '$PHASE' (want write or verify)"
    exit 1
    ;;
esac
