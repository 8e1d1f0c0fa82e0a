#!/bin/sh
# PID 1 of the VM-test guest (busybox sh; copied into the initramfs as /init by run.sh).
#
#  1. mounts proc/sys/devtmpfs/hugetlbfs, loads nvme + vfio modules, reserves hugepages;
#  2. finds the two emulated NVMe controllers by serial number (sluiceA: two namespaces,
#     sluiceB: one), falling back to the PCI addresses run.sh assigned (sluice.nvme_a= /
#     sluice.nvme_b= on the kernel command line);
#  3. binds every NVMe controller (class 0x010802) to vfio-pci;
#  4. runs /bin/guest-test.sh <phase> <acked> with NVME_A / NVME_B set, then powers off.
#
# Lines for the host to read: "GUEST: ..." (information), "FAIL ..." (a failure),
# "GUEST: phase <p> rc=<rc>" (the end of the test).
#
# Note: busybox sh, so no `set -o pipefail`, and no `set -e` either: PID 1 must reach poweroff
# whatever happens (if PID 1 exits, the kernel panics and the host only sees a timeout).

PATH=/bin:/sbin
export PATH

mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/hugepages && mount -t hugetlbfs hugetlbfs /dev/hugepages
echo "GUEST: up at $(cut -d' ' -f1 /proc/uptime)s; cmdline: $(cat /proc/cmdline)"

# Value of key=... on the kernel command line (empty if absent).
cmdline_arg() {
    for w in $(cat /proc/cmdline); do
        case $w in "$1="*) echo "${w#*=}"; return;; esac
    done
}
PHASE=$(cmdline_arg sluice.phase)
ACKED=$(cmdline_arg sluice.acked)
FALLBACK_A=$(cmdline_arg sluice.nvme_a)
FALLBACK_B=$(cmdline_arg sluice.nvme_b)

setup_ok=1
for m in nvme vfio vfio_iommu_type1 vfio-pci; do
    modprobe $m || { echo "FAIL guest-init: modprobe $m"; setup_ok=0; }
done
echo "GUEST: iommu groups: $(ls /sys/kernel/iommu_groups 2>/dev/null | wc -l)"

# Hugepages (2 MiB each) for the driver's DMA memory.
echo 64 > /proc/sys/vm/nr_hugepages
echo "GUEST: hugepages $(cat /proc/sys/vm/nr_hugepages) of 64 requested ($(grep Hugepagesize /proc/meminfo | tr -s ' '))"

# All NVMe controllers (PCI class 0x010802).
NVMES=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/class)" = 0x010802 ] && NVMES="$NVMES $(basename $d)"
done
[ -n "$NVMES" ] || { echo "FAIL guest-init: no NVMe controller (class 0x010802) found"; setup_ok=0; }

# While still bound to the kernel nvme driver, read each controller's serial number and list
# its namespaces. The kernel probes asynchronously: the serial is filled in after Identify and
# the namespaces appear after the scan, so wait (bounded) until both are there.
NVME_A=""; NVME_B=""
for a in $NVMES; do
    serial=""; nss=""; i=0
    while [ $i -lt 100 ]; do           # up to ~10 s
        c=$(ls -d /sys/bus/pci/devices/$a/nvme/nvme* 2>/dev/null | head -n1)
        if [ -n "$c" ]; then
            serial=$(cat $c/serial 2>/dev/null | tr -d ' ')
            nss=$(cd $c && ls -d nvme*n* 2>/dev/null | tr '\n' ' ')
            [ -n "$serial" ] && [ -n "$nss" ] && break
        fi
        sleep 0.1; i=$((i + 1))
    done
    echo "GUEST: nvme $a serial '${serial}' namespaces: ${nss:-none}"
    case $serial in
        sluiceA) NVME_A=$a;;
        sluiceB) NVME_B=$a;;
    esac
done
# Fallback: the fixed slots run.sh gave the controllers with addr=.
if [ -z "$NVME_A" ] && [ -n "$FALLBACK_A" ] && [ -e /sys/bus/pci/devices/$FALLBACK_A ]; then
    echo "GUEST: serial sluiceA not seen; using assigned slot $FALLBACK_A for controller A"
    NVME_A=$FALLBACK_A
fi
if [ -z "$NVME_B" ] && [ -n "$FALLBACK_B" ] && [ -e /sys/bus/pci/devices/$FALLBACK_B ]; then
    echo "GUEST: serial sluiceB not seen; using assigned slot $FALLBACK_B for controller B"
    NVME_B=$FALLBACK_B
fi
[ -n "$NVME_A" ] || { echo "FAIL guest-init: controller A (serial sluiceA) not found"; setup_ok=0; }
[ -n "$NVME_B" ] || { echo "FAIL guest-init: controller B (serial sluiceB) not found"; setup_ok=0; }

# Hand every NVMe controller to vfio-pci (the recipe's driver_override/unbind/drivers_probe).
for a in $NVMES; do
    d=/sys/bus/pci/devices/$a
    echo vfio-pci > $d/driver_override
    [ -e $d/driver ] && echo $a > $d/driver/unbind
    echo $a > /sys/bus/pci/drivers_probe
    g=$(basename "$(readlink $d/iommu_group)")
    drv=$(basename "$(readlink $d/driver)")
    echo "GUEST: nvme $a group $g driver $drv"
    [ "$drv" = vfio-pci ] && [ -e /dev/vfio/$g ] ||
        { echo "FAIL guest-init: $a not bound to vfio-pci (driver '$drv', /dev/vfio/$g)"; setup_ok=0; }
done
echo "GUEST: controller A=$NVME_A B=$NVME_B"

rc=1
if [ -z "$PHASE" ]; then
    echo "FAIL guest-init: no sluice.phase= on the kernel command line"
elif [ $setup_ok != 1 ]; then
    echo "FAIL guest-init: guest setup failed, not running phase $PHASE"
elif [ ! -x /bin/guest-test.sh ]; then
    echo "FAIL guest-init: /bin/guest-test.sh missing"
else
    echo "GUEST: phase $PHASE starting at $(cut -d' ' -f1 /proc/uptime)s"
    NVME_A=$NVME_A NVME_B=$NVME_B /bin/guest-test.sh "$PHASE" "$ACKED" </dev/null 2>&1
    rc=$?
fi
echo "GUEST: phase $PHASE rc=$rc"
echo "GUEST: done at $(cut -d' ' -f1 /proc/uptime)s"
sync
poweroff -f
