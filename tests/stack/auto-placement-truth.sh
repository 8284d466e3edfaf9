#!/bin/sh
# Ground truth of libvirt's automatic placement, from libvirt's status file and the
# kernel only. For each domain: the nodes libvirt's `numad -w` helper advised (the
# `<numad nodeset=...>` libvirt records in /run/libvirt/qemu/NAME.xml), the
# cpuset.mems and cpuset.cpus of its emulator and vCPU cgroups, every vCPU thread's
# affinity, and its largest mapping's pages per node in numa_maps (the guest RAM).
# Usage: auto-placement-truth.sh MIN_DISTINCT DOMAIN...
# Exits 0 when every domain is bound to exactly its advised nodes (cgroup mems equal
# the advice, cgroup CPUs and thread affinities equal those nodes' CPUs), at least
# 99 % of its guest RAM is on them, and at least MIN_DISTINCT domains were advised
# a single node of their own (distinct nodes).
min_distinct=$1
shift
bad=0
singles=""
# A CPU or node list ("0-1,4") expanded to one number per line.
expand() {
    echo "$1" | tr , '\n' | awk -F- 'NF { b = (NF == 2 ? $2 : $1); for (i = $1; i <= b; i++) print i }'
}
# The CPUs of a node list, expanded and sorted.
node_cpus() {
    for n in $(expand "$1"); do
        expand "$(cat /sys/devices/system/node/node"$n"/cpulist)"
    done | sort -n | tr '\n' ,
}
for vm in "$@"; do
    pid=$(cat "/run/libvirt/qemu/$vm.pid")
    advised=$(grep -o "<numad nodeset='[^']*'" "/run/libvirt/qemu/$vm.xml" | cut -d"'" -f2)
    if [ -z "$advised" ]; then
        echo "$vm: no advised nodeset in libvirt's status file"
        bad=$((bad + 1))
        continue
    fi
    want_cpus=$(node_cpus "$advised")
    problems=""
    cg=$(awk -F: '$1 == "0" {print $3}' "/proc/$pid/cgroup")
    base="/sys/fs/cgroup${cg%/*}"
    for g in "$base"/emulator "$base"/vcpu*; do
        mems=$(cat "$g/cpuset.mems")
        cpus=$(expand "$(cat "$g/cpuset.cpus")" | sort -n | tr '\n' ,)
        [ "$mems" = "$advised" ] || problems="$problems ${g##*/}.mems=$mems"
        [ "$cpus" = "$want_cpus" ] || problems="$problems ${g##*/}.cpus=$cpus"
    done
    threads=0
    for t in /proc/"$pid"/task/*; do
        case "$(cat "$t/comm")" in "CPU "*/TCG | "CPU "*/KVM) ;; *) continue ;; esac
        threads=$((threads + 1))
        allowed=$(awk '/^Cpus_allowed_list:/ {print $2}' "$t/status")
        [ "$(expand "$allowed" | sort -n | tr '\n' ,)" = "$want_cpus" ] ||
            problems="$problems thread ${t##*/} allowed $allowed"
    done
    [ "$threads" -gt 0 ] || problems="$problems no vCPU threads"
    # The mapping with the most pages: N<node>=<pages> fields summed per line.
    ram=$(awk '{ s = 0; for (i = 1; i <= NF; i++) if ($i ~ /^N[0-9]+=/) { split($i, a, "="); s += a[2] } if (s > best) { best = s; line = $0 } }
        END { n = split(line, f, " "); for (i = 1; i <= n; i++) if (f[i] ~ /^N[0-9]+=/) printf "%s ", f[i] }' "/proc/$pid/numa_maps")
    share=$(echo "$ram" | tr ' ' '\n' | awk -F= -v want=",$(expand "$advised" | tr '\n' ,)" '
        NF == 2 { n = substr($1, 2); all += $2; if (index(want, "," n ",")) on += $2 }
        END { printf "%.3f", all ? on / all : 0 }')
    awk -v s="$share" 'BEGIN { exit !(s >= 0.99) }' || problems="$problems guest RAM only $share on advised nodes"
    echo "$vm: advised node(s) $advised; cgroups $(cat "$base/emulator/cpuset.mems")/$(cat "$base/emulator/cpuset.cpus") (mems/cpus); $threads vCPU threads; guest RAM $ram($share on advised)${problems:+; WRONG:$problems}"
    [ -z "$problems" ] || bad=$((bad + 1))
    case "$advised" in *[,-]*) ;; *) singles="$singles $advised" ;; esac
done
distinct=$(echo "$singles" | tr ' ' '\n' | grep . | sort -u | wc -l)
echo "$# domains, $bad not bound to their advice; single-node advice on $distinct distinct nodes:$singles"
[ "$bad" = 0 ] && [ "$distinct" -ge "$min_distinct" ]
