//! Builds the AWS SDK Kinesis client of an integration: region, credentials,
//! endpoint URL and request timeout.
//!
//! Credentials, through aws-config: static keys from the config; or, with
//! `use_instance_metadata`, the EC2 instance metadata service only; or else
//! the standard chain (environment variables, shared profile, web identity
//! token, container credentials, instance metadata). With `role_arn`, those
//! credentials call STS AssumeRole (with `external_id` and
//! `role_session_name`), and the role's credentials, refreshed before they
//! expire, sign the Kinesis calls. The endpoint follows the region's
//! partition (`amazonaws.com.cn` for China, the GovCloud endpoints for
//! `us-gov-*`) unless `endpoint_url` is set; `endpoint_url` applies to
//! Kinesis only, and `sts_endpoint_url` to STS.

use std::time::Duration;

use aws_config::sts::AssumeRoleProvider;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_sdk_kinesis::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_kinesis::Client;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::config::IntegrationConfig;

/// Builds the client (no network call is made here).
pub async fn build(config: &IntegrationConfig) -> Client {
    let base = base_config(config).await;
    let mut kinesis = aws_sdk_kinesis::config::Builder::from(&base);
    if let Some(role) = &config.role_arn {
        let provider = assume_role(config, role, &base).await;
        kinesis = kinesis.credentials_provider(provider);
    }
    if let Some(url) = &config.endpoint_url {
        kinesis = kinesis.endpoint_url(url);
    }
    Client::from_conf(kinesis.build())
}

/// Region, timeouts and the (base) credentials; no endpoint override, so
/// that STS is not sent to a Kinesis endpoint.
async fn base_config(config: &IntegrationConfig) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_millis(config.request_timeout_ms.min(10_000)))
                .operation_attempt_timeout(Duration::from_millis(config.request_timeout_ms))
                .build(),
        );
    if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
        let credentials = Credentials::new(id, secret.expose(), None, None, "shardflow-config");
        loader = loader.credentials_provider(SharedCredentialsProvider::new(credentials));
    } else if config.use_instance_metadata {
        let provider = aws_config::imds::credentials::ImdsCredentialsProvider::builder().build();
        loader = loader.credentials_provider(SharedCredentialsProvider::new(provider));
    }
    loader.load().await
}

async fn assume_role(
    config: &IntegrationConfig,
    role: &str,
    base: &SdkConfig,
) -> AssumeRoleProvider {
    let mut sts = base.to_builder();
    if let Some(url) = &config.sts_endpoint_url {
        sts = sts.endpoint_url(url);
    }
    let session_name = config
        .role_session_name
        .clone()
        .unwrap_or_else(|| default_session_name(&config.name));
    let mut provider = AssumeRoleProvider::builder(role)
        .configure(&sts.build())
        .session_name(session_name);
    if let Some(id) = &config.external_id {
        provider = provider.external_id(id);
    }
    provider.build().await
}

/// `shardflow-<integration>`, with the characters STS refuses replaced.
fn default_session_name(integration: &str) -> String {
    let name: String = format!("shardflow-{integration}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "+=,.@_-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    name
}

/// The Kinesis endpoint the SDK resolves for a region (its partition's
/// DNS suffix), without any network call.
pub async fn region_endpoint(region: &str) -> Result<String, String> {
    let params = Params::builder()
        .region(region)
        .use_fips(false)
        .use_dual_stack(false)
        .build()
        .map_err(|e| e.to_string())?;
    let endpoint = DefaultResolver::new()
        .resolve_endpoint(&params)
        .await
        .map_err(|e| e.to_string())?;
    Ok(endpoint.url().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn regions_outside_the_standard_partition_resolve_to_their_own_endpoints() {
        assert_eq!(
            region_endpoint("cn-north-1").await.unwrap(),
            "https://kinesis.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            region_endpoint("cn-northwest-1").await.unwrap(),
            "https://kinesis.cn-northwest-1.amazonaws.com.cn"
        );
        assert_eq!(
            region_endpoint("us-gov-west-1").await.unwrap(),
            "https://kinesis.us-gov-west-1.amazonaws.com"
        );
        assert_eq!(
            region_endpoint("eu-west-1").await.unwrap(),
            "https://kinesis.eu-west-1.amazonaws.com"
        );
    }

    #[tokio::test]
    async fn the_client_resolves_its_region_to_the_partition_endpoint() {
        let text = r#"
            [[integration]]
            name = "china"
            uplink_converter = "Cargo.toml"
            stream_name = "s"
            region = "cn-north-1"
            access_key_id = "a"
            secret_access_key = "b"
        "#;
        let config =
            crate::config::Config::parse(text, std::path::Path::new(env!("CARGO_MANIFEST_DIR")))
                .unwrap();
        let client = build(&config.integrations[0]).await;
        let region = client.config().region().unwrap().to_string();
        assert_eq!(
            region_endpoint(&region).await.unwrap(),
            "https://kinesis.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn session_names_are_made_valid() {
        assert_eq!(
            default_session_name("kinesis integration/1"),
            "shardflow-kinesis-integration-1"
        );
        assert!(crate::config::valid_session_name(&default_session_name(
            &"x".repeat(100)
        )));
    }
}
