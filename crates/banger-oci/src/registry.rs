//! Talking to OCI registries: resolving a reference to one linux/amd64 image (manifest,
//! config, layer list) and streaming its blobs into the [`BlobCache`], verified.
//!
//! The wire protocol, token exchanges and digest checks on the stream are oci-client's;
//! this module decides which platform to take, which layer formats are acceptable, when
//! plain HTTP is allowed, and turns registry failures into errors a user can act on.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError as OciDigestError, OciDistributionError, OciErrorCode};
use oci_client::manifest as media;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use crate::auth::{self, AuthError};
use crate::cache::{BlobCache, CacheError, Lease};
use crate::digest::Digest;
use crate::reference::ImageRef;

mod artifact;
pub use artifact::{ResolvedArtifact, MAX_ARTIFACT_BLOBS};

/// The only platform banger boots.
const WANTED_OS: &str = "linux";
const WANTED_ARCH: &str = "amd64";

/// Layers fetched at once by [`RegistryClient::pull_to_cache`]: enough to hide per-request
/// latency, few enough not to starve a slow link or the registry.
const MAX_PARALLEL_FETCHES: usize = 3;

/// Image configs are small JSON documents; anything bigger is not one, and is held in memory.
/// A config is also cut at the size its descriptor declares, whichever is smaller.
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Manifests and image indexes are read whole into memory; containerd refuses them past
/// 4 MiB too. The body is cut there, whatever Content-Length says.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// A size bound on a document read whole, and the constant's name errors give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamedLimit {
    /// The bound in bytes.
    pub bytes: u64,
    /// The constant it comes from, as errors name it.
    pub name: &'static str,
}

/// [`MAX_MANIFEST_BYTES`], named: manifests and image indexes, from a registry or an archive.
pub const MANIFEST_LIMIT: NamedLimit = NamedLimit {
    bytes: MAX_MANIFEST_BYTES,
    name: "MAX_MANIFEST_BYTES",
};

/// [`MAX_CONFIG_BYTES`], named: image configurations, from a registry or an archive.
pub const CONFIG_LIMIT: NamedLimit = NamedLimit {
    bytes: MAX_CONFIG_BYTES,
    name: "MAX_CONFIG_BYTES",
};

/// Error bodies are only read for their message.
const MAX_ERROR_BODY_BYTES: u64 = 64 << 10;

/// Connecting to a registry gives up after this long.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// A registry that sends nothing for this long (a stalled body, a hung server) fails the
/// pull instead of hanging it (`registry_read_timeout_secs`).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Manifest media types we ask for. Docker schema 1 is deliberately absent: registries then
/// convert or refuse, and we never have to parse signed v1 manifests.
const MANIFEST_MEDIA_TYPES: &[&str] = &[
    media::OCI_IMAGE_INDEX_MEDIA_TYPE,
    media::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    media::OCI_IMAGE_MEDIA_TYPE,
    media::IMAGE_MANIFEST_MEDIA_TYPE,
];

