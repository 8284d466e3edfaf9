#!/bin/sh
# Ground truth of huge-page domains, from the kernel only: for each domain, its
# hugetlb pages per node (the `huge` lines of qemu's numa_maps, counted in huge
# pages) and the nodes its vCPU threads may run on and last ran on.
# Usage: hugetlb-truth.sh HOME_NODE MIN_STAYED MIN_MOVED DOMAIN...
# Exits 0 when every domain's huge pages are all on the node where its busiest vCPU
# last ran, at least MIN_STAYED domains have them on HOME_NODE (the vCPUs went to
# the memory) and at least MIN_MOVED elsewhere (the memory went to the vCPUs).
home=$1 min_stayed=$2 min_moved=$3
shift 3
stayed=0 moved=0 bad=0
node_of_cpu() {
    for d in /sys/devices/system/node/node*; do
        if awk -v c="$1" -F, '{for(i=1;i<=NF;i++){n=split($i,r,"-"); if ((n==1 && r[1]==c) || (n==2 && c>=r[1] && c<=r[2])) f=1}} END{exit !f}' "$d/cpulist"; then
            echo "${d##*node}"
            return
        fi
    done
}
for vm in "$@"; do
    pid=$(cat "/run/libvirt/qemu/$vm.pid")
    pages=$(grep ' huge ' "/proc/$pid/numa_maps" | grep -o 'N[0-9]*=[0-9]*' | tr '\n' ' ')
    # The vCPU thread with the most CPU time (utime + stime), the CPU it last ran on
    # and its stat file; one awk over all threads (a shell loop is slow under TCG).
    busiest=$(awk '/\(CPU [0-9]+\/(TCG|KVM)\)/ { f = FILENAME; sub(/.*\) /, ""); print $12 + $13, $37, f }' \
        /proc/"$pid"/task/*/stat | sort -n | tail -1)
    set -- $busiest
    cpu=$2
    allowed=$(grep Cpus_allowed_list "${3%stat}status" | cut -f2)
    vnode=$(node_of_cpu "$cpu")
    nodes=$(echo "$pages" | grep -o 'N[0-9]*' | sort -u | wc -l)
    on=$(echo "$pages" | grep -o 'N[0-9]*' | head -1 | cut -c2-)
    echo "$vm: huge pages $pages; busiest vCPU last on CPU $cpu (node $vnode), allowed $allowed"
    if [ "$nodes" != 1 ] || [ "$on" != "$vnode" ]; then
        bad=$((bad + 1))
    elif [ "$on" = "$home" ]; then
        stayed=$((stayed + 1))
    else
        moved=$((moved + 1))
    fi
done
echo "$stayed with their huge pages on node $home, $moved moved to their vCPUs, $bad not local"
[ "$bad" = 0 ] && [ "$stayed" -ge "$min_stayed" ] && [ "$moved" -ge "$min_moved" ]
