//! Epochs: short random names for one incarnation of an inbox.

/// Characters of an epoch: lowercase base32 (Crockford-like, without look-alikes).
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Length of an epoch: 12 characters of 5 bits, 60 random bits, so two incarnations of one inbox
/// practically never share a name.
const LEN: usize = 12;

/// A fresh random epoch such as `k3v9q0x7mz2a`, as bytes (one random draw, no allocation).
pub(crate) fn new_epoch_bytes() -> [u8; LEN] {
    let mut bits: u64 = rand::random();
    let mut name = [0; LEN];
    for c in &mut name {
        *c = ALPHABET[(bits & 31) as usize];
        bits >>= 5;
    }
    name
}

/// A fresh random epoch as a string.
pub(crate) fn new_epoch() -> String {
    String::from_utf8_lossy(&new_epoch_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_short_random_and_printable() {
        let a = new_epoch();
        let b = new_epoch();
        assert_eq!(a.len(), LEN);
        assert!(a.bytes().all(|c| ALPHABET.contains(&c)));
        assert_ne!(a, b);
    }
}
