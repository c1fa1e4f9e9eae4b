//! Image references (`debian:bookworm`, `ghcr.io/o/i@sha256:…`, `127.0.0.1:5000/x`), parsed
//! and normalised the way Docker does, so what users type for `docker pull` works here.

use std::fmt;
use std::str::FromStr;

use crate::digest::Digest;

/// A parsed, normalised image reference. Short Docker Hub names are expanded
/// (`debian` → `docker.io/library/debian:latest`) and a missing tag means `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    inner: oci_client::Reference,
}

/// Why a string is not an image reference.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    input: String,
    reason: String,
}

impl ReferenceError {
    fn new(input: &str, reason: impl fmt::Display) -> ReferenceError {
        ReferenceError {
            input: input.to_owned(),
            reason: reason.to_string(),
        }
    }
}

impl ImageRef {
    /// Parses `input` like `docker pull` would.
    pub fn parse(input: &str) -> Result<ImageRef, ReferenceError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(ReferenceError::new(input, "empty"));
        }
        if trimmed.contains("://") {
            return Err(ReferenceError::new(
                input,
                "expected an image reference, not a URL",
            ));
        }
        // The distribution grammar oci-client implements has no IPv6 literals, but
        // `[::1]:5000/x` is a legitimate loopback registry: parse the rest with a stand-in
        // host and put the bracketed one back.
        let inner = if let Some(rest) = trimmed.strip_prefix('[') {
            let (host, rest) = rest
                .split_once(']')
                .ok_or_else(|| ReferenceError::new(input, "unterminated IPv6 address"))?;
            host.parse::<std::net::Ipv6Addr>()
                .map_err(|e| ReferenceError::new(input, format!("bad IPv6 address: {e}")))?;
            let (port, path) = match rest.split_once('/') {
                Some((port, path)) if port.is_empty() || port.starts_with(':') => (port, path),
                _ => return Err(ReferenceError::new(input, "expected `[addr]:port/name`")),
            };
            let stand_in: oci_client::Reference = format!("ipv6.invalid{port}/{path}")
                .parse()
                .map_err(|e| ReferenceError::new(input, e))?;
            let registry = format!("[{host}]{port}");
            let repository = stand_in.repository().to_owned();
            match (stand_in.tag(), stand_in.digest()) {
                (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                    registry,
                    repository,
                    tag.to_owned(),
                    digest.to_owned(),
                ),
                (None, Some(digest)) => {
                    oci_client::Reference::with_digest(registry, repository, digest.to_owned())
                }
                (tag, None) => oci_client::Reference::with_tag(
                    registry,
                    repository,
                    tag.unwrap_or("latest").to_owned(),
                ),
            }
        } else {
            trimmed
                .parse::<oci_client::Reference>()
                .map_err(|e| ReferenceError::new(input, e))?
        };
        if let Some(digest) = inner.digest() {
            // Everything downstream names blobs by sha256; refuse other algorithms up front
            // rather than failing halfway through a pull.
            digest
                .parse::<Digest>()
                .map_err(|e| ReferenceError::new(input, e))?;
        }
        Ok(ImageRef { inner })
    }

    /// The registry as written in the normalised reference: `docker.io`, `ghcr.io`,
    /// `127.0.0.1:5000`. This is also the key for credentials.
    pub fn registry(&self) -> &str {
        self.inner.registry()
    }

    /// The host to actually connect to (`index.docker.io` for Docker Hub).
    pub fn registry_host(&self) -> &str {
        self.inner.resolve_registry()
    }

    /// The repository path: `library/debian`, `o/i`.
    pub fn repository(&self) -> &str {
        self.inner.repository()
    }

    /// The tag, unless the reference pins only a digest.
    pub fn tag(&self) -> Option<&str> {
        self.inner.tag()
    }

    /// The pinned manifest digest, if any.
    pub fn digest(&self) -> Option<Digest> {
        // Validated in `parse`, and `with_digest` only takes a `Digest`.
        self.inner.digest().and_then(|d| d.parse().ok())
    }

    /// The same repository pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: &Digest) -> ImageRef {
        ImageRef {
            inner: self.inner.clone_with_digest(digest.to_string()),
        }
    }

    /// The oci-client view of this reference.
    pub(crate) fn as_oci(&self) -> &oci_client::Reference {
        &self.inner
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<ImageRef, ReferenceError> {
        ImageRef::parse(s)
    }
}

