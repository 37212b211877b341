//! What the stage rules need from a map of started events. The BPF programs implement it over
//! a kernel hash map; the host tests implement it over a BTreeMap, so the same rule code runs
//! against recorded event sequences.

/// A keyed store of started events.
pub trait Starts<K, V> {
    /// Stores `v` under `k`, replacing what was there. False when the store is full.
    fn put(&mut self, k: K, v: V) -> bool;
    /// Removes and returns what is stored under `k`.
    fn take(&mut self, k: &K) -> Option<V>;
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

    impl<K: Ord, V> Starts<K, V> for MapStarts<K, V> {
        fn put(&mut self, k: K, v: V) -> bool {
            if self.map.len() >= self.cap && !self.map.contains_key(&k) {
                return false;
            }
            self.map.insert(k, v);
            true
        }
        fn take(&mut self, k: &K) -> Option<V> {
            self.map.remove(k)
        }
    }
}
