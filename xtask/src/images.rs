//! What the distro-kernel VM boots, in a cache outside the clone (`IOPATH_VM_CACHE`, default
//! `/var/cache/iopath-vm`), each item under a name made from the hash of its inputs, so a second
//! run finds them in well under a second and a changed input makes a new item:
//! - `kernel-HASH/`: Debian's kernel package (the one `linux-image-amd64` depends on) unpacked,
//!   with its modules' index; HASH is the package's SHA256 from the apt index.
//! - `initramfs-HASH.cpio.gz`: busybox, the modules that mount the root, `xtask/vm/init`.
//! - `l2-HASH/vmlinux`: the nested guests' kernel (the lab kernel with the e1000e, NVMe and
//!   virtio-scsi drivers), built from Debian's linux-source with the config, patch and guest
//!   driver in `xtask/vm/l2/` (4 to 6 minutes on 2 cores); `../shared/lab/vmlinux-lab-vfio.xz`
//!   instead where its sources are the same as ours.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{root, run, setup::output};

pub struct Images {
    pub kernel: PathBuf,
    /// `lib/modules/KVER` of that kernel.
    pub modules: PathBuf,
    pub kver: String,
    pub initramfs: PathBuf,
    pub l2_kernel: PathBuf,
}

/// Modules the initramfs loads, in order (each needs the ones before).
const INITRAMFS_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
];

pub fn cache() -> PathBuf {
    std::env::var_os("IOPATH_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/iopath-vm"))
}

/// The cache must be visible in L1 at its own path: L1 mounts its scratch disk on /var/tmp.
pub fn check_cache() -> anyhow::Result<()> {
    let c = cache();
    if !c.is_absolute() || c.starts_with("/var/tmp") {
        bail!(
            "IOPATH_VM_CACHE={}: an absolute path outside /var/tmp is needed (L1 mounts its own disk there)",
            c.display()
        );
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("vm: {what}");
}

/// First 16 hex digits of the SHA256 of these bytes, one after the other.
fn hash(parts: &[&[u8]]) -> anyhow::Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("sha256sum")?;
    let mut stdin = child.stdin.take().context("sha256sum's stdin")?;
    for p in parts {
        stdin.write_all(p)?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "sha256sum failed");
    Ok(String::from_utf8_lossy(&out.stdout)[..16].to_string())
}

/// The same of a file's content, read by sha256sum itself.
fn file_hash(path: &Path) -> anyhow::Result<String> {
    Ok(output(Command::new("sha256sum").arg(path))?[..16].to_string())
}

/// The kernel release an unpacked kernel package holds modules for.
fn kver_of(unpacked: &Path) -> anyhow::Result<String> {
    fs::read_dir(unpacked.join("lib/modules"))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules")
}

