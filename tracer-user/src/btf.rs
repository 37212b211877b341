//! A small reader of kernel BTF (/sys/kernel/btf/*): enough to tell whether a function or a
//! BTF-enabled tracepoint exists and to find struct member offsets, so attach decisions and
//! field reads follow the running kernel rather than its version number.

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
    /// Referenced type for modifiers, typedefs and pointers.
    type_id: u32,
    members: Vec<Member>,
}

/// Types of one BTF blob (vmlinux, or vmlinux plus a module's split BTF).
#[derive(Debug, Default)]
pub struct KernelBtf {
    types: Vec<Type>, // index = type id; id 0 is void
    by_name: HashMap<(u32, String), u32>,
    /// Length of vmlinux's string section: a module's string offsets continue it.
    base_str_len: usize,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl KernelBtf {
    /// vmlinux BTF of the running kernel, plus the split BTF of the modules iopath probes
    /// (on most hosts kvm, vhost and vfio are modules; here they may be built in).
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let mut btf = Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))?;
        for module in [
            "kvm",
            "kvm_intel",
            "kvm_amd",
            "vhost",
            "vhost_net",
            "tun",
            "vfio",
            "vfio_pci",
        ] {
            let path = Path::new("/sys/kernel/btf").join(module);
            if path.exists() {
                // A module whose BTF cannot be read only loses its tp_btf/fentry candidates.
                if let Err(e) = btf.add_module(&path) {
                    log::warn!("{e}");
                }
            }
        }
        Ok(btf)
    }

    /// No types yet but void (type id 0).
    fn empty() -> Self {
        KernelBtf {
            types: vec![Type {
                kind: 0,
                type_id: 0,
                members: vec![],
            }],
            ..Default::default()
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut btf = KernelBtf::empty();
        btf.parse(&data)
            .ok_or_else(|| BtfError::Malformed(path.display().to_string()))?;
        Ok(btf)
    }

    /// Adds a kernel module's split BTF (its type ids continue vmlinux's).
    pub fn add_module(&mut self, path: &Path) -> Result<(), BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.parse(&data)
            .ok_or_else(|| BtfError::Malformed(path.display().to_string()))
    }

    fn parse(&mut self, b: &[u8]) -> Option<()> {
        if b.get(0..2)? != [0x9f, 0xeb] {
            return None; // only little-endian hosts are supported
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types = b.get(hdr_len + type_off..hdr_len + type_off + type_len)?;
        let strs = b.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
        // Split BTF string offsets continue the base's string section; names are resolved
        // per blob here, and base names a module refers to are not needed for our look-ups.
        let base_strs = if self.types.len() > 1 {
            self.base_str_len
        } else {
            0
        };
        let name = |off: u32| -> String {
            let off = (off as usize).checked_sub(base_strs).unwrap_or(usize::MAX);
            strs.get(off..)
                .and_then(|s| s.split(|&c| c == 0).next())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .unwrap_or_default()
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
                KIND_ENUM | KIND_FUNC_PROTO => vlen as usize * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen as usize * 12,
                _ => 0,
            };
            p += extra;
            let id = self.types.len() as u32;
            let n = name(name_off);
            if !n.is_empty() {
                self.by_name.entry((kind, n)).or_insert(id);
            }
            self.types.push(Type {
                kind,
                type_id: size_or_type,
                members,
            });
        }
        if base_strs == 0 {
            self.base_str_len = str_len;
        }
        Some(())
    }

    fn find(&self, kind: u32, name: &str) -> Option<&Type> {
        self.by_name
            .get(&(kind, name.to_string()))
            .and_then(|&id| self.types.get(id as usize))
    }

    /// A kernel function with this name is in BTF (a candidate for fentry/kprobe).
    pub fn has_func(&self, name: &str) -> bool {
        self.find(KIND_FUNC, name).is_some()
    }

    /// A BTF-enabled tracepoint with this name exists (the kernel's `btf_trace_<name>` typedef).
    pub fn has_btf_tracepoint(&self, name: &str) -> bool {
        self.find(KIND_TYPEDEF, &format!("btf_trace_{name}"))
            .is_some()
    }

    /// Skips typedefs and modifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.type_id
                }
                _ => return Some(t),
            }
        }
        None
    }

    fn member_bits(&self, t: &Type, member: &str) -> Option<u32> {
        for m in &t.members {
            if m.name == member {
                return Some(m.bit_offset);
            }
            if m.name.is_empty() {
                // anonymous struct or union: its members belong to the outer struct
                let inner = self.resolve(m.type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(off) = self.member_bits(inner, member)
                {
                    return Some(m.bit_offset + off);
                }
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name` (anonymous members searched through).
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        let t = self.find(KIND_STRUCT, name)?;
        let bits = self.member_bits(t, member)?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tiny BTF blob: struct s { int a; union { long b; }; }, a func and a typedef.
    fn blob() -> Vec<u8> {
        let strs = b"\0int\0s\0a\0b\0f\0btf_trace_x\0long\0".to_vec();
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
        let mut btf = KernelBtf::empty();
        btf.parse(&blob()).unwrap();
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(
            btf.member_offset("s", "b"),
            Some(8),
            "through the anonymous union"
        );
        assert_eq!(btf.member_offset("s", "c"), None);
        assert!(btf.has_func("f") && !btf.has_func("g"));
        assert!(btf.has_btf_tracepoint("x") && !btf.has_btf_tracepoint("y"));
    }

    #[test]
    fn this_kernel_has_the_block_request_layout() {
        let Ok(btf) = KernelBtf::from_sys_fs() else {
            eprintln!("skipping: no /sys/kernel/btf/vmlinux on this machine");
            return;
        };
        assert!(btf.member_offset("request", "q").is_some());
        assert!(btf.member_offset("gendisk", "first_minor").is_some());
        assert!(btf.has_btf_tracepoint("block_rq_issue"));
    }
}
