//! A small reader of kernel BTF (/sys/kernel/btf/*): enough to tell whether a function or a
//! BTF-enabled tracepoint exists, and where (vmlinux or which module), and to find struct
//! member offsets and sizes, so attach decisions and field reads follow the running kernel
//! rather than its version number.
//!
//! A module's BTF is split BTF: its type ids continue vmlinux's (the first is vmlinux's type
//! count), its string offsets continue vmlinux's string section, and its types refer to
//! vmlinux's freely. Each module is read on top of vmlinux alone, never on top of another
//! module: two modules' type ids overlap.

use std::{collections::HashMap, fs, path::Path};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BtfError {
    #[error("cannot read BTF at {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed BTF in {0}")]
    Malformed(String),
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    /// Size for structs, unions, ints; referenced type for modifiers, typedefs, pointers.
    size_or_type: u32,
    members: Vec<Member>,
}

/// Where a name was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Vmlinux,
    /// A kernel module's split BTF (`/sys/kernel/btf/<module>`).
    Module(String),
}

/// The types of one BTF blob. For a module, `first_id` is vmlinux's type count and its
/// `types[0]` is type `first_id`.
#[derive(Debug, Default)]
struct Blob {
    first_id: u32,
    types: Vec<Type>,
    by_name: HashMap<(u32, String), u32>,
}

