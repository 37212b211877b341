#!/bin/bash
# l2.sh: a nested guest (L2) inside the distro-kernel VM (L1, `cargo xtask vm`), for the tests
# in tests/tests/nested.rs. The lab kernel ($IOPATH_L2_KERNEL) under nested KVM (kvm_amd), with
# virtio-net on a tap in the network namespace l2ns (169.254.100.1 <-> guest 169.254.100.2),
# vhost-net on or off, and a virtio-blk disk. With L2_NET=bridge, a host's topology instead: the
# tap l2tap on bridge l2br in L1's own namespace with the uplink l2up, a veth whose peer is
# 169.254.100.1 in l2ns (which knows the guest's MAC: no ARP from that side).
#   L2_NAME=NAME L2_VHOST=on|off [L2_NET=bridge] l2.sh start
#                                                 boot it, wait for the guest's READY (<= 120 s)
#     [L2_DISK=PATH L2_CACHE=MODE L2_AIO=ENGINE]  the disk's backing (default a 64 MiB file in
#                                                 $L2_RUN; a block device with L2_CACHE=none),
#                                                 QEMU's aio= (threads, native, io_uring)
#     [L2_SCSI=1 L2_DISK=/dev/BLOCKDEV]           the disk through vhost-scsi instead: a LIO
#                                                 iblock backstore on that device, exported by
#                                                 vhost (vhost-scsi-pci); the guest's is sda
#     [L2_VFIO_NIC=1]                             L1's e1000e (00:06.0) passed through (vfio-pci,
#                                                 SeaBIOS): the guest's eth1, 169.254.101.2;
#                                                 L1's virtio-net NIC on the same QEMU hub
#                                                 (00:05.0) is 169.254.101.1 in l2ns
#     [L2_VFIO_NVME=1]                            L1's NVMe (00:07.0) passed through: the
#                                                 guest's disk rounds go to nvme0n1
#     [L2_ROUNDS=R L2_IOS=N L2_PERIOD_MS=P        the guest's disk rounds (lab_guest: N 4 KiB
#      L2_DELAY_MS=D]                             writes then N reads each, P ms apart, from
#                                                 D ms after READY; each printed on the console)
#   l2.sh ping COUNT INTERVAL [ADDR]              from the namespace (COUNT <= 1000), to the
#                                                 guest's virtio-net address or ADDR
#   l2.sh netem DELAY|off                         netem on the tap's and the uplink's root qdiscs
#                                                 (bridge only): each direction held DELAY
#   l2.sh monitor 'HMP command'                   QEMU's monitor (stop, cont, ...)
#   l2.sh stop                                    quit QEMU, delete the namespace and links
set -u
RUN=${L2_RUN:-/tmp/l2}; NS=l2ns; TAP=tap0; HOST_IP=169.254.100.1; GUEST_IP=169.254.100.2
BR_TAP=l2tap; BRIDGE=l2br; UPLINK=l2up; PEER=l2peer; GUEST_MAC=02:00:00:00:64:02
# L1's devices for passthrough (xtask/src/vm.rs): the e1000e, the NVMe, and the virtio-net NIC
# that shares the e1000e's QEMU hub; the passed-through NIC's subnet.
E1000E=0000:00:06.0; NVME=0000:00:07.0; HUB_NIC=0000:00:05.0; VF_HOST=169.254.101.1; VF_GUEST=169.254.101.2
KERNEL=${IOPATH_L2_KERNEL:?set by cargo xtask vm}
# The lab kernel must not use what nested SVM under TCG does not emulate.
CLEARCPUID=smap,fsgsbase,invpcid,pcid,rdrand,rdseed,rdpid,popcnt,clflushopt,clwb,xsave,xsaveopt,xsavec,xsaves,avx,avx2,avx512f,pku,ospke,umip
die() { echo "l2: $*" >&2; [ "${STARTING:-}" ] && cmd_stop >/dev/null 2>&1; exit 1; }
qpid() { [ -s $RUN/qemu.pid ] && cat $RUN/qemu.pid; }
running() { local p; p=$(qpid) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
monitor() {
  python3 -c "
import socket,sys,time
s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect('$RUN/mon.sock')
s.sendall((sys.argv[1]+'\n').encode()); time.sleep(0.3)
try: print(s.recv(65536).decode(errors='replace'))
except Exception: pass" "$1"
}
# vhost-scsi: LIO's iblock backstore on a block device, exported by a vhost target (configfs).
LIO=/sys/kernel/config/target; WWPN=naa.5001405000000a01; NEXUS=naa.5001405000000a02
scsi_up() {
  modprobe -a target_core_mod target_core_iblock vhost_scsi || return 1
  mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config || return 1
  mkdir -p $LIO/core/iblock_0/l2disk && echo "udev_path=$1" > $LIO/core/iblock_0/l2disk/control &&
  echo 1 > $LIO/core/iblock_0/l2disk/enable && mkdir -p $LIO/vhost/$WWPN/tpgt_1/lun/lun_0 &&
  ln -s $LIO/core/iblock_0/l2disk $LIO/vhost/$WWPN/tpgt_1/lun/lun_0/l2disk &&
  echo -n $NEXUS > $LIO/vhost/$WWPN/tpgt_1/nexus
}
scsi_down() {   # whatever scsi_up made, in reverse; says what it could not remove
  local t=$LIO/vhost/$WWPN/tpgt_1 d
  rm -f $t/lun/lun_0/l2disk 2>/dev/null
  for d in $t/lun/lun_0 $t $LIO/vhost/$WWPN $LIO/core/iblock_0/l2disk $LIO/core/iblock_0; do
    [ -d $d ] && ! rmdir $d && echo "l2: LIO left behind: $d" >&2
  done; return 0
}
# A PCI device of L1 to vfio-pci (from whatever driver it had), for QEMU's vfio-pci.
vfio_bind() {
  local d=/sys/bus/pci/devices/$1
  [ -e $d ] || { echo "l2: no PCI device $1 in L1" >&2; return 1; }
  modprobe vfio-pci || return 1
  [ "$(basename "$(readlink $d/driver 2>/dev/null)")" = vfio-pci ] && return 0
  [ -e $d/driver ] && echo $1 > $d/driver/unbind
  echo vfio-pci > $d/driver_override && echo $1 > /sys/bus/pci/drivers_probe &&
    [ -e /dev/vfio/$(basename "$(readlink $d/iommu_group)") ]
}
vfio_unbind() {   # back to no driver (L1 binds none by itself), override cleared
  local d=/sys/bus/pci/devices/$1
  [ "$(basename "$(readlink $d/driver 2>/dev/null)")" = vfio-pci ] && echo $1 > $d/driver/unbind
  [ -e $d/driver_override ] && echo > $d/driver_override; return 0
}
hub_nic() {   # L1's hub NIC's name, as the namespace given (or the root one) sees sysfs
  ${1:+ip netns exec $1} sh -c "ls /sys/bus/pci/devices/$HUB_NIC/virtio*/net/" 2>/dev/null | head -1
}
cmd_start() {
  running && die "already running (pid $(qpid))"
  [ -e /dev/kvm ] || die "no /dev/kvm"
  STARTING=1   # from here a failure stops what was started
  mkdir -p $RUN
  local disk=${L2_DISK:-$RUN/disk.img}; [ -n "${L2_DISK:-}" ] || truncate -s 64M $disk
  local drive="-drive file=$disk,if=virtio,format=raw,cache=${L2_CACHE:-writeback},aio=${L2_AIO:-threads}"
  local guest_disk=vda
  if [ "${L2_SCSI:-}" ]; then
    [ -b "$disk" ] || die "L2_SCSI needs L2_DISK=a block device"
    scsi_up "$disk" || die "LIO/vhost-scsi setup failed"
    drive="-device vhost-scsi-pci,wwpn=$WWPN"; guest_disk=sda
  fi
  local vfio= bios="-bios /usr/share/qemu/qboot.rom" ip2=
  if [ "${L2_VFIO_NIC:-}" ]; then
    vfio_bind $E1000E || die "cannot give $E1000E to vfio-pci"
    vfio="$vfio -device vfio-pci,host=$E1000E,rombar=0"; ip2="lab_guest.ip2=$VF_GUEST"
  fi
  if [ "${L2_VFIO_NVME:-}" ]; then
    vfio_bind $NVME || die "cannot give $NVME to vfio-pci"
    vfio="$vfio -device vfio-pci,host=$NVME,rombar=0"; guest_disk=nvme0n1
  fi
  # qboot hangs with a vfio-pci device (BARs left unassigned): SeaBIOS, QEMU's default.
  [ -n "$vfio" ] && bios=
  ip netns add $NS || die "cannot create netns $NS"
  local inns="ip netns exec $NS" tap=$TAP
  if [ "${L2_NET:-}" = bridge ]; then
    inns=; tap=$BR_TAP
    ip netns exec $NS sh -c "ip link set lo up &&
      sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1" &&
    ip link add $UPLINK type veth peer name $PEER && ip link set $PEER netns $NS &&
    ip link add $BRIDGE type bridge && ip tuntap add dev $BR_TAP mode tap &&
    for d in $BRIDGE $UPLINK $BR_TAP; do sysctl -qw net.ipv6.conf.$d.disable_ipv6=1; done &&
    ip link set $UPLINK master $BRIDGE && ip link set $BR_TAP master $BRIDGE &&
    ip link set $BRIDGE up && ip link set $UPLINK up && ip link set $BR_TAP up &&
    ip netns exec $NS sh -c "ip addr add $HOST_IP/24 dev $PEER && ip link set $PEER up &&
      ip neigh add $GUEST_IP lladdr $GUEST_MAC dev $PEER nud permanent" ||
      die "bridge setup failed"
  else
    ip netns exec $NS sh -c "ip link set lo up && ip tuntap add dev $TAP mode tap &&
      sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 &&
      ip addr add $HOST_IP/24 dev $TAP && ip link set $TAP up" || die "netns setup failed"
  fi
  if [ "${L2_VFIO_NIC:-}" ]; then
    modprobe virtio_net || die "no virtio_net in L1"
    local nic; nic=$(hub_nic)
    [ -n "$nic" ] && ip link set "$nic" netns $NS &&
      ip netns exec $NS sh -c "ip addr add $VF_HOST/24 dev $nic && ip link set $nic up" ||
      die "cannot put L1's NIC $HUB_NIC into $NS"
  fi
  local append="console=ttyS0 tsc=reliable no_timer_check lpj=5192264 noxsave clearcpuid=$CLEARCPUID panic=-1"
  append="$append ip=$GUEST_IP::$HOST_IP:255.255.255.0:lab:eth0:off"
  append="$append lab_guest.rounds=${L2_ROUNDS:-0} lab_guest.ios=${L2_IOS:-50}"
  append="$append lab_guest.disk=$guest_disk $ip2"
  append="$append lab_guest.start_delay_ms=${L2_DELAY_MS:-1000} lab_guest.period_ms=${L2_PERIOD_MS:-1000}"
  rm -f $RUN/console.log $RUN/qemu.pid
  setsid $inns qemu-system-x86_64 -name "${L2_NAME:-l2},debug-threads=on" \
    -enable-kvm -cpu qemu64,-cx16 -m 128 -smp 1 $bios \
    -display none -no-reboot -pidfile $RUN/qemu.pid \
    -chardev file,id=ser0,path=$RUN/console.log -serial chardev:ser0 \
    -monitor unix:$RUN/mon.sock,server=on,wait=off -kernel $KERNEL -append "$append" \
    -netdev tap,id=n0,ifname=$tap,script=no,downscript=no,vhost=${L2_VHOST:-on} \
    -device virtio-net-pci,netdev=n0,mac=$GUEST_MAC,romfile= \
    $drive $vfio \
    </dev/null >$RUN/qemu.err 2>&1 &
  local i
  for i in $(seq 1 240); do
    grep -q 'LAB: READY' $RUN/console.log 2>/dev/null && break
    [ $i -gt 20 ] && ! running && { cat $RUN/qemu.err; tail -5 $RUN/console.log; die "qemu exited during boot"; }
    sleep 0.5
  done
  grep -q 'LAB: READY' $RUN/console.log || { tail -5 $RUN/console.log; die "guest not ready in 120 s"; }
  echo "l2: ready, qemu pid $(qpid), vhost=${L2_VHOST:-on}"
}
cmd_ping() { local n=${1:-10} iv=${2:-0.2}; [ "$n" -le 1000 ] || die "count capped at 1000"
  ip netns exec $NS timeout 300 ping -c "$n" -i "$iv" -W 5 -w 290 ${3:-$GUEST_IP}; }
cmd_stop() {
  local p i
  if running; then p=$(qpid)
    monitor quit >/dev/null 2>&1
    for i in $(seq 1 40); do kill -0 $p 2>/dev/null || break; sleep 0.25; done
    kill -0 $p 2>/dev/null && { kill -KILL $p; sleep 1; }
  fi
  rm -f $RUN/qemu.pid $RUN/mon.sock
  scsi_down
  for d in $E1000E $NVME; do vfio_unbind $d; done
  # L1's hub NIC back to the root namespace now (a namespace's devices go back only once it is
  # freed); it keeps no address there
  local nic
  ip netns list | grep -qw $NS && nic=$(hub_nic $NS) && [ -n "$nic" ] &&
    ip -n $NS link set "$nic" netns 1
  for d in $BR_TAP $UPLINK $BRIDGE; do [ -e /sys/class/net/$d ] && ip link del $d; done
  ip netns list | grep -qw $NS && ip netns del $NS; return 0
}
cmd_netem() { [ -e /sys/class/net/$BR_TAP ] || die "netem needs L2_NET=bridge"
  local d
  for d in $BR_TAP $UPLINK; do
    if [ "${1:-}" = off ]; then tc qdisc del dev $d root || die "netem off on $d"
    else tc qdisc replace dev $d root netem delay "${1:?DELAY}" || die "netem on $d"; fi
  done; }
c=${1:-}; shift || true
case $c in start|ping|stop|netem) cmd_$c "$@";; monitor) monitor "$1";; *) sed -n 2,30p "$0"; exit 2;; esac
