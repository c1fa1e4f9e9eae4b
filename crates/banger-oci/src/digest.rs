//! Content digests (`sha256:<64 hex>`), the names of blobs.

use std::fmt;
use std::str::FromStr;

/// A validated `sha256:<hex>` digest. Only sha256 is accepted: it is what every registry
/// serves, and a digest we cannot verify must never name a cached blob.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid digest {input:?}: {reason}")]
pub struct DigestError {
    input: String,
    reason: &'static str,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest {
            hex: hex::encode(sha2::Sha256::digest(bytes)),
        }
    }

    /// Builds a digest from a 64-character lowercase hex sha256.
    pub fn from_sha256_hex(hex: &str) -> Result<Digest, DigestError> {
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError {
                input: hex.to_owned(),
                reason: "expected 64 lowercase hex characters",
            });
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    /// The hex part, which is also the blob's file name in the cache.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm; always `sha256`.
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        match s.split_once(':') {
            Some(("sha256", hex)) => Digest::from_sha256_hex(hex),
            Some(_) => Err(DigestError {
                input: s.to_owned(),
                reason: "only sha256 is supported",
            }),
            None => Err(DigestError {
                input: s.to_owned(),
                reason: "missing `sha256:` prefix",
            }),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_sha256() {
        let hex = "a".repeat(64);
        let digest: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(digest.hex(), hex);
        assert_eq!(digest.to_string(), format!("sha256:{hex}"));
    }

    #[test]
    fn refuses_other_algorithms_short_and_path_like_hex() {
        assert!("sha512:abcd".parse::<Digest>().is_err());
        assert!("sha256:abcd".parse::<Digest>().is_err());
        let sneaky = format!("sha256:../{}", "a".repeat(61));
        assert!(sneaky.parse::<Digest>().is_err());
    }

    #[test]
    fn digest_of_empty_input_is_the_well_known_one() {
        assert_eq!(
            Digest::of(b"").hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
