//! Latency buckets on the boundaries of Prometheus' native histogram schema 3, shared by the BPF
//! programs (which count into them) and the daemon (which exports them as native buckets and,
//! summed, as classic `le` buckets).
//!
//! Values are nanoseconds, the exported unit is seconds. Schema 3 puts a boundary at every
//! 2^(k/8) s: bucket k is (2^((k-1)/8), 2^(k/8)] s, at most 9.05% as wide as its lower bound
//! (9.3% once floored to whole ns).
//! Bucket 0 here is the native zero bucket, [0, 2^(ZERO_K/8) s] = [0, 238 ns]; bucket i >= 1
//! is native bucket `ZERO_K + i`; the last is the overflow (over 2^(MAX_K/8) s, 14 min 21 s).
//!
//! A latency is a whole number of ns, so `ns <= 1e9 * 2^(k/8)` holds exactly when
//! `ns <= floor(1e9 * 2^(k/8))`: comparing against the floored bounds of [`BOUNDS`] puts every
//! value in the bucket native schema 3 puts it in, with no rounding. The bounds are computed
//! here at compile time from 2^(j/8), j < 8, to 30 digits; the BPF program finds a value's
//! bucket by binary search over them (8 compares).

/// The native histogram schema the buckets follow.
pub const SCHEMA: i32 = 3;
/// Native index of the zero bucket's threshold: 2^(-176/8) s = 2^-22 s (238.4 ns).
pub const ZERO_K: i32 = -176;
/// Native index of the last finite bucket: 2^(78/8) s (861 s).
pub const MAX_K: i32 = 78;
/// Finite buckets: the zero bucket and one per native index up to `MAX_K`.
pub const FINITE_BUCKETS: usize = 1 + (MAX_K - ZERO_K) as usize;
/// All buckets, the overflow one included.
pub const BUCKETS: usize = FINITE_BUCKETS + 1;
/// Index of the overflow bucket.
pub const OVERFLOW: u16 = FINITE_BUCKETS as u16;

// The binary search below takes 8 halving steps: 255 bounds, no more.
const _: () = assert!(FINITE_BUCKETS == 255);

/// floor(2^(j/8) * 10^30), j = 0..8.
const ROOTS: [u128; 8] = [
    1_000000000000000000000000000000,
    1_090507732665257659207010655760,
    1_189207115002721066717499970560,
    1_296839554651009665933754117792,
    1_414213562373095048801688724209,
    1_542210825407940823612291862090,
    1_681792830507429086062250952466,
    1_834008086409342463487083189588,
];

/// floor(1e9 * 2^(k/8)): the bound of native bucket k, in ns.
const fn bound_ns(k: i32) -> u64 {
    let e = k.div_euclid(8);
    let r = ROOTS[k.rem_euclid(8) as usize];
    // 1e9 * 2^e * r / 1e30 = r * 2^e / 1e21.
    let scale = 1_000_000_000_000_000_000_000u128;
    (if e >= 0 {
        (r << e) / scale
    } else {
        r / (scale << -e)
    }) as u64
}

const fn bounds() -> [u64; FINITE_BUCKETS] {
    let mut b = [0u64; FINITE_BUCKETS];
    let mut i = 0;
    while i < FINITE_BUCKETS {
        b[i] = bound_ns(ZERO_K + i as i32);
        i += 1;
    }
    b
}

/// Inclusive upper bound of each finite bucket, in ns (floored; see the module comment).
pub const BOUNDS: [u64; FINITE_BUCKETS] = bounds();

/// The bucket a latency of `ns` nanoseconds goes in: the first whose bound is at or above it.
#[inline(always)]
pub const fn bucket_index(ns: u64) -> u16 {
    // i = how many bounds are below ns, found in steps of 128, 64, ..., 1 (j < 255 always).
    let mut i = 0usize;
    let mut step = 128usize;
    while step > 0 {
        let j = i + step - 1;
        if j < FINITE_BUCKETS && ns > BOUNDS[j] {
            i += step;
        }
        step >>= 1;
    }
    i as u16
}

/// Inclusive upper bound of bucket `i`, in nanoseconds; `None` for the overflow bucket.
pub const fn upper_bound_ns(i: u16) -> Option<u64> {
    if (i as usize) < FINITE_BUCKETS {
        Some(BOUNDS[i as usize])
    } else {
        None
    }
}

/// Exclusive lower bound of bucket `i`, in nanoseconds (0 for bucket 0).
pub const fn lower_bound_ns(i: u16) -> u64 {
    if i == 0 {
        return 0;
    }
    let i = if (i as usize) > FINITE_BUCKETS {
        FINITE_BUCKETS
    } else {
        i as usize
    };
    BOUNDS[i - 1]
}

/// The native (schema 3) index of finite bucket `i >= 1`; bucket 0 is the zero bucket.
pub const fn native_index(i: u16) -> i32 {
    ZERO_K + i as i32
}

