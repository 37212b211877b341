//! Log-linear latency buckets, shared by the BPF programs (which count into them) and the
//! daemon (which exports their bounds as Prometheus `le`).
//!
//! Values are nanoseconds. Bucket 0 holds `[0, 2^MIN_EXP]`; above that every power of two
//! `(2^g, 2^(g+1)]` is split into `SUBS` equal sub-buckets, so a bucket is at most 1/8 (12.5%) as
//! wide as its lower bound. The last bucket is the overflow (`+Inf`).
//!
//! Bounds are inclusive upper bounds, like Prometheus' `le`: a value lands in the first bucket
//! whose upper bound is at or above it. A value exactly on a bound (a power of two included)
//! therefore goes in the bucket whose `le` equals it, not the next one up.

/// Sub-buckets per power of two, as a power of two.
pub const SUB_BITS: u32 = 3;
/// Sub-buckets per power of two.
pub const SUBS: u32 = 1 << SUB_BITS;
/// Bucket 0 is `[0, 2^MIN_EXP]` ns (256 ns).
pub const MIN_EXP: u32 = 8;
/// The largest finite bound is `2^MAX_EXP` ns (about 17.2 s).
pub const MAX_EXP: u32 = 34;
/// Finite buckets: bucket 0, then `SUBS` for every power of two up to `2^MAX_EXP`.
pub const FINITE_BUCKETS: usize = 1 + ((MAX_EXP - MIN_EXP) * SUBS) as usize;
/// All buckets, the overflow (`+Inf`) one included.
pub const BUCKETS: usize = FINITE_BUCKETS + 1;
/// Index of the overflow bucket.
pub const OVERFLOW: u16 = FINITE_BUCKETS as u16;

/// Floor of log2 for `x > 0`, by binary search: no count-leading-zeros on the BPF target.
#[inline(always)]
const fn log2_floor(mut x: u64) -> u32 {
    let mut r = 0;
    if x >= 1 << 32 {
        x >>= 32;
        r += 32;
    }
    if x >= 1 << 16 {
        x >>= 16;
        r += 16;
    }
    if x >= 1 << 8 {
        x >>= 8;
        r += 8;
    }
    if x >= 1 << 4 {
        x >>= 4;
        r += 4;
    }
    if x >= 1 << 2 {
        x >>= 2;
        r += 2;
    }
    if x >= 1 << 1 {
        r += 1;
    }
    r
}

/// The bucket a latency of `ns` nanoseconds goes in.
#[inline(always)]
pub const fn bucket_index(ns: u64) -> u16 {
    if ns <= 1 << MIN_EXP {
        return 0;
    }
    // Work on ns - 1 so that a value exactly on a bound rounds down into the bucket it bounds.
    let x = ns - 1;
    let g = log2_floor(x);
    if g >= MAX_EXP {
        return OVERFLOW;
    }
    let sub = ((x >> (g - SUB_BITS)) as u32) & (SUBS - 1);
    (1 + (g - MIN_EXP) * SUBS + sub) as u16
}

/// Inclusive upper bound of bucket `i`, in nanoseconds; `None` for the overflow bucket.
pub const fn upper_bound_ns(i: u16) -> Option<u64> {
    if i == 0 {
        return Some(1 << MIN_EXP);
    }
    if i >= OVERFLOW {
        return None;
    }
    let g = MIN_EXP + (i as u32 - 1) / SUBS;
    let s = (i as u32 - 1) % SUBS;
    Some((1u64 << g) + ((s as u64 + 1) << (g - SUB_BITS)))
}

/// Exclusive lower bound of bucket `i`, in nanoseconds (0 for bucket 0).
pub const fn lower_bound_ns(i: u16) -> u64 {
    if i == 0 {
        return 0;
    }
    match upper_bound_ns(i - 1) {
        Some(b) => b,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_covers_one_microsecond_to_ten_seconds() {
        assert!(upper_bound_ns(0).unwrap() <= 1_000);
        assert!(upper_bound_ns(OVERFLOW - 1).unwrap() >= 10_000_000_000);
        assert_eq!(BUCKETS, 210);
    }

    #[test]
    fn every_power_of_two_lands_in_the_bucket_it_bounds() {
        for e in 0..63u32 {
            let v = 1u64 << e;
            let i = bucket_index(v);
            if e <= MIN_EXP {
                assert_eq!(i, 0, "2^{e}");
            } else if e <= MAX_EXP {
                assert_eq!(
                    upper_bound_ns(i),
                    Some(v),
                    "2^{e} must go where le == 2^{e}"
                );
                assert_eq!(bucket_index(v + 1), i + 1, "2^{e}+1 goes one bucket up");
                assert_eq!(bucket_index(v - 1), i, "2^{e}-1 stays");
            } else {
                assert_eq!(i, OVERFLOW, "2^{e}");
            }
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
    fn bounds_increase_and_relative_width_is_at_most_one_eighth() {
        for i in 1..OVERFLOW {
            let (lo, hi) = (lower_bound_ns(i), upper_bound_ns(i).unwrap());
            assert!(hi > lo);
            // Width relative to the lower bound: the worst-case quantile error of a bucket.
            assert!((hi - lo) * 8 <= lo, "bucket {i}: ({lo}, {hi}]");
        }
    }

    #[test]
    fn log2_floor_matches_leading_zeros() {
        for x in [1u64, 2, 3, 255, 256, 257, 1 << 31, (1 << 32) + 5, u64::MAX] {
            assert_eq!(log2_floor(x), 63 - x.leading_zeros());
        }
    }
}