/// vmlinux's BTF and the modules' split BTF on top of it.
#[derive(Debug)]
pub struct KernelBtf {
    base: Blob,
    modules: Vec<(String, Blob)>,
    /// vmlinux's string section: a module's string offsets below its length point into it.
    base_strs: Vec<u8>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn read(path: &Path) -> Result<Vec<u8>, BtfError> {
    fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A NUL-terminated string at `off` in `strs`.
fn cstr(strs: &[u8], off: usize) -> Option<String> {
    let s = strs.get(off..)?.split(|&c| c == 0).next()?;
    Some(String::from_utf8_lossy(s).into_owned())
}

/// Parses one blob. `base` is vmlinux's (first type id, string section) for a module, None for
/// vmlinux itself. Returns the blob and its string section.
fn parse(b: &[u8], base: Option<(u32, &[u8])>) -> Option<(Blob, Vec<u8>)> {
    if b.get(0..2)? != [0x9f, 0xeb] {
        return None; // only little-endian hosts are supported
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
    let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
    let types = b.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
    let strs = b.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let (first_id, base_strs) = base.unwrap_or((1, &[]));
    // A split blob's string offsets start after the base's string section.
    let name = |off: u32| -> String {
        let off = off as usize;
        if off < base_strs.len() {
            cstr(base_strs, off)
        } else {
            cstr(strs, off - base_strs.len())
        }
        .unwrap_or_default()
    };
    let mut blob = Blob {
        first_id,
        ..Default::default()
    };
    let mut p = 0;
    while p + 12 <= types.len() {
        let name_off = u32_at(types, p)?;
        let info = u32_at(types, p + 4)?;
        let size_or_type = u32_at(types, p + 8)?;
        let (vlen, kind, kflag) = (info & 0xffff, (info >> 24) & 0x1f, info >> 31);
        p += 12;
        let mut members = Vec::new();
        let extra = match kind {
            KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
            KIND_ARRAY => 12,
            KIND_STRUCT | KIND_UNION => {
                for i in 0..vlen as usize {
                    let m = p + i * 12;
                    let off = u32_at(types, m + 8)?;
                    members.push(Member {
                        name: name(u32_at(types, m)?),
                        type_id: u32_at(types, m + 4)?,
                        bit_offset: if kflag == 1 { off & 0xff_ffff } else { off },
                    });
                }
                vlen as usize * 12
            }
            KIND_ENUM => {
                // Enumerators kept as members: the value in `type_id`.
                for i in 0..vlen as usize {
                    let m = p + i * 8;
                    members.push(Member {
                        name: name(u32_at(types, m)?),
                        type_id: u32_at(types, m + 4)?,
                        bit_offset: 0,
                    });
                }
                vlen as usize * 8
            }
            KIND_FUNC_PROTO => vlen as usize * 8,
            KIND_DATASEC | KIND_ENUM64 => vlen as usize * 12,
            _ => 0,
        };
        p += extra;
        let id = first_id + blob.types.len() as u32;
        let n = name(name_off);
        if !n.is_empty() {
            blob.by_name.entry((kind, n)).or_insert(id);
        }
        blob.types.push(Type {
            kind,
            size_or_type,
            members,
        });
    }
    Some((blob, strs.to_vec()))
}

impl KernelBtf {
    /// vmlinux BTF of the running kernel, plus the split BTF of every module that has one (on
    /// most hosts kvm, vhost and vfio are modules; on the build machine they are built in).
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let dir = Path::new("/sys/kernel/btf");
        let mut btf = Self::from_file(&dir.join("vmlinux"))?;
        let mut modules: Vec<_> = fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        modules.sort();
        for path in modules {
            if path.file_name().is_some_and(|n| n != "vmlinux") {
                // A module whose BTF cannot be read only loses its tp_btf/fentry candidates.
                if let Err(e) = btf.add_module(&path) {
                    log::warn!("{e}");
                }
            }
        }
        Ok(btf)
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = read(path)?;
        let (base, base_strs) =
            parse(&data, None).ok_or_else(|| BtfError::Malformed(path.display().to_string()))?;
        Ok(KernelBtf {
            base,
            modules: Vec::new(),
            base_strs,
        })
    }

    /// Adds a kernel module's split BTF, named after its file.
    pub fn add_module(&mut self, path: &Path) -> Result<(), BtfError> {
        let data = read(path)?;
        let first = self.base.first_id + self.base.types.len() as u32;
        let (blob, _) = parse(&data, Some((first, &self.base_strs)))
            .ok_or_else(|| BtfError::Malformed(path.display().to_string()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.modules.push((name, blob));
        Ok(())
    }

    /// Type `id` as seen from `blob` (a module sees vmlinux's types below its own).
    fn type_in<'a>(&'a self, blob: &'a Blob, id: u32) -> Option<&'a Type> {
        if id == 0 {
            return None; // void
        }
        let from = if id >= blob.first_id {
            blob
        } else {
            &self.base
        };
        from.types.get((id - from.first_id) as usize)
    }

    /// Each blob that names a `kind` called `name`, vmlinux first, with its type id.
    fn find(&self, kind: u32, name: &str) -> impl Iterator<Item = (&Blob, Origin, u32)> {
        let key = (kind, name.to_string());
        let base = self
            .base
            .by_name
            .get(&key)
            .map(|&id| (&self.base, Origin::Vmlinux, id));
        let mods = self.modules.iter().filter_map(move |(m, b)| {
            b.by_name
                .get(&(kind, name.to_string()))
                .map(|&id| (b, Origin::Module(m.clone()), id))
        });
        base.into_iter().chain(mods)
    }

    /// Where a kernel function with this name is (a candidate for fentry/kprobe).
    pub fn func(&self, name: &str) -> Option<Origin> {
        self.find(KIND_FUNC, name).next().map(|(_, o, _)| o)
    }

    /// Where the BTF-enabled tracepoint `name` is (the kernel's `btf_trace_<name>` typedef).
    pub fn btf_tracepoint(&self, name: &str) -> Option<Origin> {
        self.find(KIND_TYPEDEF, &format!("btf_trace_{name}"))
            .next()
            .map(|(_, o, _)| o)
    }

    /// Skips typedefs and modifiers.
    fn resolve<'a>(&'a self, blob: &'a Blob, mut id: u32) -> Option<&'a Type> {
        for _ in 0..32 {
            let t = self.type_in(blob, id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn member_bits(&self, blob: &Blob, t: &Type, member: &str) -> Option<u32> {
        for m in &t.members {
            if m.name == member {
                return Some(m.bit_offset);
            }
            if m.name.is_empty() {
                // anonymous struct or union: its members belong to the outer struct
                let inner = self.resolve(blob, m.type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(off) = self.member_bits(blob, inner, member)
                {
                    return Some(m.bit_offset + off);
                }
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name` (anonymous members searched through), in the
    /// first blob that defines the struct with that member.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        self.find(KIND_STRUCT, name).find_map(|(blob, _, id)| {
            let t = self.type_in(blob, id)?;
            let bits = self.member_bits(blob, t, member)?;
            (bits % 8 == 0).then_some(bits / 8)
        })
    }

    /// Value of enumerator `value` of `enum name`.
    pub fn enum_value(&self, name: &str, value: &str) -> Option<u32> {
        self.find(KIND_ENUM, name).find_map(|(blob, _, id)| {
            let t = self.type_in(blob, id)?;
            t.members
                .iter()
                .find(|m| m.name == value)
                .map(|m| m.type_id)
        })
    }

    /// Value of enumerator `value` in any enum of vmlinux, named or anonymous (an enumerator's
    /// name is unique in C): for constants that moved between enums or into an unnamed one.
    pub fn enumerator(&self, value: &str) -> Option<u32> {
        self.base
            .types
            .iter()
            .filter(|t| t.kind == KIND_ENUM)
            .find_map(|t| t.members.iter().find(|m| m.name == value))
            .map(|m| m.type_id)
    }

    /// Size in bytes of `struct name` or `union name`.
    pub fn size_of(&self, name: &str) -> Option<u32> {
        [KIND_STRUCT, KIND_UNION].into_iter().find_map(|kind| {
            self.find(kind, name)
                .find_map(|(blob, _, id)| self.type_in(blob, id).map(|t| t.size_or_type))
        })
    }

    /// Modules read, by name.
    pub fn modules(&self) -> impl Iterator<Item = &str> {
        self.modules.iter().map(|(m, _)| m.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/btf")
    }

    /// Builds a tiny BTF blob: struct s { int a; union { long b; }; }, a func, a typedef,
    /// enum e { X = 3 } and enum { Y = 7 }.
    fn blob() -> Vec<u8> {
        let strs = b"\0int\0s\0a\0b\0f\0btf_trace_x\0long\0e\0X\0Y\0".to_vec();
        let off = |s: &str| {
            let pos = strs
                .windows(s.len() + 1)
                .position(|w| &w[..s.len()] == s.as_bytes() && w[s.len()] == 0);
            pos.unwrap() as u32
        };
        let mut t = Vec::new();
        let mut push = |v: &[u32]| v.iter().for_each(|x| t.extend_from_slice(&x.to_le_bytes()));
        push(&[off("int"), KIND_INT << 24, 4, 32]); // 1: int
        push(&[off("long"), KIND_INT << 24, 8, 64]); // 2: long
        push(&[0, (KIND_UNION << 24) | 1, 8, off("b"), 2, 0]); // 3: union { long b }
        push(&[
            off("s"),
            (KIND_STRUCT << 24) | 2,
            16,
            off("a"),
            1,
            0,
            0,
            3,
            64,
        ]); // 4: struct s
        push(&[off("f"), KIND_FUNC << 24, 0]); // 5: func f
        push(&[off("btf_trace_x"), KIND_TYPEDEF << 24, 1]); // 6
        push(&[off("e"), (KIND_ENUM << 24) | 1, 4, off("X"), 3]); // 7: enum e
        push(&[0, (KIND_ENUM << 24) | 1, 4, off("Y"), 7]); // 8: an anonymous enum
        let mut b = vec![0x9f, 0xeb, 1, 0];
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strs.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend(t);
        b.extend(strs);
        b
    }

    #[test]
    fn reads_members_funcs_and_tracepoints() {
        let (base, base_strs) = parse(&blob(), None).unwrap();
        let btf = KernelBtf {
            base,
            modules: Vec::new(),
            base_strs,
        };
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(
            btf.member_offset("s", "b"),
            Some(8),
            "through the anonymous union"
        );
        assert_eq!(btf.member_offset("s", "c"), None);
        assert_eq!(btf.size_of("s"), Some(16));
        assert_eq!(btf.func("f"), Some(Origin::Vmlinux));
        assert_eq!(btf.func("g"), None);
        assert_eq!(btf.btf_tracepoint("x"), Some(Origin::Vmlinux));
        assert_eq!(btf.btf_tracepoint("y"), None);
        assert_eq!(btf.enum_value("e", "X"), Some(3));
        assert_eq!(btf.enum_value("e", "Y"), None, "Y is not e's");
        assert_eq!(btf.enumerator("Y"), Some(7), "in the anonymous enum");
        assert_eq!(btf.enumerator("X"), Some(3));
        assert_eq!(btf.enumerator("Z"), None);
    }

    /// Two modules' split BTF on one base (tests/fixtures/btf, made by pahole; see its README):
    /// ids continue the base's per module, names point into the base's strings, members are
    /// of base types.
    #[test]
    fn split_btf_of_two_modules() {
        let dir = fixtures();
        let mut btf = KernelBtf::from_file(&dir.join("base.btf")).unwrap();
        btf.add_module(&dir.join("kvmlike.btf")).unwrap();
        btf.add_module(&dir.join("vhostlike.btf")).unwrap();
        assert_eq!(
            btf.modules().collect::<Vec<_>>(),
            ["kvmlike.btf", "vhostlike.btf"]
        );
        // Types defined in the base, seen from vmlinux.
        assert_eq!(btf.member_offset("work_struct", "func"), Some(24));
        assert_eq!(btf.btf_tracepoint("block_rq_issue"), Some(Origin::Vmlinux));
        // A module's struct with members of base types and of its own types; the member
        // after a base-typed one is found at its real offset.
        assert_eq!(btf.member_offset("kvm_vcpu", "vcpu_id"), Some(40));
        assert_eq!(btf.member_offset("kvm_vcpu", "run"), Some(48));
        assert_eq!(btf.member_offset("kvm_vcpu", "arch"), Some(64));
        // through an anonymous union of the module, whose member type is in the module
        assert_eq!(btf.member_offset("kvm_vcpu", "mode"), Some(56));
        assert_eq!(btf.size_of("kvm_vcpu"), Some(128));
        // Tracepoints and functions of each module, named as the module.
        assert_eq!(
            btf.btf_tracepoint("kvm_entry"),
            Some(Origin::Module("kvmlike.btf".into()))
        );
        assert_eq!(
            btf.func("handle_tx_kick"),
            Some(Origin::Module("vhostlike.btf".into()))
        );
        // The second module's ids restart after the base, not after the first module:
        // its struct's members resolve to its own types.
        assert_eq!(btf.member_offset("vhost_virtqueue", "kick"), Some(8));
        assert_eq!(btf.member_offset("vhost_virtqueue", "num"), Some(16));
        assert_eq!(btf.member_offset("vhost_virtqueue", "handle"), Some(24));
    }

    #[test]
    fn this_kernel_has_the_block_request_layout() {
        // /sys/kernel/btf/vmlinux is on every kernel iopath supports with tp_btf.
        let btf = KernelBtf::from_sys_fs().expect("kernel BTF");
        assert!(btf.member_offset("request", "q").is_some());
        assert!(btf.member_offset("gendisk", "first_minor").is_some());
        assert_eq!(btf.btf_tracepoint("block_rq_issue"), Some(Origin::Vmlinux));
        assert!(btf.member_offset("task_struct", "stack").is_some());
    }
}
