//! Epochs: short random names for one incarnation of an inbox.

use rand::Rng;

/// Characters of an epoch: lowercase base32 (Crockford-like, without look-alikes).
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Length of an epoch: 12 characters of 5 bits, 60 random bits, so two incarnations of one inbox
/// practically never share a name.
const LEN: usize = 12;

/// A fresh random epoch such as `k3v9q0x7mz2a`.
pub(crate) fn new_epoch() -> String {
    let mut rng = rand::rng();
    (0..LEN)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
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
