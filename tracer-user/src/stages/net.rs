//! Paravirtual network stages (`tracer_common::net`). Receive side: a guest's packet from the
//! uplink through the host stack to its tap, to the backend that takes it (QEMU's thread or a
//! vhost worker, told apart by the thread's name), to the interrupt that thread injects.
//! Transmit side: a guest's packet from its tap through the host stack to the uplink.
//!
//! Transmit side before the tap (vhost-net only): the guest's notify to the worker, and the
//! worker's run to each frame on the tap, from KVM's and vhost's functions (module functions:
//! fentry where it loads, kprobe next); a kernel with neither has no such stages.
//!
//! The other stages use only tracepoints: net, skb and kvm. Their programs key by skb address
//! and device ifindex, which only the argument array has (the classic net records name the
//! device), so each event has tp_btf then raw_tp. Which devices are uplinks and taps the daemon
//! reads from sysfs (`netdevs`).

use tracer_common::{config::Config, stage::StageId};

use super::{
    Event, Family, Path, Stage, all_set, function,
    kvm::{KVM_EXIT, KVM_MSI_SET_IRQ, KVM_USERSPACE_EXIT},
    none, tracepoint_args,
};
use crate::maps::{NET_RX_BATCH, NET_TX_KICK, NET_TX_RUN, NET_WOKEN};

fn skb_dev_needs(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.skb_dev, c.netdev_ifindex],
        "struct sk_buff.dev or net_device.ifindex not in BTF",
    )
}

fn dev_needs(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(&[c.netdev_ifindex], "struct net_device.ifindex not in BTF")
}

// void trace_netif_receive_skb(struct sk_buff *skb): skb->dev is the receiving device (before
// a bridge's rx_handler passes it on).
pub static NETIF_RECEIVE_SKB: Event = tracepoint_args(
    "net",
    "netif_receive_skb",
    "netif_receive_skb",
    skb_dev_needs,
);
// void trace_net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev): before
// the driver's ndo_start_xmit (net_dev_xmit fires after it, when tun may have handed the skb to
// a reader already).
pub static NET_DEV_START_XMIT: Event =
    tracepoint_args("net", "net_dev_start_xmit", "net_dev_start_xmit", dev_needs);
// void trace_consume_skb(struct sk_buff *skb, ...)
pub static CONSUME_SKB: Event = tracepoint_args("skb", "consume_skb", "consume_skb", none);
// void trace_kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
pub static KFREE_SKB: Event = tracepoint_args("skb", "kfree_skb", "kfree_skb", none);

/// Both host stages': the receive starts and the transmit ends them either way, and the frees
/// end packets the host kept or dropped, so their slots do not linger.
const HOST_STACK_EVENTS: &[&Event] = &[
    &NETIF_RECEIVE_SKB,
    &NET_DEV_START_XMIT,
    &CONSUME_SKB,
    &KFREE_SKB,
];

/// A packet in the host stack, from the uplink to the tap: bridging, netfilter, qdiscs.
pub static RX_HOST_STACK: Stage = Stage {
    id: StageId::NetRxHostStack,
    name: "net.rx.host_stack",
    path: Path::Net,
    from: "net:netif_receive_skb on an uplink (a port of a tap's bridge)",
    to: "net:net_dev_start_xmit on the tap",
    labels: &["tap", "uplink"],
    events: HOST_STACK_EVENTS,
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[],
};

/// A packet queued on the tap until the backend takes it: how long the backend left it there.
pub static RX_BACKEND_QUEUE: Stage = Stage {
    id: StageId::NetRxBackendQueue,
    name: "net.rx.backend_queue",
    path: Path::Net,
    from: "net:net_dev_start_xmit on a tap",
    to: "skb:consume_skb of that skb in the backend's thread (kfree_skb: dropped)",
    labels: &["vm", "backend", "tap", "queue"],
    events: &[&NET_DEV_START_XMIT, &CONSUME_SKB, &KFREE_SKB],
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[],
};