fn tempdir(what: &str) -> anyhow::Result<PathBuf> {
    let d = cache().join(format!("tmp-{what}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}

pub fn prepare() -> anyhow::Result<Images> {
    check_cache()?;
    let c = cache();
    crate::vm::remove_stale_runs(&c);
    fs::create_dir_all(&c).with_context(|| format!("cannot create {}", c.display()))?;
    let kernel_dir = kernel()?;
    let kver = kver_of(&kernel_dir)?;
    let modules = kernel_dir.join("lib/modules").join(&kver);
    let initramfs = initramfs(&modules, &kver)?;
    Ok(Images {
        kernel: kernel_dir.join(format!("boot/vmlinuz-{kver}")),
        modules,
        kver,
        initramfs,
        l2_kernel: l2_kernel()?,
    })
}

/// The package `linux-image-amd64` depends on and the SHA256 the apt index gives for it (the
/// index is updated by `kernel`, once, when this or the download fails).
fn kernel_package() -> anyhow::Result<(String, String)> {
    let resolve = || -> Option<(String, String)> {
        let deps = output(Command::new("apt-cache").args(["depends", "linux-image-amd64"])).ok()?;
        let pkg = deps
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .map(|p| format!("linux-image-{p}"))?;
        let show =
            output(Command::new("apt-cache").args(["show", "--no-all-versions", &pkg])).ok()?;
        let sha = show
            .lines()
            .find_map(|l| l.strip_prefix("SHA256: "))?
            .to_string();
        Some((pkg, sha))
    };
    resolve().context("apt knows no linux-image-amd64 (is a Debian mirror configured?)")
}

fn kernel() -> anyhow::Result<PathBuf> {
    match kernel_from_index() {
        Ok(k) => Ok(k),
        Err(e) => {
            // No index yet, or one older than the mirror that names a file it no longer has:
            // once more after an update, which may name another package or revision.
            eprintln!("vm: {e:#}; updating the apt index and trying again");
            run(Command::new("apt-get").args(["update", "-q"]))?;
            kernel_from_index()
        }
    }
}

fn kernel_from_index() -> anyhow::Result<PathBuf> {
    let (pkg, sha) = match kernel_package() {
        Ok(p) => p,
        Err(e) => {
            // Offline: any kernel unpacked before will do.
            let any = fs::read_dir(cache())?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("kernel-"))
                });
            return any.ok_or(e);
        }
    };
    let dir = cache().join(format!("kernel-{}", &sha[..16]));
    if dir.join("lib/modules").is_dir() {
        return Ok(dir);
    }
    step(&format!("downloading and unpacking {pkg} (about 70 MB)"));
    let tmp = tempdir("kernel")?;
    // apt downloads as its own user when it can write there
    run(Command::new("chmod").arg("777").arg(&tmp))?;
    run(Command::new("apt-get")
        .args(["download", "-q", &pkg])
        .current_dir(&tmp))?;
    let deb = fs::read_dir(&tmp)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let got = output(Command::new("sha256sum").arg(&deb))?;
    if !got.starts_with(&sha) {
        bail!("{} does not have the SHA256 apt announced", deb.display());
    }
    let unpacked = tmp.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let kver = kver_of(&unpacked)?;
    run(Command::new("depmod").arg("-b").arg(&unpacked).arg(&kver))?;
    fs::rename(&unpacked, &dir)?;
    fs::remove_dir_all(&tmp)?;
    Ok(dir)
}

fn initramfs(modules: &Path, kver: &str) -> anyhow::Result<PathBuf> {
    let init = fs::read(root().join("xtask/vm/init"))?;
    let busybox = fs::read("/bin/busybox").context("busybox-static is not installed")?;
    let list = INITRAMFS_MODULES.join("\n");
    let key = hash(&[&init, &busybox, list.as_bytes(), kver.as_bytes()])?;
    let out = cache().join(format!("initramfs-{key}.cpio.gz"));
    if out.exists() {
        return Ok(out);
    }
    step("building the initramfs");
    let w = tempdir("initramfs")?;
    for d in ["bin", "mod", "proc", "sys", "dev", "newroot"] {
        fs::create_dir_all(w.join(d))?;
    }
    fs::write(w.join("bin/busybox"), &busybox)?;
    let mut names = Vec::new();
    for m in INITRAMFS_MODULES {
        let name = Path::new(m)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let src = modules.join(format!("kernel/{m}.ko"));
        fs::copy(&src, w.join(format!("mod/{name}.ko")))
            .with_context(|| format!("{} is not in the kernel package", src.display()))?;
        names.push(name);
    }
    fs::write(w.join("modules"), names.join("\n") + "\n")?;
    fs::write(w.join("init"), &init)?;
    run(Command::new("chmod")
        .args(["755", "init", "bin/busybox"])
        .current_dir(&w))?;
    run(Command::new("mknod")
        .args(["dev/console", "c", "5", "1"])
        .current_dir(&w))?;
    run(Command::new("mknod")
        .args(["dev/null", "c", "1", "3"])
        .current_dir(&w))?;
    let tmp_out = out.with_extension("tmp");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            tmp_out.display()
        ))
        .current_dir(&w))?;
    fs::rename(&tmp_out, &out)?;
    fs::remove_dir_all(&w)?;
    Ok(out)
}

