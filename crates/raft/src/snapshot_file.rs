//! The snapshot file format and the state digest.
//!
//! A snapshot file is the state machine's key space (`sm` column family) at
//! one point in time, streamed record by record so that neither building nor
//! installing holds the state in memory:
//!
//! ```text
//! magic        8 bytes  "JSSNAP01"
//! record*      u32 BE key length, key, u32 BE value length, value
//! end mark     u32 BE 0xFFFF_FFFF
//! count        u64 BE number of records
//! digest       u64 BE FNV-1a 64 over every record's bytes as written above
//! ```
//!
//! Records are in ascending key order (RocksDB iteration order). The trailer
//! lets a receiver verify a transferred file before it wipes its own state.
//! The snapshot metadata (last log id, membership, id) is not in the file: it
//! travels next to it (openraft's `SnapshotMeta`) and is stored in `sm_meta`.
//!
//! The digest is the same function [`crate::SmKv::digest`] computes over a live
//! store, so "snapshot of A installed on B" can be checked by comparing them.

use std::io::{self, Read, Write};

/// First bytes of every snapshot file; the last two digits are the version.
pub const MAGIC: &[u8; 8] = b"JSSNAP01";
const END_MARK: u32 = u32::MAX;
/// Sanity bound on one key or value, far above what the state machine writes,
/// so a corrupt length cannot make us allocate gigabytes.
const MAX_FIELD_BYTES: u32 = 256 << 20;

/// 64-bit FNV-1a: tiny, stable across platforms and versions, no dependency.
/// Good enough to detect divergence and corruption, not an adversary.
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Hash one key/value record, length-prefixed so that record boundaries
    /// are part of the digest.
    pub fn record(&mut self, key: &[u8], value: &[u8]) {
        self.write(&(key.len() as u32).to_be_bytes());
        self.write(key);
        self.write(&(value.len() as u32).to_be_bytes());
        self.write(value);
    }

    pub fn finish(&self) -> u64 {
        self.0
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn field_len(len: usize) -> io::Result<u32> {
    match u32::try_from(len) {
        Ok(n) if n <= MAX_FIELD_BYTES => Ok(n),
        _ => Err(invalid(format!("snapshot record field of {len} bytes is too large"))),
    }
}

/// Streams records into a snapshot file.
pub struct SnapshotWriter<W: Write> {
    out: W,
    hash: Fnv64,
    count: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(MAGIC)?;
        Ok(SnapshotWriter { out, hash: Fnv64::default(), count: 0 })
    }

    pub fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let kl = field_len(key.len())?;
        let vl = field_len(value.len())?;
        self.out.write_all(&kl.to_be_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(&vl.to_be_bytes())?;
        self.out.write_all(value)?;
        self.hash.record(key, value);
        self.count += 1;
        Ok(())
    }

    /// Write the trailer; returns the inner writer (flushed), the record count
    /// and the digest.
    pub fn finish(mut self) -> io::Result<(W, u64, u64)> {
        self.out.write_all(&END_MARK.to_be_bytes())?;
        self.out.write_all(&self.count.to_be_bytes())?;
        self.out.write_all(&self.hash.finish().to_be_bytes())?;
        self.out.flush()?;
        Ok((self.out, self.count, self.hash.finish()))
    }
}

/// Reads records back, verifying the trailer when the end is reached: the
/// last `next()` returns an error instead of `None` if count or digest differ.
pub struct SnapshotReader<R: Read> {
    input: R,
    hash: Fnv64,
    count: u64,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub fn new(mut input: R) -> io::Result<Self> {
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(invalid("not a snapshot file (bad magic)"));
        }
        Ok(SnapshotReader { input, hash: Fnv64::default(), count: 0, done: false })
    }

    fn read_u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.input.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.input.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn read_field(&mut self, len: u32) -> io::Result<Vec<u8>> {
        if len > MAX_FIELD_BYTES {
            return Err(invalid(format!("snapshot record field of {len} bytes is too large")));
        }
        let mut buf = vec![0u8; len as usize];
        self.input.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// The next record, or `None` after a verified trailer.
    pub fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let kl = self.read_u32()?;
        if kl == END_MARK {
            let count = self.read_u64()?;
            let digest = self.read_u64()?;
            self.done = true;
            if count != self.count || digest != self.hash.finish() {
                return Err(invalid(format!(
                    "snapshot trailer mismatch: {count} records / digest {digest:016x} declared, \
                     {} / {:016x} read",
                    self.count,
                    self.hash.finish()
                )));
            }
            return Ok(None);
        }
        let key = self.read_field(kl)?;
        let vl = self.read_u32()?;
        let value = self.read_field(vl)?;
        self.hash.record(&key, &value);
        self.count += 1;
        Ok(Some((key, value)))
    }

    /// Records read so far and the digest over them.
    pub fn stats(&self) -> (u64, u64) {
        (self.count, self.hash.finish())
    }
}

/// Read a whole snapshot, checking its structure and trailer; returns
/// `(record count, digest)`.
pub fn verify<R: Read>(input: R) -> io::Result<(u64, u64)> {
    let mut r = SnapshotReader::new(input)?;
    while r.next_record()?.is_some() {}
    Ok(r.stats())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new()).unwrap();
        w.push(b"a", b"1").unwrap();
        w.push(b"bc", b"").unwrap();
        w.finish().unwrap().0
    }

    /// Golden bytes: the on-disk format must not change silently.
    #[test]
    fn golden_bytes() {
        let bytes = sample();
        let mut want = b"JSSNAP01".to_vec();
        want.extend_from_slice(&[0, 0, 0, 1, b'a', 0, 0, 0, 1, b'1']);
        want.extend_from_slice(&[0, 0, 0, 2, b'b', b'c', 0, 0, 0, 0]);
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        want.extend_from_slice(&2u64.to_be_bytes());
        let mut h = Fnv64::default();
        h.record(b"a", b"1");
        h.record(b"bc", b"");
        want.extend_from_slice(&h.finish().to_be_bytes());
        assert_eq!(bytes, want);
        // FNV-1a of the empty input and of "a" are well-known constants.
        assert_eq!(Fnv64::default().finish(), 0xcbf2_9ce4_8422_2325);
        let mut a = Fnv64::default();
        a.write(b"a");
        assert_eq!(a.finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn round_trip_and_corruption() {
        let bytes = sample();
        let mut r = SnapshotReader::new(&bytes[..]).unwrap();
        assert_eq!(r.next_record().unwrap(), Some((b"a".to_vec(), b"1".to_vec())));
        assert_eq!(r.next_record().unwrap(), Some((b"bc".to_vec(), vec![])));
        assert_eq!(r.next_record().unwrap(), None);
        assert_eq!(verify(&bytes[..]).unwrap().0, 2);

        let mut flipped = bytes.clone();
        flipped[12] ^= 1; // the first key byte
        assert!(verify(&flipped[..]).is_err());
        assert!(verify(&bytes[..bytes.len() - 3]).is_err()); // truncated
        assert!(verify(&b"NOTSNAP0"[..]).is_err());
    }
}
