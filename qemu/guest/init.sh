#!/bin/sh
# /init of the vhostmem test guest (busybox sh). Loads virtio-blk, checks /dev/vda, powers off.
#
# Settings come from the kernel command line as vmtest.KEY=VALUE (see qemu/launch.py):
#   mode=check|shell|bench|writer|durability|migrate|probe  bench_seconds=N  bench_jobs=J  writer_jobs=J  durability_writes=N
#   migrate_jobs=J
#   size=BYTES  lbs=BYTES  queues=N  ro=0|1  seed=S  rounds=N
#   discard=OFF:LEN  discard_zeroes=0|1  zeroout=OFF:LEN  hotplug=0|1  queue_cpus=CPU,CPU (default: every CPU)
#   packed=1 (check that the device negotiated VIRTIO_F_RING_PACKED)
# Output protocol, one line each, parsed by qemu/guestlog.py:
#   VHOSTMEM-TEST <name> PASS|FAIL <detail>     a check
#   VHOSTMEM-DIGEST <round> <md5>               md5 of the whole disk read through the page cache
#   VHOSTMEM-SYNC <tag>                         the guest waits for the host to echo <tag> back
#   VHOSTMEM-VERDICT PASS|FAIL                  the guest's own verdict, last line before poweroff
#   VHOSTMEM-PROBE running                      mode=probe only (the KVM probe): init ran; then poweroff

/bin/busybox mount -t devtmpfs devtmpfs /dev
# Without this the script's output would go nowhere: init starts with no usable stdio.
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys

MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk"
DISK=/dev/vda
SYSDISK=/sys/block/vda
HOTPLUG_WAIT_TENTHS=300
failed=0

param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in vmtest.$1=*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}

result() {
    echo "VHOSTMEM-TEST $1 $2 $3"
    [ "$2" = PASS ] || failed=1
}

expect_equal() {  # expect_equal NAME ACTUAL EXPECTED
    if [ "$2" = "$3" ]; then result "$1" PASS "value=$2"; else result "$1" FAIL "value=$2 expected=$3"; fi
}

finish() {
    if [ "$failed" = 0 ]; then echo "VHOSTMEM-VERDICT PASS"; else echo "VHOSTMEM-VERDICT FAIL"; fi
    sync
    poweroff -f
}

memtotal_kib() { awk '/^MemTotal:/ { print $2 }' /proc/meminfo; }

wait_for() {  # wait_for TENTHS COMMAND...: polls COMMAND every 0.1 s
    tries=$1; shift
    while [ "$tries" -gt 0 ]; do
        "$@" && return 0
        usleep 100000
        tries=$((tries - 1))
    done
    return 1
}

mem_above() { [ "$(memtotal_kib)" -gt "$1" ]; }
mem_at_most() { [ "$(memtotal_kib)" -le "$1" ]; }

sync_with_host() {  # the host does its part (QMP) and echoes the tag back on the serial line
    echo "VHOSTMEM-SYNC $1"
    read -r reply
    [ "$reply" = "$1" ] || result "sync-$1" FAIL "host replied '$reply'"
}

load_modules() {
    for m in $MODULES; do
        insmod "/modules/$m.ko" || result "boot.insmod-$m" FAIL "insmod failed"
    done
    if wait_for 100 test -b "$DISK"; then
        result boot.disk PASS "$DISK appeared"
    else
        result boot.disk FAIL "$DISK did not appear"
        finish
    fi
}

check_sysfs() {
    expect_equal boot.sysfs-size "$(( $(cat $SYSDISK/size) * 512 ))" "$SIZE"
    expect_equal boot.sysfs-lbs "$(cat $SYSDISK/queue/logical_block_size)" "$LBS"
    expect_equal boot.sysfs-ro "$(cat $SYSDISK/ro)" "$RO"
    expect_equal boot.queues "$(ls $SYSDISK/mq | wc -l)" "$QUEUES"
    # sysfs features: one character per feature bit; bit 34 is VIRTIO_F_RING_PACKED.
    [ -n "$PACKED" ] && expect_equal boot.ring-packed "$(cut -c35 $SYSDISK/device/features)" "$PACKED"
    echo "VHOSTMEM-INFO discard_max_bytes=$(cat $SYSDISK/queue/discard_max_bytes)" \
        "write_zeroes_max_bytes=$(cat $SYSDISK/queue/write_zeroes_max_bytes)"
}