/// The bucket pick of iopath's layout before schema 3 (log-linear: 8 linear sub-buckets per
/// power of two of ns, 210 buckets), kept only for the bench's variant
/// [`crate::blk::cut::LOGLINEAR`], which times the block completion with it instead: the
/// difference is what the schema-3 search costs per event. Its indices mean nothing in this
/// layout: that variant's histograms are not read.
pub mod loglinear {
    /// Floor of log2 for `x > 0`, by binary search: no count-leading-zeros on the BPF target.
    #[inline(always)]
    const fn log2_floor(mut x: u64) -> u32 {
        let mut r = 0;
        let mut shift = 32;
        while shift > 0 {
            if x >= 1 << shift {
                x >>= shift;
                r += shift;
            }
            shift >>= 1;
        }
        r
    }

    #[inline(always)]
    pub const fn bucket_index(ns: u64) -> u16 {
        if ns <= 1 << 8 {
            return 0;
        }
        let x = ns - 1;
        let g = log2_floor(x);
        if g >= 34 {
            return 209;
        }
        let sub = ((x >> (g - 3)) as u32) & 7;
        (1 + (g - 8) * 8 + sub) as u16
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn native_bound_seconds(k: i32) -> f64 {
        (k as f64 / 8.0).exp2()
    }

    #[test]
    fn range_covers_a_quarter_microsecond_to_fourteen_minutes() {
        assert_eq!(upper_bound_ns(0), Some(238));
        assert_eq!(upper_bound_ns(OVERFLOW - 1), Some(861_077_929_219));
        assert_eq!(BUCKETS, 256);
        // Whole powers of two seconds are bounds: 1 s, 2^-10 s, 16 s.
        assert_eq!(bound_ns(0), 1_000_000_000);
        assert_eq!(bound_ns(-80), 976_562);
        assert_eq!(bound_ns(32), 16_000_000_000);
    }

    #[test]
    fn bounds_match_two_to_the_k_eighths() {
        for (i, &b) in BOUNDS.iter().enumerate() {
            let k = native_index(i as u16);
            let exact = 1e9 * (k as f64 / 8.0).exp2();
            // The f64 value is good to a few parts in 1e16: b is its floor unless it is that
            // close to a whole number, which no bound is.
            assert!(
                exact - b as f64 >= 0.0 && exact - (b as f64) < 1.0,
                "k={k}: {b} against {exact}"
            );
        }
    }

    #[test]
    fn every_bound_is_inclusive_and_the_next_value_moves_up() {
        for i in 0..OVERFLOW {
            let le = upper_bound_ns(i).unwrap();
            assert_eq!(bucket_index(le), i, "value on le of bucket {i}");
            assert_eq!(
                bucket_index(le + 1),
                i + 1,
                "value just above le of bucket {i}"
            );
            assert!(le > lower_bound_ns(i));
        }
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(u64::MAX), OVERFLOW);
    }

    #[test]
    fn every_value_goes_where_native_schema_3_puts_it() {
        // Prometheus' own rule for a positive value v: the bucket k with 2^((k-1)/8) < v <= 2^(k/8).
        let mut v = 1u64;
        while v < 2_000_000_000_000 {
            let i = bucket_index(v);
            let secs = v as f64 / 1e9;
            if i == 0 {
                assert!(secs <= native_bound_seconds(ZERO_K) * (1.0 + 1e-12), "{v}");
            } else if i < OVERFLOW {
                let k = native_index(i);
                assert!(secs <= native_bound_seconds(k) * (1.0 + 1e-12), "{v} k={k}");
                assert!(
                    secs > native_bound_seconds(k - 1) * (1.0 - 1e-12),
                    "{v} k={k}"
                );
            } else {
                assert!(secs > native_bound_seconds(MAX_K), "{v}");
            }
            v = v + v / 37 + 1;
        }
    }

    #[test]
    fn the_previous_pick_still_splits_each_power_of_two_in_eight() {
        assert_eq!(loglinear::bucket_index(256), 0);
        assert_eq!(loglinear::bucket_index(257), 1);
        assert_eq!(loglinear::bucket_index(1 << 20), 96);
        assert_eq!(loglinear::bucket_index((1 << 20) + 1), 97);
        assert_eq!(loglinear::bucket_index(u64::MAX), 209);
    }

    #[test]
    fn bounds_increase_and_relative_width_is_at_most_9_3_percent() {
        for i in 1..OVERFLOW {
            let (lo, hi) = (lower_bound_ns(i), upper_bound_ns(i).unwrap());
            assert!(hi > lo);
            // Width relative to the lower bound: the worst-case quantile error of a bucket,
            // 2^(1/8) - 1 = 9.05% before flooring, 9.27% at most after (259, 283] ns.
            assert!(
                (hi - lo) as f64 <= 0.093 * lo as f64,
                "bucket {i}: ({lo}, {hi}]"
            );
        }
    }
}