/// The prebuilt lab kernel of the team's shared folder, when this machine has it, it was built
/// from the same config and guest driver as ours (`../shared/lab/src`), and
/// `IOPATH_L2_FROM_SOURCE` is not set (which builds it as a machine without it would). Ours adds
/// virtio-scsi and the guest driver's `disk=`, so it is built here (once, cached).
fn shared_l2() -> Option<PathBuf> {
    let p = root().join("../shared/lab/vmlinux-lab-vfio.xz");
    let same = [
        "config-lab",
        "config-lab-vfio.delta",
        "guest-kernel.patch",
        "lab_guest.c",
    ]
    .iter()
    .all(|f| {
        let ours = fs::read(root().join("xtask/vm/l2").join(f)).ok();
        ours.is_some() && ours == fs::read(root().join("../shared/lab/src").join(f)).ok()
    });
    (same && p.exists() && std::env::var_os("IOPATH_L2_FROM_SOURCE").is_none()).then_some(p)
}

fn l2_kernel() -> anyhow::Result<PathBuf> {
    if let Some(xz) = shared_l2() {
        let key = file_hash(&xz)?;
        let dir = cache().join(format!("l2-{key}"));
        let out = dir.join("vmlinux");
        if !out.exists() {
            step(&format!("unpacking {}", xz.display()));
            fs::create_dir_all(&dir)?;
            let tmp = dir.join("vmlinux.tmp");
            run(Command::new("sh").arg("-c").arg(format!(
                "xz -dc '{}' > '{}'",
                xz.display(),
                tmp.display()
            )))?;
            fs::rename(&tmp, &out)?;
        }
        return Ok(out);
    }
    build_l2()
}

/// The lab kernel from Debian's linux-source: config-lab + the VFIO delta, the lab patch and
/// its guest driver (xtask/vm/l2).
fn build_l2() -> anyhow::Result<PathBuf> {
    let src = root().join("xtask/vm/l2");
    let inputs: Vec<Vec<u8>> = [
        "config-lab",
        "config-lab-vfio.delta",
        "guest-kernel.patch",
        "lab_guest.c",
    ]
    .iter()
    .map(|f| fs::read(src.join(f)))
    .collect::<Result<_, _>>()?;
    crate::setup::install(&[
        "linux-source-6.1",
        "flex",
        "bison",
        "libelf-dev",
        "gcc",
        "make",
        "bc",
        "xz-utils",
        "patch",
    ])?;
    let tarball = fs::read_dir("/usr/src")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("linux-source-6.1") && n.ends_with(".tar.xz")
            })
        })
        .context("linux-source-6.1 installed no tarball in /usr/src")?;
    let version =
        output(Command::new("dpkg-query").args(["-W", "-f=${Version}", "linux-source-6.1"]))?;
    let parts: Vec<&[u8]> = inputs
        .iter()
        .map(Vec::as_slice)
        .chain([version.as_bytes()])
        .collect();
    let dir = cache().join(format!("l2-{}", hash(&parts)?));
    let out = dir.join("vmlinux");
    if out.exists() {
        return Ok(out);
    }
    step("building the nested guests' kernel from linux-source-6.1 (about 6 minutes)");
    let w = tempdir("l2")?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&w))?;
    let ks = fs::read_dir(&w)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("empty linux-source tarball")?;
    run(Command::new("patch")
        .args(["-p1", "-i"])
        .arg(src.join("guest-kernel.patch"))
        .current_dir(&ks))?;
    fs::copy(
        src.join("lab_guest.c"),
        ks.join("drivers/block/lab_guest.c"),
    )?;
    fs::write(
        ks.join(".config"),
        [&inputs[0][..], &inputs[1][..]].concat(),
    )?;
    run(Command::new("make").arg("olddefconfig").current_dir(&ks))?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log = w.join("build.log");
    let status = Command::new("make")
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .current_dir(&ks)
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::create(w.join("build.err"))?)
        .status()?;
    if !status.success() {
        bail!(
            "building the L2 kernel failed (log in {}): {}",
            w.display(),
            fs::read_to_string(w.join("build.err"))
                .unwrap_or_default()
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    fs::create_dir_all(&dir)?;
    fs::rename(ks.join("vmlinux"), &out)?;
    fs::remove_dir_all(&w)?;
    Ok(out)
}
