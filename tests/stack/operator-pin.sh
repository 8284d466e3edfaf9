#!/bin/sh
# An operator pins, with `virsh vcpupin`, a domain that vmbalancer holds, and the
# stack lab checks that vmbalancer lets go of it. Usage:
#
#   operator-pin.sh pin DOMAIN
#     Waits (up to 120 s) until vmbalancer holds DOMAIN (its pid is in the daemon's
#     journal, the record of the VMs whose sets it changed) and has settled it (at
#     least 90 % of its memory local in `vmbalancer status`, the status line the same
#     two seconds apart), so no memory move of it is in flight. Then pins every vCPU
#     to the CPUs of node 3, or of node 0 if vmbalancer had put it on node 3: away
#     from its memory, where a balancer that still held it would move it back or
#     move its memory. Prints the emulator and vCPU 0 sets vmbalancer had given it,
#     and checks that the kernel applied the pins.
#
#   operator-pin.sh let-go DOMAIN
#     Waits (up to 60 s) until vmbalancer's log says it let go of DOMAIN, its pid left
#     the journal, and `vmbalancer status` shows it left alone as pinned by the
#     operator with the pins from libvirt's domain XML; prints how long after the pin
#     each was first seen. Then checks the kernel: the vCPU threads still have the
#     operator's CPUs, and the emulator thread is back on every online CPU (what
#     vmbalancer set there, which the pin does not cover, is put back); and starts
#     pin-watch.sh on the domain. Exits 1 if anything is missing.
journal=/var/lib/vmbalancer/journal.json
uptime_s() { cut -d' ' -f1 /proc/uptime; }
status_line() { vmbalancer status 2>/dev/null | awk -v d="$1" '$2 == d'; }
held() { grep -q "\"$1\"" "$journal" 2>/dev/null; }

dom=$2
pid=$(cat "/run/libvirt/qemu/$dom.pid") || exit 1
case "$1" in
pin)
    prev=""
    waited=0
    while [ "$waited" -lt 120 ]; do
        line=$(status_line "$dom")
        local_pct=$(echo "$line" | awk '{ sub(/%/, "", $8); print $8 + 0 }')
        if held "$pid" && [ "$local_pct" -ge 90 ] && [ "$line" = "$prev" ]; then
            break
        fi
        prev=$line
        sleep 2
        waited=$((waited + 2))
    done
    echo "after ${waited} s: $line"
    held "$pid" || { echo "vmbalancer does not hold $dom"; exit 1; }
    home=$(echo "$line" | awk '{ print $4 }')
    node=3
    [ "$home" = 3 ] && node=0
    cpus=$(cat "/sys/devices/system/node/node$node/cpulist")
    echo "$cpus" > "/run/lab/$dom.pinned-cpus"
    echo "as vmbalancer placed it:"
    /lab/stack/pin-watch.sh show "$dom" | grep -E '^thread (main|CPU 0)|emulator'
    uptime_s > "/run/lab/$dom.pinned-at"
    vcpus=$(virsh vcpucount "$dom" --live --active) || exit 1
    v=0
    while [ "$v" -lt "$vcpus" ]; do
        virsh vcpupin "$dom" "$v" "$cpus" --live --config > /dev/null || exit 1
        v=$((v + 1))
    done
    echo "virsh vcpupin $dom 0..$((vcpus - 1)) $cpus (node $node) from uptime $(cat "/run/lab/$dom.pinned-at") s to $(uptime_s) s"
    bad=$(/lab/stack/pin-watch.sh show "$dom" | grep '^thread CPU ' | grep -vc ": cpus $cpus ")
    [ "$bad" = 0 ] || { echo "$bad vCPU threads do not have the pinned CPUs $cpus"; exit 1; }
    ;;
let-go)
    t0=$(cat "/run/lab/$dom.pinned-at") || exit 1
    said="" left="" shown=""
    waited=0
    while [ "$waited" -lt 60 ]; do
        now=$(uptime_s)
        if [ -z "$said" ]; then
            # The log line's own time (monotonic, as /proc/uptime in this guest).
            said=$(journalctl -u vmbalancer -o short-monotonic --no-pager | grep 'letting go' |
                grep "name=$dom " | head -1 | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p')
        fi
        if [ -z "$left" ] && ! held "$pid"; then
            left=$now
        fi
        if [ -z "$shown" ] && status_line "$dom" | grep -q 'left alone: pinned by the operator (libvirt domain XML: vcpupin 0->'; then
            shown=$now
        fi
        [ -n "$said" ] && [ -n "$left" ] && [ -n "$shown" ] && break
        sleep 1
        waited=$((waited + 1))
    done
    after() { [ -n "$1" ] && awk -v a="$1" -v b="$t0" 'BEGIN { printf "%.1f s after the pin", a - b }' || echo "never (60 s)"; }
    echo "log says it let go: $(after "$said") (the line's time)"
    journalctl -u vmbalancer -o cat --no-pager | grep 'letting go' | grep "name=$dom "
    echo "pid out of the journal: $(after "$left") (first poll that saw it)"
    echo "status shows it left alone: $(after "$shown") (first poll that saw it)"
    status_line "$dom"
    [ -n "$said" ] && [ -n "$left" ] && [ -n "$shown" ] || exit 1
    # What it let go of: the vCPUs keep the operator's pins, the emulator threads
    # are back on every CPU (the domain has no emulatorpin). From here the watch
    # says whether anything changes again.
    /lab/stack/pin-watch.sh start "$dom" > "/run/lab/$dom.watch-start" || exit 1
    grep -E '^thread|emulator' "/run/lab/pin-watch/$dom.recorded"
    cpus=$(cat "/run/lab/$dom.pinned-cpus")
    online=$(cat /sys/devices/system/cpu/online)
    bad=$(grep '^thread CPU ' "/run/lab/pin-watch/$dom.recorded" | grep -vc ": cpus $cpus ")
    [ "$bad" = 0 ] || { echo "$bad vCPU threads lost the pinned CPUs $cpus"; exit 1; }
    grep -q "^thread main: cpus $online " "/run/lab/pin-watch/$dom.recorded" ||
        { echo "the emulator thread is not back on CPUs $online"; exit 1; }
    ;;
*)
    echo "usage: $0 pin|let-go DOMAIN" >&2
    exit 2
    ;;
esac
