//! Retry backoff: exponential with deterministic jitter.
//!
//! The jitter must be the same on every node, so it is derived from the job id
//! and the attempt number rather than from an RNG.

use uuid::Uuid;

/// Base delay before the first retry.
pub const BASE_MS: u64 = 1_000;
/// Cap on the delay.
pub const MAX_MS: u64 = 10 * 60 * 1_000;

/// Delay before retrying after `attempt` (1-based) failed: base * 2^(attempt-1),
/// capped, then scaled into [50%, 100%] by a hash of (job id, attempt).
pub fn retry_delay_ms(job_id: Uuid, attempt: u32) -> u64 {
    let exp = attempt.saturating_sub(1).min(20);
    let full = BASE_MS.saturating_mul(1u64 << exp).min(MAX_MS);
    let h = mix(job_id.as_u128() as u64 ^ (job_id.as_u128() >> 64) as u64 ^ u64::from(attempt));
    let half = full / 2;
    half + h % (full - half + 1)
}

/// SplitMix64 finaliser: a cheap, well-mixed, platform-independent hash.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_stays_in_bounds() {
        let id = Uuid::from_u128(42);
        let mut prev_max = 0;
        for attempt in 1..30 {
            let d = retry_delay_ms(id, attempt);
            let full = (BASE_MS << attempt.saturating_sub(1).min(20)).min(MAX_MS);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d}");
            assert!(full >= prev_max);
            prev_max = full;
        }
    }

    #[test]
    fn deterministic() {
        let id = Uuid::from_u128(7);
        assert_eq!(retry_delay_ms(id, 3), retry_delay_ms(id, 3));
    }
}
