//! What the stage rules need from a map of started events. The BPF programs implement it over
//! a kernel hash map; the host tests implement it over a BTreeMap, so the same rule code runs
//! against event sequences (tests/fixtures/*.events).

use crate::maps::Counter;

/// A keyed store of started events.
pub trait Starts<K, V> {
    /// Stores `v` under `k`, replacing what was there. False when the store is full.
    fn put(&mut self, k: K, v: V) -> bool;
    /// Records a start: [`Starts::put`], with a full store counted as `start_map_full`.
    fn start(&mut self, k: K, v: V) -> Result<(), Counter> {
        if self.put(k, v) {
            Ok(())
        } else {
            Err(Counter::StartFull)
        }
    }
    /// Stores `v` under `k` only if nothing is there: Ok(true) stored, Ok(false) already
    /// there (left as it was), `start_map_full` when the store is full. Atomic in the kernel
    /// (BPF_NOEXIST), so of two CPUs racing the earlier insert wins.
    fn put_new(&mut self, k: K, v: V) -> Result<bool, Counter>;
    /// Removes and returns what is stored under `k`.
    fn take(&mut self, k: &K) -> Option<V>;
    /// Removes what is stored under `k`, if anything.
    fn remove(&mut self, k: &K) {
        let _ = self.take(k);
    }
    /// Returns what is stored under `k`, leaving it there.
    fn get(&self, k: &K) -> Option<V>;
}

#[cfg(test)]
pub mod testing {
    extern crate std;
    use std::collections::BTreeMap;

    use super::Starts;

    /// A bounded map with the kernel hash map's semantics.
    pub struct MapStarts<K, V> {
        pub map: BTreeMap<K, V>,
        cap: usize,
    }

    impl<K: Ord, V> MapStarts<K, V> {
        pub fn new(cap: usize) -> Self {
            Self {
                map: BTreeMap::new(),
                cap,
            }
        }
    }

    impl<K: Ord, V: Copy> Starts<K, V> for MapStarts<K, V> {
        fn put(&mut self, k: K, v: V) -> bool {
            if self.map.len() >= self.cap && !self.map.contains_key(&k) {
                return false;
            }
            self.map.insert(k, v);
            true
        }
        fn put_new(&mut self, k: K, v: V) -> Result<bool, super::Counter> {
            if self.map.contains_key(&k) {
                return Ok(false);
            }
            if self.put(k, v) {
                Ok(true)
            } else {
                Err(super::Counter::StartFull)
            }
        }
        fn take(&mut self, k: &K) -> Option<V> {
            self.map.remove(k)
        }
        fn get(&self, k: &K) -> Option<V> {
            self.map.get(k).copied()
        }
    }

    /// What iopath measured over a recorded fixture's window, from its header line
    /// `# iopath measured over this window (...): key=n key=n`.
    pub fn measured(text: &str) -> BTreeMap<std::string::String, u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with("# iopath measured"))
            .expect("a recorded fixture says what iopath measured");
        let values = line.rsplit_once("):").expect("`): ` before the values").1;
        values
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.into(), v.parse().expect("a count")))
            .collect()
    }

    /// One line of an event sequence: `ts_ns tgid/tid[@cpu] event key=value...`
    /// (`tid` alone means tgid = tid, cpu 0). Blank lines and `#` comments are skipped.
    pub struct Event<'a> {
        pub ts: u64,
        pub tgid: u32,
        pub tid: u32,
        pub cpu: u32,
        pub name: &'a str,
        fields: &'a str,
    }

    impl Event<'_> {
        /// A numeric field (decimal or 0x hex); 0 when absent.
        pub fn u(&self, key: &str) -> u64 {
            self.fields
                .split_whitespace()
                .find_map(|p| p.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                .map_or(0, |v| match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16).unwrap(),
                    None => v.parse::<i64>().unwrap() as u64,
                })
        }
    }

    pub fn events(text: &str) -> impl Iterator<Item = Event<'_>> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let mut f = l.splitn(4, char::is_whitespace);
                let ts = f.next().unwrap().parse().unwrap();
                let who = f.next().unwrap();
                let (who, cpu) = who.split_once('@').unwrap_or((who, "0"));
                let (tgid, tid) = who.split_once('/').unwrap_or((who, who));
                Event {
                    ts,
                    tgid: tgid.parse().unwrap(),
                    tid: tid.parse().unwrap(),
                    cpu: cpu.parse().unwrap(),
                    name: f.next().unwrap(),
                    fields: f.next().unwrap_or(""),
                }
            })
    }
}
