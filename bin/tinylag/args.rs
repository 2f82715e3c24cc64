//! Argument types shared by the subcommands: the journal location, S3 options, and the
//! value parsers that turn `4G` / `200ms` / times into numbers with errors that name the form.

use std::sync::Arc;

use clap::Args;
use tinylag::store::{open_store, ObjectStore, S3Options, StoreUri};

/// Where the journal is and how to reach S3.
#[derive(Debug, Clone, Args)]
pub struct JournalArgs {
    /// Journal location: /path, file:///path, s3://bucket/prefix or mem://name.
    #[arg(long, value_name = "URI", value_parser = parse_store_uri)]
    pub journal: StoreUri,
    #[command(flatten)]
    pub s3: S3Args,
}

/// S3 connection options. Credentials come from the standard AWS chain only.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint URL (default: AWS, or the standard AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: the standard AWS chain, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Force path-style addressing (automatic for IP and localhost endpoints).
    #[arg(long)]
    pub s3_path_style: bool,
}

impl S3Args {
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            force_path_style: self.s3_path_style,
        }
    }
}

impl JournalArgs {
    pub async fn open(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(open_store(&self.journal, &self.s3.options()).await?)
    }
}

pub fn parse_store_uri(s: &str) -> Result<StoreUri, String> {
    s.parse::<StoreUri>().map_err(|e| e.to_string())
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    tinylag::units::parse_size(s)
}

pub fn parse_time(s: &str) -> Result<u64, String> {
    tinylag::clock::parse_time(s, &tinylag::clock::SystemClock)
}
