//! The writer under every log line: blanks AWS credentials the SDK's own debug output
//! carries (its `Credentials` debug text shows the access key id, e.g. in aws-smithy-runtime's
//! "resolving endpoint" event; a signed request carries it in `Credential=AKID/…`).
//!
//! Must never: let a line through unredacted, or split or reorder lines (one event is
//! buffered whole and written with one call).

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;

/// What stands in for a credential.
const REDACTED: &str = "** redacted **";

/// The text right before a credential in the SDK's debug output; the credential runs from
/// there (after an optional quote) to the next quote, slash, comma or space.
const MARKERS: [&str; 4] = [
    "access_key_id: ",
    "access_key_id=",
    "Credential=",
    "session_token: ",
];

/// Hands the log layer a buffer per event, written to stderr redacted when dropped.
pub struct RedactingStderr;

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> EventBuffer {
        EventBuffer(Vec::new())
    }
}

pub struct EventBuffer(Vec<u8>);

impl Write for EventBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        let text = redact(&String::from_utf8_lossy(&self.0));
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// `text` with every credential after one of [`MARKERS`] replaced by [`REDACTED`].
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((at, marker)) = MARKERS
        .iter()
        .filter_map(|m| rest.find(m).map(|i| (i, *m)))
        .min_by_key(|(i, _)| *i)
    {
        let value_start = at + marker.len();
        out.push_str(&rest[..value_start]);
        let mut tail = &rest[value_start..];
        // An opening quote, possibly escaped (JSON lines quote the debug text again).
        for quote in ["\\\"", "\""] {
            if let Some(t) = tail.strip_prefix(quote) {
                out.push_str(quote);
                tail = t;
                break;
            }
        }
        if let Some(t) = tail.strip_prefix(REDACTED) {
            out.push_str(REDACTED);
            rest = t;
            continue;
        }
        let end = tail
            .find(['"', '\\', '/', ',', ' ', '\n'])
            .unwrap_or(tail.len());
        if end > 0 {
            out.push_str(REDACTED);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn credentials_in_debug_text_are_blanked() {
        let debug = r#"Credentials { provider_name: "EnvironmentVariable", access_key_id: "AKIDEXAMPLE", secret_access_key: "** redacted **" }"#;
        let out = redact(debug);
        assert!(!out.contains("AKIDEXAMPLE"), "{out}");
        assert!(out.contains(r#"access_key_id: "** redacted **""#), "{out}");
        // As a JSON string field, quotes escaped.
        let json = serde_json::json!({ "params": debug }).to_string();
        let out = redact(&json);
        assert!(!out.contains("AKIDEXAMPLE"), "{out}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&out).is_ok(),
            "{out}"
        );
        // A signed request's Authorization header.
        let auth = "authorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/s3/aws4_request, SignedHeaders=host";
        let out = redact(auth);
        assert!(!out.contains("AKIDEXAMPLE"), "{out}");
        assert!(out.contains("Credential=** redacted **/20260101"), "{out}");
        // Nothing else changes.
        let plain = "tinylag serve: primary.img (64.0 MiB) as nbd+unix:///disk0";
        assert_eq!(redact(plain), plain);
    }
}