/// The backend's work on a packet up to the interrupt that covers it.
pub static RX_BACKEND_TO_IRQ: Stage = Stage {
    id: StageId::NetRxBackendToIrq,
    name: "net.rx.backend_to_irq",
    path: Path::Net,
    from: "skb:consume_skb in the backend's thread",
    to: "the next kvm:kvm_msi_set_irq of that thread, unless it blocked and took another packet \
         first (one interrupt ends the batch it covers)",
    labels: &["vm", "backend", "tap", "queue"],
    events: &[
        &NET_DEV_START_XMIT,
        &CONSUME_SKB,
        &KFREE_SKB,
        &KVM_MSI_SET_IRQ,
    ],
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: None,
    // A batch's thread that blocked delivered it without an interrupt: seen from its count of
    // voluntary context switches.
    needs: |c| all_set(&[c.task_nvcsw], "struct task_struct.nvcsw not in BTF"),
    key_class: None,
    maps: &[&NET_RX_BATCH],
};

/// A guest's packet in the host stack, from its tap to the uplink: bridging, netfilter, the
/// uplink's qdisc.
pub static TX_HOST_STACK: Stage = Stage {
    id: StageId::NetTxHostStack,
    name: "net.tx.host_stack",
    path: Path::Net,
    from: "net:netif_receive_skb on a tap (the backend's write: QEMU's, or vhost's tun_sendmsg)",
    to: "net:net_dev_start_xmit on an uplink (after its qdisc)",
    labels: &["tap", "uplink"],
    events: HOST_STACK_EVENTS,
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: None,
    needs: |_| Ok(()),
    key_class: None,
    maps: &[],
};

// int ioeventfd_write(struct kvm_vcpu *vcpu, struct kvm_io_device *this, gpa_t addr, int len,
// const void *val) (kvm): a guest's write to a notify address with an ioeventfd, in its vCPU
// thread.
pub static IOEVENTFD_WRITE: Event = function("ioeventfd_write", &["ioeventfd_write"], none);
// void vhost_work_queue(struct vhost_dev *dev, struct vhost_work *work) (vhost; Linux 6.5+:
// bool vhost_vq_work_queue(struct vhost_virtqueue *vq, struct vhost_work *work)): the work is
// the second argument of both.
pub static VHOST_WORK_QUEUE: Event = function(
    "vhost_work_queue",
    &["vhost_work_queue", "vhost_vq_work_queue"],
    none,
);
// static void handle_tx_kick(struct vhost_work *work) (vhost_net): the worker on a kicked
// transmit queue.
pub static HANDLE_TX_KICK: Event = function("handle_tx_kick", &["handle_tx_kick"], none);
// static void handle_tx(struct vhost_net *net) (vhost_net): every transmit run, from a kick or
// from the socket's wakeup.
pub static HANDLE_TX: Event = function("handle_tx", &["handle_tx"], none);

fn pid_needs(_: Family, c: &Config) -> Result<(), &'static str> {
    all_set(
        &[c.task_pid, c.task_on_rq],
        "struct task_struct.pid or .on_rq not in BTF",
    )
}

// void trace_sched_waking(struct task_struct *p): a sleeping task woken, in the waker's context.
pub static SCHED_WAKING: Event =
    tracepoint_args("sched", "sched_waking", "sched_waking", pid_needs);
// void trace_sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
// unsigned int prev_state)
pub static SCHED_SWITCH: Event =
    tracepoint_args("sched", "sched_switch", "sched_switch", pid_needs);