impl fmt::Display for ImageRef {
    /// The full normalised form, e.g. `docker.io/library/debian:bookworm`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

/// The name banger gives an image pulled from `reference` when the user does not choose one:
/// the repository's last path component, `-`, and the tag (or the first 12 hex digits of the
/// digest), squeezed into `[a-z0-9][a-z0-9-]*`. `debian:bookworm` → `debian-bookworm`,
/// `ubuntu:22.04` → `ubuntu-22-04`.
pub fn default_image_name(reference: &ImageRef) -> String {
    let base = reference
        .repository()
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let suffix = match (reference.tag(), reference.digest()) {
        (Some(tag), _) => tag.to_owned(),
        (None, Some(digest)) => digest.hex()[..12].to_owned(),
        (None, None) => "latest".to_owned(),
    };
    let mut name = String::new();
    for c in format!("{base}-{suffix}").chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with('-') {
            // Runs of anything else (`.`, `_`, `-`) become a single dash; leading ones vanish.
            name.push('-');
        }
    }
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        // Unreachable for parsed references (repository components start alphanumeric), but
        // a name must never be empty.
        name.push_str("image");
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_short_names_are_normalised() {
        let r = parse("debian:bookworm");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.registry_host(), "index.docker.io");
        assert_eq!(r.repository(), "library/debian");
        assert_eq!(r.tag(), Some("bookworm"));
        assert_eq!(r.to_string(), "docker.io/library/debian:bookworm");
        assert_eq!(parse("docker.io/library/debian:bookworm"), r);
        assert_eq!(parse("index.docker.io/library/debian:bookworm"), r);
        assert_eq!(
            parse("debian").to_string(),
            "docker.io/library/debian:latest"
        );
        assert_eq!(
            parse("someone/tool").to_string(),
            "docker.io/someone/tool:latest"
        );
    }

    #[test]
    fn other_registries_digests_and_ports() {
        let hex = "ab".repeat(32);
        let r = parse(&format!("ghcr.io/o/i@sha256:{hex}"));
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("ghcr.io", "o/i", None)
        );
        assert_eq!(r.digest().unwrap().hex(), hex);

        let r = parse("127.0.0.1:5000/x:tag");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "x", Some("tag"))
        );
        assert_eq!(r.registry_host(), "127.0.0.1:5000");

        let r = parse("localhost:5000/x");
        assert_eq!((r.registry(), r.tag()), ("localhost:5000", Some("latest")));
        let r = parse("localhost/x");
        assert_eq!(r.registry(), "localhost");

        let r = parse("[::1]:5000/a/b:c");
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("[::1]:5000", "a/b", Some("c"))
        );
        assert_eq!(r.to_string(), "[::1]:5000/a/b:c");
    }

    #[test]
    fn pinning_a_digest_drops_the_tag() {
        let digest = Digest::of(b"x");
        let r = parse("debian:bookworm").with_digest(&digest);
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(digest.clone()));
        assert_eq!(r.to_string(), format!("docker.io/library/debian@{digest}"));
    }

    #[test]
    fn bad_references_name_the_input() {
        for bad in [
            "",
            "Debian:bookworm",
            "debian:",
            "https://ghcr.io/o/i",
            "a b",
            "x@sha256:abc",
            &format!("x@sha512:{}", "a".repeat(128)),
            "[::1/x",
            "[nope]:5000/x",
        ] {
            let err = ImageRef::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn default_names() {
        let name = |s: &str| default_image_name(&parse(s));
        assert_eq!(name("debian:bookworm"), "debian-bookworm");
        assert_eq!(name("debian"), "debian-latest");
        assert_eq!(name("ubuntu:22.04"), "ubuntu-22-04");
        assert_eq!(name("ghcr.io/o/my_tool:V1__2"), "my-tool-v1-2");
        assert_eq!(name("127.0.0.1:5000/a/b.c:_x"), "b-c-x");
        let hex = "0123456789ab".repeat(5) + "cdef";
        assert_eq!(name(&format!("ghcr.io/o/i@sha256:{hex}")), "i-0123456789ab");
    }
}