/// Configuration of a [`RegistryClient`].
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host` or `host:port`) to reach over plain HTTP. Loopback registries
    /// (`localhost`, 127.0.0.0/8, `[::1]`) always are; everything else uses HTTPS.
    pub insecure_registries: Vec<String>,
    /// Docker `config.json` to take credentials from; `None` means
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// How long a registry may send nothing before the request fails; `None` means
    /// [`DEFAULT_READ_TIMEOUT`].
    pub read_timeout: Option<Duration>,
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerCompression {
    /// A plain tar.
    None,
    /// gzip-compressed tar.
    Gzip,
    /// zstd-compressed tar.
    Zstd,
}

impl LayerCompression {
    /// The compression of a layer with `media_type`, or `None` if it is not a filesystem
    /// layer we can apply (e.g. an attestation, a Helm chart or a Wasm module).
    pub fn from_media_type(media_type: &str) -> Option<LayerCompression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(LayerCompression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(LayerCompression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(LayerCompression::Zstd)
            }
            _ => None,
        }
    }
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDescriptor {
    /// Digest of the blob as stored in the registry (compressed bytes).
    pub digest: Digest,
    /// Size of the blob in bytes, as the manifest promises.
    pub size: u64,
    /// The media type from the manifest.
    pub media_type: String,
    /// Compression implied by the media type.
    pub compression: LayerCompression,
    /// Alternative locations (foreign/non-distributable layers), tried by oci-client when the
    /// registry does not have the blob.
    pub urls: Option<Vec<String>>,
}

/// A reference resolved to one linux/amd64 image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The reference as given.
    pub reference: ImageRef,
    /// Digest of the platform-specific image manifest.
    pub manifest_digest: Digest,
    /// Digest of the image index / manifest list the manifest was picked from, if any.
    pub index_digest: Option<Digest>,
    /// Digest of the image configuration blob.
    pub config_digest: Digest,
    /// The parsed image configuration (entrypoint, env, working directory, …).
    pub config: oci_spec::image::ImageConfiguration,
    /// The configuration blob exactly as fetched (it hashes to `config_digest`).
    pub raw_config: Vec<u8>,
    /// Filesystem layers, bottom first.
    pub layers: Vec<LayerDescriptor>,
}

/// What [`RegistryClient::fetch_blob_into_cache`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// The cache already had the blob (possibly because a concurrent fetch of the same
    /// digest just put it there); nothing was downloaded.
    AlreadyCached,
    /// The blob was downloaded, verified and committed.
    Downloaded {
        /// Bytes transferred.
        bytes: u64,
    },
}

/// A pulled image whose blobs are all in the cache, held there by `lease`.
#[derive(Debug)]
pub struct PulledImage {
    /// What was pulled.
    pub image: ResolvedImage,
    /// Keeps the config and layer blobs from being pruned while the image is in use.
    pub lease: Lease,
}

/// Why talking to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused our credentials (or the lack of them): HTTP 401/403.
    #[error(
        "registry {registry} refused access ({detail}); check the credentials for {registry} \
         in your docker config.json (`docker login {registry}`)"
    )]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry has no such repository, tag or manifest.
    #[error("image {reference} not found (no such repository, tag or manifest)")]
    NotFound {
        /// The reference, normalised.
        reference: String,
    },
    /// The registry does not have a blob its manifest names.
    #[error("blob {digest} of {reference} not found in the registry")]
    BlobNotFound {
        /// The blob.
        digest: Digest,
        /// The image it was fetched for.
        reference: String,
    },
    /// The image exists, but not for linux/amd64.
    #[error("image {reference} has no linux/amd64 variant (available: {})", available.join(", "))]
    NoMatchingPlatform {
        /// The reference, normalised.
        reference: String,
        /// The platforms it does offer, `os/arch[/variant]`.
        available: Vec<String>,
    },
    /// A manifest, config or layer has a media type we cannot use.
    #[error("image {reference}: unsupported {what} media type {media_type:?}")]
    UnsupportedMediaType {
        /// The reference, normalised.
        reference: String,
        /// `manifest`, `config` or `layer`.
        what: &'static str,
        /// The media type.
        media_type: String,
    },
    /// A manifest or config that does not parse or makes no sense.
    #[error("image {reference}: invalid {what}: {reason}")]
    Invalid {
        /// The reference, normalised.
        reference: String,
        /// `manifest`, `image index` or `config`.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Downloaded content does not hash to the digest it was fetched by. Nothing was stored.
    #[error("blob {digest} failed verification: the registry sent content hashing to {actual}")]
    DigestMismatch {
        /// The digest asked for.
        digest: Digest,
        /// What the content hashed to (`unknown` if oci-client did not say).
        actual: String,
    },
    /// Downloaded content is not as long as the manifest said. Nothing was stored.
    #[error("blob {digest} has the wrong size: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Size from the manifest.
        expected: u64,
        /// Bytes received (a lower bound when the registry sent too much).
        actual: u64,
    },
    /// A manifest, index or config is bigger than banger accepts; it was cut off there.
    #[error("image {reference}: {what} is larger than the limit of {limit} bytes ({limit_name}); refused")]
    TooLarge {
        /// The reference, normalised.
        reference: String,
        /// `manifest`, `image index` or `config`.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// The constant or declared size that sets it.
        limit_name: &'static str,
    },
    /// The registry sent nothing for longer than the read timeout.
    #[error("{action} from registry {registry}: no data for {}s (registry_read_timeout_secs); the registry stalled", timeout.as_secs())]
    Timeout {
        /// What we were doing.
        action: String,
        /// The registry host.
        registry: String,
        /// The read timeout in force.
        timeout: Duration,
    },
    /// Credentials could not be read.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Writing to the blob cache failed.
    #[error("storing blob {digest} in the cache")]
    Cache {
        /// The blob.
        digest: Digest,
        /// Why.
        #[source]
        source: CacheError,
    },
    /// Anything else on the way: connection, TLS, protocol, server errors.
    #[error("{action} from registry {registry}")]
    Transport {
        /// What we were doing, e.g. `fetching manifest docker.io/library/debian:bookworm`.
        action: String,
        /// The registry host.
        registry: String,
        /// Why.
        #[source]
        source: OciDistributionError,
    },
}

/// Client for OCI registries. Cheap to share (`Arc`); one per process is the intent, since
/// concurrent fetches of the same blob are coalesced only within one client.
pub struct RegistryClient {
    config: RegistryConfig,
    /// One oci-client per registry host, with the credentials it was given: the protocol
    /// (HTTP/HTTPS) is per client, and so are the credentials and token cache.
    clients: Mutex<HashMap<String, (RegistryAuth, oci_client::Client)>>,
    /// Single-flight: a lock per blob being fetched. Weak so finished fetches leave nothing
    /// behind; dead entries are swept whenever a new one is added.
    in_flight: Mutex<HashMap<Digest, Weak<tokio::sync::Mutex<()>>>>,
    /// For manifests, which must be read with a size limit oci-client does not have.
    http: std::sync::OnceLock<Result<reqwest::Client, String>>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client with `config`.
    pub fn new(config: RegistryConfig) -> RegistryClient {
        RegistryClient {
            config,
            clients: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            http: std::sync::OnceLock::new(),
        }
    }

    fn read_timeout(&self) -> Duration {
        self.config.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT)
    }

    /// Whether `host` (as in a reference, maybe with a port) may be reached over plain HTTP.
    pub fn allows_plain_http(&self, host: &str) -> bool {
        allows_plain_http(host, &self.config.insecure_registries)
    }

    /// The oci-client for `reference`'s registry, with credentials registered for it.
    async fn client_for(
        &self,
        reference: &ImageRef,
    ) -> Result<(oci_client::Client, RegistryAuth), RegistryError> {
        let host = reference.registry_host();
        // Credentials are keyed by the registry name users log in to (`docker.io`), not the
        // host we connect to (`index.docker.io`). Read on every call, so a `docker login`
        // takes effect without restarting the daemon.
        let auth = auth::registry_auth(reference.registry(), self.config.docker_config.as_deref())?;
        let client = {
            let mut clients = self.clients.lock().expect("registry client map poisoned");
            match clients.get(host) {
                // oci-client keeps the first credentials it is given per host (and tokens
                // obtained with them), so changed credentials need a fresh client.
                Some((known, client)) if *known == auth => client.clone(),
                _ => {
                    let client = self.new_oci_client(host);
                    clients.insert(host.to_owned(), (auth.clone(), client.clone()));
                    client
                }
            }
        };
        client.store_auth_if_needed(host, &auth).await;
        Ok((client, auth))
    }

    fn new_oci_client(&self, host: &str) -> oci_client::Client {
        let protocol = if self.allows_plain_http(host) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        oci_client::Client::new(ClientConfig {
            protocol,
            // We pick the platform ourselves, to report what is available.
            platform_resolver: None,
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
            // A registry that stops sending mid-blob fails the pull instead of hanging it.
            read_timeout: Some(self.read_timeout()),
            user_agent: concat!("banger/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
    }

    /// Resolves `reference` to its linux/amd64 image: manifest (picked from an index or
    /// manifest list when there is one), configuration and layer list.
    pub async fn resolve(&self, reference: &ImageRef) -> Result<ResolvedImage, RegistryError> {
        let TopManifest {
            client,
            authorization,
            body,
            digest: top_digest,
        } = self.fetch_top_manifest(reference).await?;

        let (manifest_digest, index_digest, manifest) = match parse_manifest(&body, reference)? {
            Manifest::Image(manifest) => (top_digest, None, manifest),
            Manifest::Index(index) => {
                let entry = pick_platform(&index, reference)?;
                let child_ref = reference.with_digest(&entry);
                let child = self
                    .fetch_manifest(reference, &child_ref, authorization.as_deref(), "manifest")
                    .await?;
                // oci-client checks this too; a manifest is small, so check it ourselves
                // rather than trust that it always will.
                expect_digest(&entry, &Digest::of(&child))?;
                match parse_manifest(&child, reference)? {
                    Manifest::Image(manifest) => (entry, Some(top_digest), manifest),
                    Manifest::Index(_) => {
                        return Err(invalid(reference, "image index", "nested image indexes"))
                    }
                }
            }
        };

        let layers = manifest
            .layers
            .iter()
            .map(|layer| layer_descriptor(layer, reference))
            .collect::<Result<Vec<_>, _>>()?;

        let config_desc = &manifest.config;
        let config_type = config_desc.media_type.as_deref().unwrap_or_default();
        if config_type != media::IMAGE_CONFIG_MEDIA_TYPE
            && config_type != media::IMAGE_DOCKER_CONFIG_MEDIA_TYPE
        {
            return Err(RegistryError::UnsupportedMediaType {
                reference: reference.to_string(),
                what: "config",
                media_type: config_type.to_owned(),
            });
        }
        let config_digest = descriptor_digest(config_desc, reference, "manifest")?;
        let config_size = descriptor_size(config_desc, reference)?;
        if config_size > MAX_CONFIG_BYTES {
            return Err(RegistryError::TooLarge {
                reference: reference.to_string(),
                what: "config",
                limit: CONFIG_LIMIT.bytes,
                limit_name: CONFIG_LIMIT.name,
            });
        }
        let raw_config = self
            .fetch_config(&client, reference, config_desc, &config_digest, config_size)
            .await?;
        expect_digest(&config_digest, &Digest::of(&raw_config))?;
        let config: oci_spec::image::ImageConfiguration =
            serde_json::from_slice(&raw_config).map_err(|e| invalid(reference, "config", e))?;
        // A single-platform image has no index to choose from; refuse a foreign one here
        // rather than boot a VM that cannot run its binaries.
        let platform = format!("{}/{}", config.os(), config.architecture());
        if platform != format!("{WANTED_OS}/{WANTED_ARCH}") {
            return Err(RegistryError::NoMatchingPlatform {
                reference: reference.to_string(),
                available: vec![platform],
            });
        }

        Ok(ResolvedImage {
            reference: reference.clone(),
            manifest_digest,
            index_digest,
            config_digest,
            config,
            raw_config,
            layers,
        })
    }

    /// The `Authorization` header for `reference`'s repository, after the token dance
    /// oci-client does (and caches for the blob requests that follow).
    async fn authorization(
        &self,
        client: &oci_client::Client,
        auth: &RegistryAuth,
        reference: &ImageRef,
    ) -> Result<Option<String>, RegistryError> {
        let token = client
            .auth(
                reference.as_oci(),
                auth,
                oci_client::RegistryOperation::Pull,
            )
            .await
            .map_err(|e| {
                self.map_transport(
                    e,
                    reference,
                    None,
                    format!("authenticating for {reference}"),
                )
            })?;
        Ok(match (token, auth) {
            (Some(token), _) => Some(format!("Bearer {token}")),
            (None, RegistryAuth::Basic(user, password)) => {
                use base64::Engine as _;
                let pair =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Some(format!("Basic {pair}"))
            }
            (None, _) => None,
        })
    }

    fn http(&self) -> Result<&reqwest::Client, RegistryError> {
        self.http
            .get_or_init(|| {
                reqwest::Client::builder()
                    .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                    .read_timeout(self.read_timeout())
                    .user_agent(concat!("banger/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| RegistryError::Transport {
                action: "building the HTTP client".into(),
                registry: String::new(),
                source: OciDistributionError::GenericError(Some(e.clone())),
            })
    }

    /// GETs the manifest `target` names, reading at most [`MAX_MANIFEST_BYTES`] of it:
    /// oci-client reads manifests whole, whatever their size.
    async fn fetch_manifest(
        &self,
        reference: &ImageRef,
        target: &ImageRef,
        authorization: Option<&str>,
        what: &'static str,
    ) -> Result<Vec<u8>, RegistryError> {
        let oci = target.as_oci();
        let host = oci.resolve_registry();
        let scheme = if self.allows_plain_http(host) {
            "http"
        } else {
            "https"
        };
        let tail = match oci.digest() {
            Some(digest) => digest.to_owned(),
            None => oci.tag().unwrap_or("latest").to_owned(),
        };
        let url = format!("{scheme}://{host}/v2/{}/manifests/{tail}", oci.repository());
        let action = format!("fetching {what} {target}");
        let transport = |e: reqwest::Error| {
            self.map_transport(
                OciDistributionError::RequestError(e),
                reference,
                None,
                action.clone(),
            )
        };
        let mut request = self
            .http()?
            .get(&url)
            .header(reqwest::header::ACCEPT, MANIFEST_MEDIA_TYPES.join(", "));
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            let body = read_capped(response, MAX_ERROR_BODY_BYTES)
                .await
                .map_err(transport)?
                .unwrap_or_default();
            return Err(self.map_transport(
                registry_status_error(status, &body, &url),
                reference,
                None,
                action,
            ));
        }
        let too_large = || RegistryError::TooLarge {
            reference: reference.to_string(),
            what,
            limit: MANIFEST_LIMIT.bytes,
            limit_name: MANIFEST_LIMIT.name,
        };
        if response
            .content_length()
            .is_some_and(|len| len > MAX_MANIFEST_BYTES)
        {
            return Err(too_large());
        }
        read_capped(response, MAX_MANIFEST_BYTES)
            .await
            .map_err(transport)?
            .ok_or_else(too_large)
    }

    /// Streams the config blob, cut at its declared size (and so never more than
    /// [`MAX_CONFIG_BYTES`]): a registry may claim 100 bytes and send gigabytes.
    async fn fetch_config(
        &self,
        client: &oci_client::Client,
        reference: &ImageRef,
        descriptor: &RawDescriptor,
        digest: &Digest,
        size: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let action = || format!("fetching config {digest} of {reference}");
        let mut stream = client
            .pull_blob_stream(reference.as_oci(), &descriptor.as_oci())
            .await
            .map_err(|e| self.map_transport(e, reference, Some(digest), action()))?;
        let wrong_size = |actual| RegistryError::SizeMismatch {
            digest: digest.clone(),
            expected: size,
            actual,
        };
        if let Some(announced) = stream.content_length.filter(|len| *len > size) {
            return Err(wrong_size(announced));
        }
        let mut body = Vec::with_capacity(size as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.stream_error(e, digest, reference, action()))?;
            let total = body.len() as u64 + chunk.len() as u64;
            if total > size {
                return Err(wrong_size(total));
            }
            body.extend_from_slice(&chunk);
        }
        if body.len() as u64 != size {
            return Err(wrong_size(body.len() as u64));
        }
        Ok(body)
    }

    /// The manifest `reference` names, fetched with the client and authorization its
    /// repository needs (kept for what the manifest leads to); its digest must be the one
    /// `reference` pins, if it pins one.
    pub(super) async fn fetch_top_manifest(
        &self,
        reference: &ImageRef,
    ) -> Result<TopManifest, RegistryError> {
        let (client, auth) = self.client_for(reference).await?;
        let authorization = self.authorization(&client, &auth, reference).await?;
        let body = self
            .fetch_manifest(reference, reference, authorization.as_deref(), "manifest")
            .await?;
        let digest = Digest::of(&body);
        if let Some(pinned) = reference.digest() {
            expect_digest(&pinned, &digest)?;
        }
        Ok(TopManifest {
            client,
            authorization,
            body,
            digest,
        })
    }

    /// [`map_oci_error`], telling a timeout apart from other transport failures.
    fn map_transport(
        &self,
        error: OciDistributionError,
        reference: &ImageRef,
        blob: Option<&Digest>,
        action: String,
    ) -> RegistryError {
        self.timeout_or(error, reference, action, |error, action| {
            map_oci_error(error, reference, blob, action)
        })
    }

    /// [`stream_error`], telling a timeout apart from other transport failures.
    fn stream_error(
        &self,
        error: std::io::Error,
        digest: &Digest,
        reference: &ImageRef,
        action: String,
    ) -> RegistryError {
        self.timeout_or(error, reference, action, |error, action| {
            stream_error(error, digest, reference, action)
        })
    }

    /// [`RegistryError::Timeout`] for `action` when `error` is a timeout (anywhere in its
    /// chain), what `otherwise` makes of it when not.
    fn timeout_or<E: std::error::Error + 'static>(
        &self,
        error: E,
        reference: &ImageRef,
        action: String,
        otherwise: impl FnOnce(E, String) -> RegistryError,
    ) -> RegistryError {
        if is_timeout(&error) {
            return RegistryError::Timeout {
                action,
                registry: reference.registry_host().to_owned(),
                timeout: self.read_timeout(),
            };
        }
        otherwise(error, action)
    }

    /// Streams `layer` of `reference`'s repository into `cache`, verified, calling
    /// `progress` with the bytes received so far. Does nothing if the cache has it. Two
    /// concurrent calls for the same digest download it once; the second waits and then
    /// finds it cached. On any failure nothing appears under the digest.
    pub async fn fetch_blob_into_cache(
        &self,
        reference: &ImageRef,
        layer: &LayerDescriptor,
        cache: &Arc<BlobCache>,
        mut progress: impl FnMut(u64),
    ) -> Result<FetchOutcome, RegistryError> {
        if cache.contains(&layer.digest) {
            return Ok(FetchOutcome::AlreadyCached);
        }
        let flight = self.flight(&layer.digest);
        let _in_flight = flight.lock().await;
        // Whoever held the lock before us may have just committed it.
        if cache.contains(&layer.digest) {
            return Ok(FetchOutcome::AlreadyCached);
        }
        let bytes = self
            .download(reference, layer, cache, &mut progress)
            .await?;
        Ok(FetchOutcome::Downloaded { bytes })
    }

    fn flight(&self, digest: &Digest) -> Arc<tokio::sync::Mutex<()>> {
        let mut in_flight = self.in_flight.lock().expect("in-flight map poisoned");
        if let Some(flight) = in_flight.get(digest).and_then(Weak::upgrade) {
            return flight;
        }
        in_flight.retain(|_, flight| flight.strong_count() > 0);
        let flight = Arc::new(tokio::sync::Mutex::new(()));
        in_flight.insert(digest.clone(), Arc::downgrade(&flight));
        flight
    }

    async fn download(
        &self,
        reference: &ImageRef,
        layer: &LayerDescriptor,
        cache: &Arc<BlobCache>,
        progress: &mut impl FnMut(u64),
    ) -> Result<u64, RegistryError> {
        let digest = &layer.digest;
        let (client, _) = self.client_for(reference).await?;
        let action = || format!("fetching blob {digest} of {reference}");
        let descriptor = oci_client::manifest::OciDescriptor {
            media_type: layer.media_type.clone(),
            digest: digest.to_string(),
            size: layer.size as i64,
            urls: layer.urls.clone(),
            ..Default::default()
        };
        // oci-client hashes the stream and fails it at the end on a mismatch; the cache
        // writer hashes again before linking. Double the hashing, but the cache's guarantee
        // does not depend on how a transport library handles edge cases.
        let mut stream = client
            .pull_blob_stream(reference.as_oci(), &descriptor)
            .await
            .map_err(|e| self.map_transport(e, reference, Some(digest), action()))?;
        if let Some(announced) = stream.content_length.filter(|len| *len > layer.size) {
            // Refused before a byte is stored: more than the manifest promised.
            return Err(RegistryError::SizeMismatch {
                digest: digest.clone(),
                expected: layer.size,
                actual: announced,
            });
        }
        let writer =
            cache
                .writer(digest, Some(layer.size))
                .map_err(|source| RegistryError::Cache {
                    digest: digest.clone(),
                    source: CacheError::Io(banger_io::IoError::new(
                        "create blob file",
                        cache.root().to_owned(),
                        source,
                    )),
                })?;
        // File writes happen on a blocking thread so a slow disk does not stall the runtime;
        // the channel bounds how much downloaded data can queue up in memory.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let writing = tokio::task::spawn_blocking(move || write_blob(writer, rx));

        let mut received = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.stream_error(e, digest, reference, action()))?;
            received += chunk.len() as u64;
            if received > layer.size {
                // Stop at once: a registry streaming without end must not fill the disk.
                return Err(RegistryError::SizeMismatch {
                    digest: digest.clone(),
                    expected: layer.size,
                    actual: received,
                });
            }
            if tx.send(Chunk::Data(chunk)).await.is_err() {
                break; // the writer failed; its error is collected below
            }
            progress(received);
        }
        let _ = tx.send(Chunk::Commit).await;
        drop(tx);
        let committed = writing.await.expect("blob writer thread panicked");
        match committed {
            Ok(()) => Ok(received),
            Err(CacheError::DigestMismatch { expected, actual }) => {
                Err(RegistryError::DigestMismatch {
                    digest: expected,
                    actual: actual.to_string(),
                })
            }
            Err(CacheError::SizeMismatch {
                digest,
                expected,
                actual,
            }) => Err(RegistryError::SizeMismatch {
                digest,
                expected,
                actual,
            }),
            Err(source) => Err(RegistryError::Cache {
                digest: digest.clone(),
                source,
            }),
        }
    }

    /// Resolves `reference`, leases its config and layers in `cache`, and fetches whatever
    /// is missing, a few layers at a time. `progress` gets each layer's digest and bytes
    /// received so far. The returned lease keeps the blobs from being pruned.
    pub async fn pull_to_cache(
        &self,
        reference: &ImageRef,
        cache: &Arc<BlobCache>,
        progress: impl Fn(&Digest, u64) + Sync,
    ) -> Result<PulledImage, RegistryError> {
        let image = self.resolve(reference).await?;
        // Lease first: a prune running while we download must not delete finished layers.
        let lease = cache.lease(
            std::iter::once(image.config_digest.clone())
                .chain(image.layers.iter().map(|l| l.digest.clone())),
        );
        if !cache.contains(&image.config_digest) {
            store_bytes(cache, &image.config_digest, &image.raw_config)?;
        }
        // Images may repeat a layer (e.g. identical empty layers); fetch each digest once.
        let mut seen = HashSet::new();
        let unique: Vec<&LayerDescriptor> = image
            .layers
            .iter()
            .filter(|l| seen.insert(&l.digest))
            .collect();
        let progress = &progress;
        // The futures are built up front rather than in a `StreamExt::map` closure: a closure
        // there makes the whole future's `Send`-ness depend on higher-ranked lifetimes that
        // rustc cannot prove, and the daemon needs to spawn this.
        let fetches: Vec<_> = unique
            .into_iter()
            .map(|layer| {
                self.fetch_blob_into_cache(reference, layer, cache, move |bytes| {
                    progress(&layer.digest, bytes)
                })
            })
            .collect();
        futures::stream::iter(fetches)
            .buffer_unordered(MAX_PARALLEL_FETCHES)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(PulledImage { image, lease })
    }
}

/// Messages to the blob writer thread. Generic over the chunk type so the writer does not
/// have to name oci-client's byte buffer type.
enum Chunk<B> {
    Data(B),
    Commit,
}

/// Writes chunks until told to commit. If the sender goes away first (the download failed
/// or was cancelled) the unnamed file is dropped and nothing becomes visible.
fn write_blob<B: AsRef<[u8]>>(
    mut writer: crate::cache::BlobWriter,
    mut rx: tokio::sync::mpsc::Receiver<Chunk<B>>,
) -> Result<(), CacheError> {
    let io = |source| {
        CacheError::Io(banger_io::IoError::new(
            "write blob",
            PathBuf::from("<unnamed>"),
            source,
        ))
    };
    while let Some(chunk) = rx.blocking_recv() {
        match chunk {
            Chunk::Data(bytes) => writer.write_all(bytes.as_ref()).map_err(io)?,
            Chunk::Commit => return writer.commit().map(drop),
        }
    }
    Err(io(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        "download aborted",
    )))
}

/// Stores small in-memory content (the config) in the cache, verified like any blob.
fn store_bytes(cache: &Arc<BlobCache>, digest: &Digest, bytes: &[u8]) -> Result<(), RegistryError> {
    let cache_err = |source| RegistryError::Cache {
        digest: digest.clone(),
        source,
    };
    let io = |source| {
        cache_err(CacheError::Io(banger_io::IoError::new(
            "write blob",
            cache.blob_path(digest),
            source,
        )))
    };
    let mut writer = cache.writer(digest, Some(bytes.len() as u64)).map_err(io)?;
    writer.write_all(bytes).map_err(io)?;
    writer.commit().map_err(cache_err)?;
    Ok(())
}

/// Reads a response body up to `limit` bytes; `None` when it is longer (the rest is never
/// read: the connection is dropped).
async fn read_capped(
    response: reqwest::Response,
    limit: u64,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The oci-client error a non-200 answer stands for (as oci-client would report it).
fn registry_status_error(
    status: reqwest::StatusCode,
    body: &[u8],
    url: &str,
) -> OciDistributionError {
    if status == reqwest::StatusCode::UNAUTHORIZED {
        return OciDistributionError::UnauthorizedError {
            url: url.to_owned(),
        };
    }
    if status.is_client_error() {
        if let Ok(envelope) = serde_json::from_slice::<oci_client::errors::OciEnvelope>(body) {
            return OciDistributionError::RegistryError {
                envelope,
                url: url.to_owned(),
            };
        }
    }
    OciDistributionError::ServerError {
        code: status.as_u16(),
        url: url.to_owned(),
        message: String::from_utf8_lossy(body).into_owned(),
    }
}

/// Whether a timeout is anywhere in `error`'s chain.
/// A reference's own manifest and what fetched it (see
/// [`RegistryClient::fetch_top_manifest`]).
pub(super) struct TopManifest {
    pub(super) client: oci_client::Client,
    pub(super) authorization: Option<String>,
    pub(super) body: Vec<u8>,
    pub(super) digest: Digest,
}

/// Content fetched by the digest `expected` hashes to `actual`, or a
/// [`RegistryError::DigestMismatch`] saying what it hashed to.
fn expect_digest(expected: &Digest, actual: &Digest) -> Result<(), RegistryError> {
    if actual == expected {
        return Ok(());
    }
    Err(RegistryError::DigestMismatch {
        digest: expected.clone(),
        actual: actual.to_string(),
    })
}

fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_timeout())
            || e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// Loopback hosts and explicitly configured ones may use plain HTTP.
fn allows_plain_http(host: &str, insecure: &[String]) -> bool {
    let name = host_without_port(host);
    if insecure
        .iter()
        .any(|entry| entry.eq_ignore_ascii_case(host) || entry.eq_ignore_ascii_case(name))
    {
        return true;
    }
    name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Translates oci-client's errors into ours, recognising auth failures and missing things.
fn map_oci_error(
    error: OciDistributionError,
    reference: &ImageRef,
    blob: Option<&Digest>,
    action: String,
) -> RegistryError {
    let registry = reference.registry_host().to_owned();
    let not_found = || match blob {
        Some(digest) => RegistryError::BlobNotFound {
            digest: digest.clone(),
            reference: reference.to_string(),
        },
        None => RegistryError::NotFound {
            reference: reference.to_string(),
        },
    };
    match &error {
        OciDistributionError::UnauthorizedError { .. } => RegistryError::Unauthorized {
            registry,
            detail: "HTTP 401".to_owned(),
        },
        OciDistributionError::AuthenticationFailure(reason) => RegistryError::Unauthorized {
            registry,
            detail: format!("token request failed: {}", reason.trim()),
        },
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                RegistryError::Unauthorized {
                    registry,
                    detail: envelope.to_string(),
                }
            } else if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else {
                RegistryError::Transport {
                    action,
                    registry,
                    source: error,
                }
            }
        }
        OciDistributionError::ServerError {
            code: 401 | 403,
            message,
            ..
        } => RegistryError::Unauthorized {
            registry,
            detail: message.trim().to_owned(),
        },
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::DigestError(OciDigestError::VerificationError { actual, .. }) => {
            match blob.cloned().or_else(|| reference.digest()) {
                Some(digest) => RegistryError::DigestMismatch {
                    digest,
                    actual: actual.clone(),
                },
                None => RegistryError::Transport {
                    action,
                    registry,
                    source: error,
                },
            }
        }
        _ => RegistryError::Transport {
            action,
            registry,
            source: error,
        },
    }
}

/// oci-client reports a digest mismatch at the end of a blob stream as an I/O error
/// wrapping its `DigestError`; anything else there is a transport failure.
fn stream_error(
    error: std::io::Error,
    digest: &Digest,
    reference: &ImageRef,
    action: String,
) -> RegistryError {
    if let Some(OciDigestError::VerificationError { actual, .. }) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<OciDigestError>())
    {
        return RegistryError::DigestMismatch {
            digest: digest.clone(),
            actual: actual.clone(),
        };
    }
    RegistryError::Transport {
        action,
        registry: reference.registry_host().to_owned(),
        source: OciDistributionError::IoError(error),
    }
}

fn invalid(
    reference: &ImageRef,
    what: &'static str,
    reason: impl std::fmt::Display,
) -> RegistryError {
    RegistryError::Invalid {
        reference: reference.to_string(),
        what,
        reason: reason.to_string(),
    }
}

/// The parts of manifests and indexes we use; unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    manifests: Option<Vec<RawDescriptor>>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
    urls: Option<Vec<String>>,
    platform: Option<RawPlatform>,
}

impl RawDescriptor {
    fn as_oci(&self) -> oci_client::manifest::OciDescriptor {
        oci_client::manifest::OciDescriptor {
            media_type: self.media_type.clone().unwrap_or_default(),
            digest: self.digest.clone(),
            size: self.size,
            urls: self.urls.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawPlatform {
    os: String,
    architecture: String,
    variant: Option<String>,
}

struct ImageManifest {
    config: RawDescriptor,
    layers: Vec<RawDescriptor>,
}

enum Manifest {
    Image(ImageManifest),
    Index(Vec<RawDescriptor>),
}

fn parse_manifest(body: &[u8], reference: &ImageRef) -> Result<Manifest, RegistryError> {
    let raw: RawManifest =
        serde_json::from_slice(body).map_err(|e| invalid(reference, "manifest", e))?;
    if raw.schema_version != Some(2) {
        return Err(invalid(
            reference,
            "manifest",
            format!(
                "schemaVersion {:?}, only 2 is supported",
                raw.schema_version
            ),
        ));
    }
    let is_index = match raw.media_type.as_deref() {
        Some(media::OCI_IMAGE_INDEX_MEDIA_TYPE | media::IMAGE_MANIFEST_LIST_MEDIA_TYPE) => true,
        Some(media::OCI_IMAGE_MEDIA_TYPE | media::IMAGE_MANIFEST_MEDIA_TYPE) => false,
        // OCI allows omitting mediaType; tell the two apart by shape.
        None => raw.manifests.is_some(),
        Some(other) => {
            return Err(RegistryError::UnsupportedMediaType {
                reference: reference.to_string(),
                what: "manifest",
                media_type: other.to_owned(),
            })
        }
    };
    if is_index {
        let manifests = raw
            .manifests
            .ok_or_else(|| invalid(reference, "image index", "no `manifests`"))?;
        return Ok(Manifest::Index(manifests));
    }
    let config = raw
        .config
        .ok_or_else(|| invalid(reference, "manifest", "no `config`"))?;
    let layers = raw
        .layers
        .ok_or_else(|| invalid(reference, "manifest", "no `layers`"))?;
    Ok(Manifest::Image(ImageManifest { config, layers }))
}

/// Picks the linux/amd64 entry of an index, preferring one without a variant (the baseline
/// every amd64 CPU runs).
fn pick_platform(entries: &[RawDescriptor], reference: &ImageRef) -> Result<Digest, RegistryError> {
    let amd64 = |e: &&RawDescriptor| {
        e.platform
            .as_ref()
            .is_some_and(|p| p.os == WANTED_OS && p.architecture == WANTED_ARCH)
    };
    let chosen = entries.iter().filter(amd64).min_by_key(|e| {
        e.platform
            .as_ref()
            .and_then(|p| p.variant.as_deref())
            .is_some_and(|v| v != "v1")
    });
    match chosen {
        Some(entry) => descriptor_digest(entry, reference, "image index"),
        None => {
            let mut available: Vec<String> = entries
                .iter()
                .filter_map(|e| e.platform.as_ref())
                // Attestation manifests in buildx indexes claim unknown/unknown.
                .filter(|p| p.os != "unknown")
                .map(|p| match &p.variant {
                    Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
                    None => format!("{}/{}", p.os, p.architecture),
                })
                .collect();
            available.dedup();
            Err(RegistryError::NoMatchingPlatform {
                reference: reference.to_string(),
                available,
            })
        }
    }
}

fn descriptor_digest(
    descriptor: &RawDescriptor,
    reference: &ImageRef,
    what: &'static str,
) -> Result<Digest, RegistryError> {
    descriptor
        .digest
        .parse()
        .map_err(|e| invalid(reference, what, e))
}

fn descriptor_size(descriptor: &RawDescriptor, reference: &ImageRef) -> Result<u64, RegistryError> {
    u64::try_from(descriptor.size).map_err(|_| {
        invalid(
            reference,
            "manifest",
            format!("negative size for {}", descriptor.digest),
        )
    })
}

fn layer_descriptor(
    layer: &RawDescriptor,
    reference: &ImageRef,
) -> Result<LayerDescriptor, RegistryError> {
    let media_type = layer.media_type.clone().unwrap_or_default();
    let compression = LayerCompression::from_media_type(&media_type).ok_or_else(|| {
        RegistryError::UnsupportedMediaType {
            reference: reference.to_string(),
            what: "layer",
            media_type: media_type.clone(),
        }
    })?;
    Ok(LayerDescriptor {
        digest: descriptor_digest(layer, reference, "manifest")?,
        size: descriptor_size(layer, reference)?,
        media_type,
        compression,
        urls: layer.urls.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_for_loopback_and_configured_hosts() {
        let insecure = vec!["registry.lan:5000".to_owned(), "mirror.lan".to_owned()];
        for host in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost",
            "localhost:5000",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(allows_plain_http(host, &[]), "{host}");
        }
        for host in ["registry.lan:5000", "mirror.lan", "mirror.lan:443"] {
            assert!(allows_plain_http(host, &insecure), "{host}");
        }
        for host in [
            "index.docker.io",
            "ghcr.io",
            "registry.lan:5001",
            "10.0.0.1:5000",
            "localhost.evil.com",
            "[::2]:5000",
        ] {
            assert!(!allows_plain_http(host, &insecure), "{host}");
        }
    }

    /// The daemon spawns pulls onto its runtime, so the futures must be `Send`; this only
    /// has to compile.
    #[allow(dead_code)]
    fn futures_are_send(
        client: &RegistryClient,
        reference: &ImageRef,
        layer: &LayerDescriptor,
        cache: &Arc<BlobCache>,
    ) {
        fn send<T: Send>(_: T) {}
        send(client.resolve(reference));
        send(client.fetch_blob_into_cache(reference, layer, cache, |_| {}));
        send(client.pull_to_cache(reference, cache, |_, _| {}));
    }

    #[test]
    fn layer_media_types() {
        use LayerCompression::*;
        let c = LayerCompression::from_media_type;
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar"), Some(None));
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar+gzip"), Some(Gzip));
        assert_eq!(c("application/vnd.oci.image.layer.v1.tar+zstd"), Some(Zstd));
        assert_eq!(
            c("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Gzip)
        );
        assert_eq!(c("application/vnd.in-toto+json"), Option::None);
    }

    #[test]
    fn platform_choice_prefers_plain_amd64_and_lists_alternatives() {
        let r = ImageRef::parse("x").unwrap();
        let entry = |arch: &str, variant: Option<&str>, byte: u8| RawDescriptor {
            media_type: None,
            digest: Digest::of(&[byte]).to_string(),
            size: 1,
            urls: None,
            platform: Some(RawPlatform {
                os: "linux".into(),
                architecture: arch.into(),
                variant: variant.map(Into::into),
            }),
        };
        let entries = vec![
            entry("amd64", Some("v3"), 1),
            entry("amd64", None, 2),
            entry("arm64", Some("v8"), 3),
        ];
        assert_eq!(pick_platform(&entries, &r).unwrap(), Digest::of(&[2]));
        let err = pick_platform(&entries[2..], &r).unwrap_err().to_string();
        assert!(
            err.contains("linux/arm64/v8") && err.contains("docker.io/library/x:latest"),
            "{err}"
        );
    }
}