run_round() {  # run_round ROUND [extra vmtest options]
    round=$1; shift
    seed=$SEED
    [ "$RO" = 1 ] || seed=$((SEED + 2 * (round - 1)))
    set -- --dev "$DISK" --size "$SIZE" --lbs "$LBS" --seed "$seed" --round "$round" "$@"
    if [ "$RO" = 1 ]; then
        set -- "$@" --readonly
    else
        set -- "$@" --discard "$DISCARD" --zeroout "$ZEROOUT"
        [ "$DISCARD_ZEROES" = 1 ] && set -- "$@" --discard-zeroes
    fi
    vmtest "$@" || failed=1
    echo "VHOSTMEM-DIGEST r$round $(md5sum "$DISK" | cut -d' ' -f1)"
}

run_hotplug_rounds() {
    before=$(memtotal_kib)
    sync_with_host plug
    if wait_for $HOTPLUG_WAIT_TENTHS mem_above "$before"; then
        result hotplug-online PASS "MemTotal ${before} -> $(memtotal_kib) KiB"
    else
        result hotplug-online FAIL "MemTotal stayed at $(memtotal_kib) KiB"
    fi
    run_round 2 --high-buffer
    sync_with_host unplug
    if wait_for $HOTPLUG_WAIT_TENTHS mem_at_most "$before"; then
        result hotunplug-offline PASS "MemTotal back to $(memtotal_kib) KiB"
    else
        result hotunplug-offline FAIL "MemTotal still $(memtotal_kib) KiB (was $before)"
    fi
    run_round 3
}

vq_interrupts() {  # vq_interrupts VIRTIODEV: "QUEUE COUNT" per request virtqueue, summed over CPUs
    awk -v dev="$1" 'NR == 1 { ncpu = NF; next }
        $NF ~ ("^" dev "-req[.]") { n = 0; for (i = 2; i <= ncpu + 1; i++) n += $i
                                    q = $NF; sub(/.*-req[.]/, "", q); print q, n }' /proc/interrupts
}

all_cpus() {  # 0,1,...,N-1 for the N CPUs the guest has
    n=$(grep -c '^processor' /proc/cpuinfo); cpus=0; i=1
    while [ "$i" -lt "$n" ]; do cpus="$cpus,$i"; i=$((i + 1)); done
    echo "$cpus"
}

