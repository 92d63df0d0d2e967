//! [`Tail`]: keeps the last N bytes of a stream in bounded memory.

/// The last `cap` bytes written, and whether anything was dropped.
#[derive(Debug)]
pub(crate) struct Tail {
    buf: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Tail {
    pub(crate) fn new(cap: usize) -> Self {
        Tail { buf: Vec::new(), cap, truncated: false }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        // Trim only when twice the cap is reached, so a stream of small
        // chunks costs amortised O(1) per byte.
        if self.buf.len() > 2 * self.cap {
            let cut = self.buf.len() - self.cap;
            self.buf.drain(..cut);
            self.truncated = true;
        }
    }

    /// The kept bytes as text; a character cut at the front is dropped and
    /// invalid UTF-8 is replaced.
    pub(crate) fn text(&self) -> String {
        let start = self.buf.len().saturating_sub(self.cap);
        let mut bytes = &self.buf[start..];
        if start > 0 || self.truncated {
            // Skip UTF-8 continuation bytes left by the cut.
            let skip = bytes.iter().take(3).take_while(|b| (**b & 0xC0) == 0x80).count();
            bytes = &bytes[skip..];
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes() {
        let mut t = Tail::new(4);
        t.push(b"ab");
        assert_eq!(t.text(), "ab");
        for _ in 0..10 {
            t.push(b"0123456789");
        }
        assert_eq!(t.text(), "6789");
    }

    #[test]
    fn drops_a_cut_character() {
        let mut t = Tail::new(3);
        t.push("xé€".as_bytes()); // x(1) é(2) €(3) = 6 bytes
        assert_eq!(t.text(), "€");
        let mut t = Tail::new(4);
        t.push("xé€".as_bytes());
        assert_eq!(t.text(), "€");
    }
}
