//! Resolving an OCI *artifact*: one image manifest whose blobs are files (a kernel, a
//! modules tarball…) rather than filesystem layers, told apart by their media types. The
//! manifest is read with the same bounds and digest checks as an image's; the blobs are
//! then fetched with [`RegistryClient::fetch_blob_into_cache`], verified like layers.

use serde::Deserialize;

use super::{
    descriptor_digest, descriptor_size, invalid, parse_manifest, LayerCompression, LayerDescriptor,
    Manifest, RegistryClient, RegistryError,
};
use crate::digest::Digest;
use crate::reference::ImageRef;

/// Most blobs one artifact manifest may list.
pub const MAX_ARTIFACT_BLOBS: usize = 16;

/// A reference resolved to an artifact manifest.
#[derive(Debug, Clone)]
pub struct ResolvedArtifact {
    /// The reference as given.
    pub reference: ImageRef,
    /// Digest of the manifest (checked against a pinned reference).
    pub manifest_digest: Digest,
    /// The manifest's `artifactType`, if it has one.
    pub artifact_type: Option<String>,
    /// The media type of the manifest's config descriptor.
    pub config_media_type: String,
    /// The manifest's `layers`, in order; `compression` is [`LayerCompression::None`]
    /// (a blob is fetched as it is stored).
    pub blobs: Vec<LayerDescriptor>,
}

impl ResolvedArtifact {
    /// Whether the manifest declares itself to be of `kind`, by `artifactType` or, for
    /// registries and tools without that field, by its config's media type.
    pub fn is(&self, kind: &str) -> bool {
        self.artifact_type.as_deref() == Some(kind) || self.config_media_type == kind
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactFields {
    artifact_type: Option<String>,
}

impl RegistryClient {
    /// Resolves `reference` to one artifact manifest (an index is refused: an artifact
    /// has no platforms to choose from). At most [`MAX_ARTIFACT_BLOBS`] blobs.
    pub async fn resolve_artifact(
        &self,
        reference: &ImageRef,
    ) -> Result<ResolvedArtifact, RegistryError> {
        let super::TopManifest {
            body,
            digest: manifest_digest,
            ..
        } = self.fetch_top_manifest(reference).await?;
        let manifest = match parse_manifest(&body, reference)? {
            Manifest::Image(manifest) => manifest,
            Manifest::Index(_) => {
                return Err(invalid(
                    reference,
                    "artifact manifest",
                    "an image index, not one artifact manifest",
                ))
            }
        };
        let fields: ArtifactFields =
            serde_json::from_slice(&body).map_err(|e| invalid(reference, "manifest", e))?;
        if manifest.layers.len() > MAX_ARTIFACT_BLOBS {
            return Err(invalid(
                reference,
                "artifact manifest",
                format!(
                    "{} blobs, more than MAX_ARTIFACT_BLOBS ({MAX_ARTIFACT_BLOBS})",
                    manifest.layers.len()
                ),
            ));
        }
        let blobs = manifest
            .layers
            .iter()
            .map(|blob| {
                Ok(LayerDescriptor {
                    digest: descriptor_digest(blob, reference, "manifest")?,
                    size: descriptor_size(blob, reference)?,
                    media_type: blob.media_type.clone().unwrap_or_default(),
                    compression: LayerCompression::None,
                    urls: None,
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        Ok(ResolvedArtifact {
            reference: reference.clone(),
            manifest_digest,
            artifact_type: fields.artifact_type,
            config_media_type: manifest.config.media_type.clone().unwrap_or_default(),
            blobs,
        })
    }
}