# Every hardware queue must carry I/O: one reader pinned to each CPU (blk-mq maps CPUs to
# queues), and each virtqueue's MSI-X vector (virtioN-req.Q in /proc/interrupts) must count
# completions during the run. The 6.1 kernel's blk-mq debugfs keeps no per-hctx dispatch count
# (its "run" counter misses directly issued requests), so the interrupts are the per-queue count.
check_queues_used() {
    dev=$(basename "$(readlink -f $SYSDISK/device)")
    vq_interrupts "$dev" > /tmp/irq.before
    qio=ok
    vmtest --dev "$DISK" --size "$SIZE" --queue-io "$QUEUE_CPUS" || qio=failed
    vq_interrupts "$dev" > /tmp/irq.after
    counts=$(awk 'NR == FNR { before[$1] = $2; next }
                  { d = $2 - before[$1]; used += d > 0; per = per " req." $1 "=+" d }
                  END { printf "%d%s", used, per }' /tmp/irq.before /tmp/irq.after)
    used=${counts%% *}
    per=${counts#"$used"}
    if [ "$qio" = ok ] && [ "$used" = "$QUEUES" ]; then
        result queues-used PASS "value=$used$per cpus=$QUEUE_CPUS"
    else
        result queues-used FAIL "value=$used expected=$QUEUES$per cpus=$QUEUE_CPUS queue-io=$qio"
    fi
}

interactive_shell() {
    echo "vhostmem guest: $DISK is $(cat $SYSDISK/size 2>/dev/null) sectors;" \
        "busybox tools and vmtest are in /bin. Exit the shell to power off."
    setsid cttyhack sh -l
    poweroff -f
}

# "IRQS CTXT IDLE TOTAL": the disk's request-queue interrupts, the guest's context switches, and
# its idle (idle + iowait) and total CPU ticks
bench_counters() {
    dev=$(basename "$(readlink -f $SYSDISK/device)")
    echo "$(vq_interrupts "$dev" | awk '{ n += $2 } END { print n + 0 }')" \
        "$(awk '$1 == "ctxt" { print $2 }' /proc/stat)" \
        "$(awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t }' /proc/stat)"
}

# A fixed O_DIRECT random-read workload; results are VHOSTMEM-INFO bench lines, then what the
# run cost the guest: the disk's completion interrupts, the context switches and the idle share
# of its CPU time during it (`VHOSTMEM-INFO bench-counters irqs=N ctxt=M idle=I ticks=T`).
run_bench() {
    before=$(bench_counters)
    vmtest --dev "$DISK" --size "$SIZE" --bench "$(param bench_seconds 5)" \
        --bench-jobs "$(param bench_jobs 1)" || result bench FAIL "vmtest --bench failed"
    after=$(bench_counters)
    echo "$before $after" | awk '{ printf "VHOSTMEM-INFO bench-counters irqs=%d ctxt=%d idle=%d ticks=%d\n",
                                        $5 - $1, $6 - $2, $7 - $3, $8 - $4 }'
    finish
}

run_writer() {  # checksummed writes (vmtest --writer) until the host answers the sync point
    vmtest --dev "$DISK" --size "$SIZE" --writer "$(param writer_jobs 4)" &
    writer=$!
    sync_with_host writer-stop
    kill -TERM "$writer"
    wait "$writer" || failed=1
    finish
}

# Disk I/O across live migrations (qemu/migrate.py): writer jobs and page-cache jobs
# (vmtest --migrate-io) run while the host migrates the VM, until it answers the sync point.
# Before that the host may answer "diag" (its jobs stalled): the guest then prints the disk's
# requests in flight and its blocked tasks (sysrq w) and waits again.
run_migrate_io() {
    vmtest --dev "$DISK" --size "$SIZE" --migrate-io "$(param migrate_jobs 2)" &
    io=$!
    echo "VHOSTMEM-SYNC migrate-stop"
    while read -r reply && [ "$reply" = diag ]; do
        echo "VHOSTMEM-INFO diag inflight=$(cat $SYSDISK/inflight | tr -s ' ' ,)"
        echo w > /proc/sysrq-trigger
    done
    [ "$reply" = migrate-stop ] || result sync-migrate-stop FAIL "host replied '$reply'"
    kill -TERM "$io"
    wait "$io" || failed=1
    finish
}

direct_writes() {  # direct_writes PHASE INDEX N: N O_DIRECT writes to blocks INDEX*N.., one at a time
    if vmtest --dev "$DISK" --size "$SIZE" --direct-writes "$3" --first-block $(($2 * $3)) --job "$2"; then
        result "durability.$1-writes" PASS "writes=$3"
    else
        result "durability.$1-writes" FAIL "vmtest --direct-writes failed"
    fi
}

set_cache_type() {  # virtio_blk writes the config's writeback byte; QEMU forwards a change only
    echo "$1" > $SYSDISK/cache_type
    expect_equal "durability.cache-type-$2" "$(cat $SYSDISK/cache_type)" "$1"
}

# The disk's write-through choice across a backend kill (qemu/durability.py): after each phase
# of writes the guest waits at a sync point named after it, where the host counts the backend's
# fdatasyncs; at "before-kill" the host also kills the backend with SIGKILL and restarts it.
run_durability() {
    n=$(param durability_writes 64)
    expect_equal durability.cache-type-at-boot "$(cat $SYSDISK/cache_type)" "write back"
    direct_writes boot-default 0 "$n"
    sync_with_host boot-default
    # Through write-through and back: the backend now holds write-back from the guest itself.
    set_cache_type "write through" toggled
    set_cache_type "write back" writeback
    direct_writes writeback 1 "$n"
    sync_with_host writeback
    set_cache_type "write through" write-through
    direct_writes before-kill 2 "$n"
    sync_with_host before-kill
    expect_equal durability.cache-type-after-restart "$(cat $SYSDISK/cache_type)" "write through"
    direct_writes after-restart 3 "$n"
    sync_with_host after-restart
    finish
}

MODE=$(param mode check)
if [ "$MODE" = probe ]; then  # the host's KVM probe: reaching init is all it asks
    echo "VHOSTMEM-PROBE running"
    poweroff -f
fi
SIZE=$(param size 0)
LBS=$(param lbs 512)
QUEUES=$(param queues 1)
RO=$(param ro 0)
SEED=$(param seed 1)
ROUNDS=$(param rounds 1)
DISCARD=$(param discard 0:0)
DISCARD_ZEROES=$(param discard_zeroes 1)
ZEROOUT=$(param zeroout 0:0)
HOTPLUG=$(param hotplug 0)
PACKED=$(param packed "")
QUEUE_CPUS=$(param queue_cpus "$(all_cpus)")

load_modules
[ "$MODE" = shell ] && interactive_shell
check_sysfs
[ "$MODE" = bench ] && run_bench
[ "$MODE" = writer ] && run_writer
[ "$MODE" = durability ] && run_durability
[ "$MODE" = migrate ] && run_migrate_io
if [ "$HOTPLUG" = 1 ]; then
    run_round 1
    run_hotplug_rounds
else
    round=1
    while [ "$round" -le "$ROUNDS" ]; do
        run_round "$round"
        round=$((round + 1))
    done
fi
check_queues_used
finish
