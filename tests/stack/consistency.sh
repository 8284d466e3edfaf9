#!/bin/sh
# The stack lab's end-of-run consistency check, as an operator would make it with
# libvirt's and the kernel's own tools: every defined domain runs, and each vCPU
# thread's affinity (what the kernel enforces) equals what `virsh vcpuinfo`
# reports and lies within its cgroup's effective CPU set. Prints one line per
# problem; exits 1 if there was any. Arguments: the domains that must exist.
problems=0
say() { echo "consistency: $*"; problems=$((problems + 1)); }

for want in "$@"; do
  virsh domstate "$want" >/dev/null 2>&1 || say "$want is not defined"
done

for dom in $(virsh list --all --name); do
  state=$(virsh domstate "$dom")
  [ "$state" = "running" ] || { say "$dom is $state"; continue; }
  pid=$(cat "/run/libvirt/qemu/$dom.pid")
  # `virsh vcpuinfo`: "VCPU: N" ... "CPU Affinity: yy--yy--" per vCPU.
  virsh vcpuinfo "$dom" | awk '/^VCPU:/ {v=$2} /^CPU Affinity:/ {print v, $3}' |
  while read -r vcpu map; do
    tid=""
    for t in /proc/"$pid"/task/*; do
      [ "$(cat "$t/comm")" = "CPU $vcpu/TCG" ] || [ "$(cat "$t/comm")" = "CPU $vcpu/KVM" ] || continue
      tid=${t##*/}
    done
    [ -n "$tid" ] || { echo "consistency: $dom vCPU $vcpu: no thread"; exit 1; }
    allowed=$(awk '/^Cpus_allowed_list:/ {print $2}' "/proc/$pid/task/$tid/status")
    # The affinity map as a CPU list.
    list=$(echo "$map" | awk '{ out=""; for (i = 1; i <= length($0); i++) if (substr($0, i, 1) == "y") out = out (out == "" ? "" : ",") (i - 1); print out }')
    expanded=$(echo "$allowed" | awk -F, '{ out=""; for (i = 1; i <= NF; i++) { n = split($i, r, "-"); a = r[1]; b = (n == 2 ? r[2] : r[1]); for (c = a; c <= b; c++) out = out (out == "" ? "" : ",") c } print out }')
    [ "$list" = "$expanded" ] || { echo "consistency: $dom vCPU $vcpu: thread allows $allowed, virsh vcpuinfo says $list"; exit 1; }
    cg=$(awk -F: '$1 == "0" {print $3}' "/proc/$pid/task/$tid/cgroup")
    eff=$(cat "/sys/fs/cgroup$cg/cpuset.cpus.effective" 2>/dev/null)
    for c in $(echo "$expanded" | tr , ' '); do
      inside=$(echo "$eff" | awk -F, -v c="$c" '{ for (i = 1; i <= NF; i++) { n = split($i, r, "-"); a = r[1]; b = (n == 2 ? r[2] : r[1]); if (c >= a && c <= b) { print 1; exit } } print 0 }')
      [ "$inside" = 1 ] || { echo "consistency: $dom vCPU $vcpu: CPU $c allowed but outside its cgroup $cg ($eff)"; exit 1; }
    done
  done || problems=$((problems + 1))
done
[ "$problems" -eq 0 ] && echo "consistency: every domain runs; vCPU affinities agree with virsh vcpuinfo and their cgroups"
[ "$problems" -eq 0 ]