// void trace_kvm_pio(unsigned int rw, unsigned int port, unsigned int size, unsigned int count,
// const void *data) (kvm): a guest's port access, before the bus (and an ioeventfd) takes it.
pub static KVM_PIO: Event = tracepoint_args("kvm", "kvm_pio", "kvm_pio", none);
// void trace_kvm_mmio(int type, int len, u64 gpa, u64 *val) (kvm): an emulated MMIO access,
// a write traced before the bus takes it.
pub static KVM_MMIO: Event = tracepoint_args("kvm", "kvm_mmio", "kvm_mmio", none);

/// A network backend thread woken, waiting for a CPU: what a busy host adds to every kick and
/// every packet the backend is woken for.
pub static BACKEND_WAKEUP: Stage = Stage {
    id: StageId::SchedBackendWakeup,
    name: "sched.backend_wakeup",
    path: Path::Net,
    from: "sched:sched_waking of a backend thread (one that took a tap's packets: QEMU's, a \
           vhost worker)",
    to: "sched:sched_switch into it",
    labels: &["vm", "backend", "tap", "queue"],
    // The tap's receives end the runs its switch-ins start (net.tx.backend_to_wire).
    events: &[
        &NET_DEV_START_XMIT,
        &CONSUME_SKB,
        &KFREE_SKB,
        &SCHED_WAKING,
        &SCHED_SWITCH,
        &NETIF_RECEIVE_SKB,
    ],
    // kvm_exit: VMX's fast MMIO notify (a modern virtio-pci's on Intel) fires no kvm_mmio.
    optional: &[&KVM_PIO, &KVM_MMIO, &KVM_USERSPACE_EXIT, &KVM_EXIT],
    optional_adds: "starts net.tx.kick of a backend no function probe sees, QEMU's",
    opt_in: Some("a program on every wakeup and context switch of the host"),
    without: None,
    needs: |c| {
        all_set(
            &[c.task_pid, c.task_nvcsw],
            "struct task_struct.pid or .nvcsw not in BTF",
        )
    },
    key_class: None,
    maps: &[&NET_RX_BATCH, &NET_WOKEN, &NET_TX_RUN],
};

/// A guest's notify of a transmit queue to the vhost worker starting on it.
pub static TX_KICK: Stage = Stage {
    id: StageId::NetTxKick,
    name: "net.tx.kick",
    path: Path::Net,
    from: "ioeventfd_write in the vCPU thread (the guest's notify), tied to the queue's work by \
           vhost_work_queue in the same call (QEMU's backend: with sched.backend_wakeup on, the \
           notify exit, kvm:kvm_pio or kvm:kvm_mmio)",
    to: "handle_tx_kick of that work in the vhost worker (QEMU's backend: sched:sched_switch \
         into the backend thread the notify woke)",
    labels: &["vm", "backend", "queue"],
    events: &[&IOEVENTFD_WRITE, &VHOST_WORK_QUEUE, &HANDLE_TX_KICK],
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: Some(
        "kicks of QEMU's backend (and vhost's) from tracepoints with --stages \
         +sched.backend_wakeup: matched by thread rather than by queue, only kicks that wake \
         their backend, recorded when its run transmits",
    ),
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&NET_TX_KICK],
};

/// The vhost worker's transmit run to each of its frames entering the host stack on the tap.
pub static TX_BACKEND_TO_WIRE: Stage = Stage {
    id: StageId::NetTxBackendToWire,
    name: "net.tx.backend_to_wire",
    path: Path::Net,
    from: "handle_tx in the vhost worker (the run's start)",
    to: "net:netif_receive_skb on the tap in that thread, for each frame of the run",
    labels: &["vm", "backend", "tap", "queue"],
    events: &[&HANDLE_TX, &NETIF_RECEIVE_SKB],
    optional: &[],
    optional_adds: "",
    opt_in: None,
    without: Some(
        "runs of QEMU's backend (and vhost's) from tracepoints with --stages \
         +sched.backend_wakeup: from the backend thread's switch-in after a wakeup, not its \
         transmit handler",
    ),
    needs: |_| Ok(()),
    key_class: None,
    maps: &[&NET_TX_RUN],
};
