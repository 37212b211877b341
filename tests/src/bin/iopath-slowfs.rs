//! A FUSE filesystem of one file, `disk`, whose every read takes a known delay: under a loop
//! device it is a disk with a known service time (what null_blk's `completion_nsec` gives where
//! null_blk is not built). It speaks the FUSE protocol on /dev/fuse itself (no libfuse), one
//! request at a time, and answers what a loop device and `losetup` ask: init, lookup, getattr,
//! open (with FOPEN_DIRECT_IO, so that no read is served from the page cache), read, write,
//! flush, fsync, release; anything else gets ENOSYS.
//!
//! A read is answered READ_DELAY_US after the filesystem took it off /dev/fuse, an fsync
//! FSYNC_DELAY_US after (default 0): the loop driver turns a flush of its device into an fsync
//! of its file, so that is a disk whose cache flush takes a known time.
//!
//! `iopath-slowfs MOUNTPOINT SIZE_MIB READ_DELAY_US [FSYNC_DELAY_US]` mounts, prints `ready`, and serves until
//! the filesystem is unmounted (then exits 0) or it is killed.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io::{Read, Write},
    os::fd::AsRawFd,
    thread::sleep,
    time::{Duration, Instant},
};

/// Sleeps to `deadline` and spins its last 200 µs: a plain sleep overshoots by tens of µs,
/// which would add to the device's known delay.
fn wait_until(deadline: Instant) {
    let spin = Duration::from_micros(200);
    if let Some(left) = deadline.checked_duration_since(Instant::now())
        && left > spin
    {
        sleep(left - spin);
    }
    while Instant::now() < deadline {
        std::hint::spin_loop();
    }
}

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;
const FOPEN_DIRECT_IO: u32 = 1;
const ROOT: u64 = 1;
const DISK: u64 = 2;
/// fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding.
const IN_HEADER: usize = 40;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// struct fuse_attr (88 bytes).
fn attr(ino: u64, size: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(88);
    a.extend(ino.to_le_bytes());
    a.extend(size.to_le_bytes());
    a.extend(size.div_ceil(512).to_le_bytes()); // blocks
    a.extend([0u8; 24]); // atime, mtime, ctime
    a.extend([0u8; 12]); // their nsec
    let mode: u32 = if ino == ROOT { 0o040755 } else { 0o100644 };
    a.extend(mode.to_le_bytes());
    a.extend(1u32.to_le_bytes()); // nlink
    a.extend([0u8; 12]); // uid, gid, rdev
    a.extend(4096u32.to_le_bytes()); // blksize
    a.extend(0u32.to_le_bytes()); // flags
    a
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(4..=5).contains(&args.len()) {
        eprintln!("usage: iopath-slowfs MOUNTPOINT SIZE_MIB READ_DELAY_US [FSYNC_DELAY_US]");
        std::process::exit(2);
    }
    let size: u64 = args[2].parse::<u64>().expect("SIZE_MIB") << 20;
    let delay = Duration::from_micros(args[3].parse().expect("READ_DELAY_US"));
    let fsync_delay = Duration::from_micros(
        args.get(4)
            .map_or(0, |a| a.parse().expect("FSYNC_DELAY_US")),
    );
    let mut data = vec![0u8; size as usize];
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap_or_else(|e| panic!("/dev/fuse: {e}"));
    let opts = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        dev.as_raw_fd()
    ))
    .unwrap();
    let target = CString::new(args[1].as_str()).unwrap();
    let (src, fstype) = (c"iopath-slowfs", c"fuse.iopath-slowfs");
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if r != 0 {
        eprintln!(
            "iopath-slowfs: mount {}: {}",
            args[1],
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    println!("ready");
    let mut buf = vec![0u8; (1 << 20) + 4096];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            // Unmounted: the connection is gone.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => panic!("read /dev/fuse: {e}"),
        };
        let arrived = Instant::now();
        let req = &buf[..n];
        let (opcode, unique, node) = (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16));
        let body = &req[IN_HEADER..];
        let reply: Result<Vec<u8>, i32> = match opcode {
            FUSE_INIT => {
                // fuse_init_out of 7.31: major, minor, max_readahead, flags, max_background,
                // congestion_threshold, max_write, time_gran, max_pages, map_alignment,
                // flags2, unused[7].
                let mut o = Vec::new();
                o.extend(7u32.to_le_bytes());
                o.extend(31u32.to_le_bytes());
                o.extend(u32_at(body, 8).to_le_bytes());
                o.extend(0u32.to_le_bytes());
                o.extend(16u16.to_le_bytes());
                o.extend(12u16.to_le_bytes());
                o.extend((128u32 << 10).to_le_bytes());
                o.extend(1u32.to_le_bytes());
                o.extend(32u16.to_le_bytes());
                o.extend(0u16.to_le_bytes());
                o.extend([0u8; 32]);
                Ok(o)
            }
            FUSE_LOOKUP => {
                let name = body.split(|&c| c == 0).next().unwrap_or_default();
                if node == ROOT && name == b"disk" {
                    let mut o = Vec::new();
                    o.extend(DISK.to_le_bytes()); // nodeid
                    o.extend(0u64.to_le_bytes()); // generation
                    o.extend(3600u64.to_le_bytes()); // entry_valid
                    o.extend(3600u64.to_le_bytes()); // attr_valid
                    o.extend([0u8; 8]);
                    o.extend(attr(DISK, size));
                    Ok(o)
                } else {
                    Err(libc::ENOENT)
                }
            }
            FUSE_GETATTR => {
                let mut o = Vec::new();
                o.extend(3600u64.to_le_bytes());
                o.extend([0u8; 8]);
                o.extend(attr(node, if node == DISK { size } else { 0 }));
                Ok(o)
            }
            FUSE_OPEN => {
                let mut o = Vec::new();
                o.extend(0u64.to_le_bytes());
                o.extend(FOPEN_DIRECT_IO.to_le_bytes());
                o.extend(0u32.to_le_bytes());
                Ok(o)
            }
            FUSE_READ => {
                // fuse_read_in: fh, offset, size, ...
                let (off, len) = (u64_at(body, 8), u32_at(body, 16) as u64);
                let end = (off + len).min(size);
                wait_until(arrived + delay);
                Ok(data[off.min(end) as usize..end as usize].to_vec())
            }
            FUSE_WRITE => {
                // fuse_write_in (40 bytes): fh, offset, size, ...; then the data.
                let (off, len) = (u64_at(body, 8), u32_at(body, 16) as u64);
                let end = (off + len).min(size);
                let n = end.saturating_sub(off);
                data[off as usize..end as usize].copy_from_slice(&body[40..40 + n as usize]);
                let mut o = Vec::new();
                o.extend((n as u32).to_le_bytes());
                o.extend(0u32.to_le_bytes());
                Ok(o)
            }
            FUSE_FSYNC => {
                wait_until(arrived + fsync_delay);
                Ok(Vec::new())
            }
            FUSE_FLUSH | FUSE_RELEASE => Ok(Vec::new()),
            // No reply to these.
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => continue,
            FUSE_DESTROY => return,
            _ => Err(libc::ENOSYS),
        };
        let (error, payload) = match reply {
            Ok(p) => (0i32, p),
            Err(e) => (-e, Vec::new()),
        };
        let mut out = Vec::with_capacity(16 + payload.len());
        out.extend(((16 + payload.len()) as u32).to_le_bytes());
        out.extend(error.to_le_bytes());
        out.extend(unique.to_le_bytes());
        out.extend(payload);
        // A request interrupted meanwhile: ENOENT, nothing to do.
        let _ = dev.write_all(&out);
    }
}
