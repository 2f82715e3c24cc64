//! Local S3 servers (s3s-fs, moto) for tests.
