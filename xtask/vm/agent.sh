#!/bin/bash
# PID 1 of the distro-kernel VM (L1), started by xtask/vm/init. Sets the machine up as a KVM
# host (pseudo filesystems, the modules a distro host loads, a real ext4 disk on /var/tmp for
# loop devices with direct I/O, which overlayfs lacks), then runs what the host asks through
# /run/iopath (a read-write 9p share of the host's run folder):
#   host renames cmd.ID in -> we run it with bash -> out.ID (stdout+stderr), then rc.ID by rename.
# The host writes `poweroff` to stop the machine.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
X=/run/iopath
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
mount -t bpf bpf /sys/fs/bpf
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm /run/netns
mount -t devpts -o ptmxmode=666 devpts /dev/pts
mount -t tmpfs shm /dev/shm
hostname iopath-l1
ip link set lo up
echo /usr/sbin/modprobe > /proc/sys/kernel/modprobe
ulimit -l unlimited
ulimit -n 65536
log() { echo "iopath-agent: $*" > /dev/console; }
for m in virtio_blk ext4 loop tun vhost_net kvm_amd kvm_intel; do modprobe -q $m 2>/dev/null; done
if [ -b /dev/vda ] && mkfs.ext4 -q -F /dev/vda && mount /dev/vda /var/tmp; then
  chmod 1777 /var/tmp
else
  log "no scratch disk on /var/tmp"
fi
echo "$(cut -d' ' -f1 /proc/uptime) $(uname -r)" > $X/ready.tmp && mv $X/ready.tmp $X/ready
log "ready at $(cut -d' ' -f1 /proc/uptime) s"
trap '' INT TERM
shopt -s nullglob
n=0
while :; do
  # a heartbeat for the host, which gives up on a machine that stopped answering
  (( n++ % 20 == 0 )) && : > $X/alive
  for f in $X/cmd.*; do
    id=${f##*/cmd.}
    mv -f "$f" "$X/run.$id" || continue
    ( trap - INT TERM; cd /tmp; setsid bash "$X/run.$id" </dev/null >"$X/out.$id" 2>&1
      echo $? > "$X/rc.$id.tmp"; mv -f "$X/rc.$id.tmp" "$X/rc.$id" ) &
  done
  [ -e $X/poweroff ] && { sync; echo o > /proc/sysrq-trigger; }
  sleep 0.1
done
