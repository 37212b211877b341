//! iopath: eBPF host I/O latency tracer for KVM hosts. The binary (`main.rs`) is the command
//! line; this library is everything else, so the end-to-end tests can load and drive the same
//! programs in-process.

pub mod attach;
pub mod backend;
pub mod btf;
pub mod capture;
pub mod compare;
pub mod export;
pub mod gc;
pub mod hist;
pub mod html;
pub mod labels;
pub mod learn;
pub mod maps;
pub mod netdevs;
pub mod offsets;
pub mod posted;
pub mod privs;
pub mod protobuf;
pub mod report;
pub mod serve;
pub mod session;
pub mod stages;
pub mod sys;
pub mod timeline;
pub mod top;
pub mod tracefs;
pub mod tui;
pub mod vfio_irqs;
pub mod waterfall;
pub mod webconfig;
