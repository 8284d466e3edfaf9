#!/bin/sh
# Ground truth that nothing changes where a libvirt domain runs and where its memory
# is, read from the kernel's and cgroupfs's own files (not from libvirt or
# vmbalancer): every vCPU thread's and the main thread's Cpus_allowed_list and
# Mems_allowed_list, cpuset.cpus/.mems (configured and effective) of the domain's
# scope, its libvirt/ group and each emulator/vcpuN group, and the pages of its guest
# RAM on each node (the largest mapping of numa_maps, in base pages: one page moved
# between nodes shows).
#
# Usage:
#   pin-watch.sh start DOMAIN   record the placement now, print it, and compare it
#                               again and again in the background until `check`
#                               (2 s apart; one comparison itself takes seconds
#                               under TCG inside TCG: `check` says how many ran)
#   pin-watch.sh check DOMAIN   stop watching; print the recorded placement, how long
#                               and how often it was compared, and every change seen
#                               (with the uptime it was seen at); exit 1 if any
#   pin-watch.sh show DOMAIN    print the placement now
dir=/run/lab/pin-watch
mkdir -p "$dir"

placement() {
    pid=$(cat "/run/libvirt/qemu/$1.pid") || return 1
    # One awk over all threads' status files (a shell loop per thread is slow under
    # TCG): vCPU threads by name, the main thread by its id.
    awk -v main="/proc/$pid/task/$pid/status" '
        /^Name:/ { sub(/^Name:\t/, ""); name[FILENAME] = $0 }
        /^Cpus_allowed_list:/ { cpus[FILENAME] = $2 }
        /^Mems_allowed_list:/ { mems[FILENAME] = $2 }
        END {
            for (f in name)
                if (name[f] ~ /^CPU [0-9]+\// || f == main)
                    printf "thread %s: cpus %s mems %s\n", (f == main ? "main" : name[f]), cpus[f], mems[f]
        }' /proc/"$pid"/task/*/status | sort
    cg=$(awk -F: '$1 == "0" { print $3 }' "/proc/$pid/cgroup")
    scope="/sys/fs/cgroup${cg%%.scope/*}.scope"
    for g in "$scope" "$scope/libvirt" "$scope"/libvirt/emulator "$scope"/libvirt/vcpu*; do
        [ -d "$g" ] || continue
        printf 'cgroup %s:' "${g#"$scope"}"
        for f in cpus mems cpus.effective mems.effective; do
            printf ' %s=%s' "$f" "$(cat "$g/cpuset.$f" 2>/dev/null)"
        done
        echo
    done
    awk '{ t = 0; line = ""
           for (i = 1; i <= NF; i++) if ($i ~ /^N[0-9]+=/) {
               split(substr($i, 2), kv, "="); t += kv[2]; line = line " " $i }
           if (t > best) { best = t; nodes = line } }
         END { printf "guest RAM pages per node:%s\n", nodes }' "/proc/$pid/numa_maps"
}

watch_loop() {
    polls=0
    while [ ! -e "$dir/$1.stop" ] && placement "$1" > "$dir/$1.now" 2>/dev/null; do
        polls=$((polls + 1))
        echo "$polls" > "$dir/$1.polls"
        if ! cmp -s "$dir/$1.last" "$dir/$1.now"; then
            {
                echo "at uptime $(cut -d' ' -f1 /proc/uptime) s:"
                diff "$dir/$1.last" "$dir/$1.now" | grep '^[<>]'
            } >> "$dir/$1.changes"
            cp "$dir/$1.now" "$dir/$1.last"
        fi
        sleep 2
    done
}

case "$1" in
start)
    rm -f "$dir/$2".*
    placement "$2" > "$dir/$2.recorded" || exit 1
    cp "$dir/$2.recorded" "$dir/$2.last"
    : > "$dir/$2.changes"
    cut -d' ' -f1 /proc/uptime > "$dir/$2.since"
    echo "$2 at uptime $(cat "$dir/$2.since") s:"
    cat "$dir/$2.recorded"
    nohup "$0" watch "$2" > /dev/null 2>&1 &
    ;;
watch)
    watch_loop "$2"
    ;;
show)
    placement "$2"
    ;;
check)
    touch "$dir/$2.stop"
    sleep 3
    now=$(cut -d' ' -f1 /proc/uptime)
    cat "$dir/$2.recorded"
    echo "$2: the above recorded at uptime $(cat "$dir/$2.since") s, compared $(cat "$dir/$2.polls" 2>/dev/null || echo 0) times until $now s"
    if [ -s "$dir/$2.changes" ]; then
        echo "CHANGED:"
        cat "$dir/$2.changes"
        exit 1
    fi
    echo "unchanged"
    ;;
*)
    echo "usage: $0 start|check|show DOMAIN" >&2
    exit 2
    ;;
esac
