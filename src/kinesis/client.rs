//! Builds the AWS SDK Kinesis client of an integration: region, credentials
//! (static keys, instance metadata, or the standard chain), endpoint URL
//! and request timeout.

use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_kinesis::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_kinesis::Client;
use aws_smithy_types::timeout::TimeoutConfig;

use crate::config::IntegrationConfig;

/// Builds the client. Static keys win; `use_instance_metadata` asks EC2's
/// instance metadata service; otherwise the standard AWS credential chain
/// (environment, shared profile, web identity, container, instance
/// metadata) is used.
pub async fn build(config: &IntegrationConfig) -> Client {
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
    if let Some(url) = &config.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    Client::new(&loader.load().await)
}
