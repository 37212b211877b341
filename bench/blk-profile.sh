#!/bin/bash
# Where iopath's block programs spend their time, by JIT instruction: perf samples every CPU
# while fio runs on a loop device with `iopath serve --stages blk.device`, then maps the samples
# of each program to its JIT image (read with BPF_OBJ_GET_INFO_BY_FD: this bpftool has no
# disassembler) and prints the instructions that hold at least 1% of them, each with the one
# before it: a sample lands after an instruction that stalls (a load that misses the cache).
# Usage (root, after `cargo xtask run -- doctor` built target/release/iopath): bench/blk-profile.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
out=$(mktemp -d)
img=/var/tmp/iopath-blk-profile.img
lo= iop=
# Set first: a step that fails below leaves nothing behind.
trap '[ -n "$iop" ] && { kill $iop 2>/dev/null; wait $iop 2>/dev/null; }
  [ -n "$lo" ] && losetup -d "$lo"; rm -rf "$img" "$out"' EXIT
truncate -s 256M "$img"
lo=$(losetup --find --show --direct-io=on "$img")
target/release/iopath serve --stages blk.device --listen 127.0.0.1:9471 >"$out/serve.log" 2>&1 &
iop=$!
sleep 2
for n in blk_rq_issue_btf blk_rq_complete_btf; do
  id=$(bpftool -j prog show | python3 -c "import json,sys; print([p['id'] for p in json.load(sys.stdin) if p.get('name')=='$n'][0])")
  addr=$(grep -m1 -P "bpf_prog_[0-9a-f]+_$n\s" /proc/kallsyms | cut -d' ' -f1)
  echo "$n $addr" >>"$out/progs"
  python3 - "$id" "$out/$n.bin" <<'PY'
import ctypes, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_BPF, PROG_GET_FD_BY_ID, OBJ_GET_INFO_BY_FD = 321, 13, 15
attr = ctypes.create_string_buffer(128)
struct.pack_into('<I', attr, 0, int(sys.argv[1]))
fd = libc.syscall(SYS_BPF, PROG_GET_FD_BY_ID, attr, 128)
assert fd >= 0, ctypes.get_errno()
info, image = ctypes.create_string_buffer(512), ctypes.create_string_buffer(1 << 16)
struct.pack_into('<I', info, 16, 1 << 16)                  # jited_prog_len
struct.pack_into('<Q', info, 24, ctypes.addressof(image))  # jited_prog_insns
attr = ctypes.create_string_buffer(128)
struct.pack_into('<IIQ', attr, 0, fd, 512, ctypes.addressof(info))
assert libc.syscall(SYS_BPF, OBJ_GET_INFO_BY_FD, attr, 128) == 0, ctypes.get_errno()
open(sys.argv[2], 'wb').write(image.raw[:struct.unpack_from('<I', info, 16)[0]])
PY
  objdump -D -b binary -m i386:x86-64 "$out/$n.bin" >"$out/$n.dis"
done
perf record -q -F 20000 -a -o "$out/perf.data" -- fio --name=p --filename="$lo" --rw=randrw \
  --bs=4k --direct=1 --ioengine=psync --time_based --runtime="$secs" --output-format=terse >/dev/null
perf script -i "$out/perf.data" -F ip,sym 2>/dev/null | grep 'bpf_prog_.*blk_rq_' >"$out/ips" || true
python3 - "$out" <<'PY'
import collections, re, sys
d = sys.argv[1]
for line in open(f'{d}/progs'):
    name, base = line.split()
    base = int(base, 16)
    hits = collections.Counter(int(ip, 16) - base for ip, sym in
                               (l.split() for l in open(f'{d}/ips')) if sym.endswith(name))
    total = sum(hits.values())
    print(f'{name}: {total} samples')
    prev = ''
    for l in open(f'{d}/{name}.dis'):
        m = re.match(r'\s+([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(.*)', l)
        if not m:
            continue
        off, insn = int(m.group(1), 16), m.group(2).strip()
        if total and hits[off] >= total / 100:
            print(f'  {off:5x} {100 * hits[off] / total:5.1f}%  {insn:32} after: {prev}')
        prev = insn
PY
