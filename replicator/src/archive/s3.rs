//! The archive on any S3-compatible store (AWS, MinIO, Ceph RGW, moto),
//! through `aws-sdk-s3`. Credentials come from the standard AWS chain
//! (environment, profile, SSO, instance metadata); an explicit endpoint
//! switches to path-style addressing, which every S3-compatible server
//! understands. Objects larger than [`MULTIPART_THRESHOLD`] go up in parts,
//! and a failed multipart upload is aborted so no part is left behind.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use super::error::{ArchiveError, Result};
use super::store::{ObjectInfo, ObjectStore, StoreOptions};

/// Objects above this size are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// The size of each part of a multipart upload.
pub const PART_SIZE: usize = 8 << 20;

/// An S3 bucket and prefix.
#[derive(Debug)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
}

impl S3Store {
    /// A client for `bucket`/`prefix` (no request is made yet).
    pub async fn connect(bucket: &str, prefix: &str, options: &StoreOptions) -> Self {
        let region = match &options.region {
            Some(region) => RegionProviderChain::first_try(Region::new(region.clone())),
            None => RegionProviderChain::default_provider().or_else(Region::new("us-east-1")),
        };
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(options.timeout.unwrap_or(Duration::from_secs(60)))
            .build();
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .load()
            .await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            // S3-compatible servers differ in which request checksums they
            // take; send them only where S3 requires them. Objects carry
            // their own checksums, which every read verifies.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        S3Store {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        }
    }

    /// Every page of a ListObjectsV2 of `prefix` (grouped at `delimiter`),
    /// each handed to `visit`, following continuation tokens.
    async fn list_pages(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        mut visit: impl FnMut(&ListObjectsV2Output),
    ) -> Result<()> {
        let mut token = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| self.failed("ListObjectsV2", prefix, e))?;
            visit(&page);
            token = page.next_continuation_token().map(str::to_string);
            if token.is_none() || page.is_truncated() != Some(true) {
                return Ok(());
            }
        }
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn failed<E, R>(&self, op: &'static str, key: &str, e: SdkError<E, R>) -> ArchiveError
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
        R: std::fmt::Debug,
    {
        // The service's own code and message say most (AccessDenied,
        // NoSuchBucket, InvalidAccessKeyId); the context chain says the
        // rest (a refused connection, a timeout).
        let detail = match e.as_service_error() {
            Some(service) => format!(
                "{}: {}",
                service.code().unwrap_or("error"),
                service.message().unwrap_or("no message")
            ),
            None => DisplayErrorContext(&e).to_string(),
        };
        ArchiveError::Store {
            location: self.location(),
            op,
            key: key.to_string(),
            detail,
        }
    }

    async fn put_multipart(&self, key: &str, body: Bytes) -> Result<()> {
        let full = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.failed("CreateMultipartUpload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let result = async {
            let mut parts = Vec::new();
            for (n, part) in body.chunks(PART_SIZE).enumerate() {
                let number = n as i32 + 1;
                let sent = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(&full)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(body.slice_ref(part)))
                    .send()
                    .await
                    .map_err(|e| self.failed("UploadPart", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(sent.e_tag().map(str::to_string))
                        .build(),
                );
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| self.failed("CompleteMultipartUpload", key, e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Best effort: a part left behind costs money, not correctness.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result
    }

    /// GetObject of `key`, whole or of `range` (an HTTP Range value).
    async fn fetch(&self, key: &str, range: Option<String>) -> Result<Bytes> {
        let got = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_range(range)
            .send()
            .await;
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
                if missing {
                    return Err(ArchiveError::NotFound {
                        location: self.location(),
                        key: key.to_string(),
                    });
                }
                return Err(self.failed("GetObject", key, e));
            }
        };
        let body = got.body.collect().await.map_err(|e| ArchiveError::Store {
            location: self.location(),
            op: "GetObject",
            key: key.to_string(),
            detail: format!("reading the body: {e}"),
        })?;
        Ok(body.into_bytes())
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix.trim_end_matches('/'))
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        if body.len() > MULTIPART_THRESHOLD {
            return self.put_multipart(key, body).await;
        }
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.failed("PutObject", key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        self.fetch(key, None).await
    }

    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let last = start.saturating_add(len) - 1;
        self.fetch(key, Some(format!("bytes={start}-{last}"))).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        self.list_pages(prefix, None, |page| {
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                out.push(ObjectInfo {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                });
            }
        })
        .await?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>> {
        let full = self.full_key(prefix);
        let mut out = Vec::new();
        self.list_pages(prefix, Some("/"), |page| {
            for common in page.common_prefixes() {
                if let Some(name) = common
                    .prefix()
                    .and_then(|p| p.strip_prefix(&full))
                    .map(|p| p.trim_end_matches('/'))
                    .filter(|p| !p.is_empty())
                {
                    out.push(name.to_string());
                }
            }
        })
        .await?;
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.failed("DeleteObject", key, e))?;
        Ok(())
    }
}
