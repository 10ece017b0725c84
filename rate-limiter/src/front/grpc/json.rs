//! envoyproxy/ratelimit's `POST /json`: the same call as `ShouldRateLimit`, in the proto3
//! JSON mapping its Go server uses (`protojson`), so scripts written for it keep working.
//!
//! The request takes the proto field names and their lowerCamelCase JSON names
//! (`hits_addend` and `hitsAddend`), integers as numbers or strings; an unknown field is a
//! mistake, as with `protojson`. The answer is what `protojson.Marshal` writes: lowerCamelCase,
//! enums by name, durations as `"1.500s"`, zero values left out; the status is 200 for
//! `OK`, 429 for `OVER_LIMIT` (theirs). Differences: a mistake is a 400 with our JSON error
//! body naming the field (theirs: a bare 400), and a store that is unavailable in
//! fail-closed mode is a 503 (theirs: 400).

use domain::api::FieldError;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use serde::Deserialize;
use serde_json::{Map, Value, json};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestWire {
    #[serde(default)]
    domain: String,
    #[serde(default)]
    descriptors: Vec<DescriptorWire>,
    #[serde(default, alias = "hitsAddend")]
    hits_addend: Option<Number>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DescriptorWire {
    #[serde(default)]
    entries: Vec<EntryWire>,
    #[serde(default)]
    limit: Option<Value>,
    #[serde(default, alias = "hitsAddend")]
    hits_addend: Option<Number>,
    #[serde(default, alias = "isNegativeHits")]
    is_negative_hits: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryWire {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

/// A proto3 JSON integer: a number or a decimal string.
#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Int(u64),
    Text(String),
}

impl Number {
    fn get(&self, field: &str) -> Result<u64, FieldError> {
        match self {
            Number::Int(n) => Ok(*n),
            Number::Text(s) => s
                .parse()
                .map_err(|_| FieldError::new(field, "must be a non-negative integer")),
        }
    }
}

/// Decodes a `/json` body into the protocol's request (validated later, as a gRPC call is).
pub fn request(body: &[u8]) -> Result<RateLimitRequest, FieldError> {
    let wire: RequestWire = domain::api::decode(body)?;
    let hits_addend = match &wire.hits_addend {
        Some(n) => u32::try_from(n.get("hits_addend")?)
            .map_err(|_| FieldError::new("hits_addend", "must fit in 32 bits"))?,
        None => 0,
    };
    let descriptors = wire
        .descriptors
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let hits_addend = d
                .hits_addend
                .map(|n| n.get(&format!("descriptors[{i}].hits_addend")))
                .transpose()?
                .map(|value| UInt64Value { value });
            // Any override is refused when the call is validated; its shape does not matter.
            let limit = d
                .limit
                .map(|_| rate_limit_descriptor::RateLimitOverride::default());
            Ok(RateLimitDescriptor {
                entries: d
                    .entries
                    .into_iter()
                    .map(|e| rate_limit_descriptor::Entry {
                        key: e.key,
                        value: e.value,
                    })
                    .collect(),
                limit,
                hits_addend,
                is_negative_hits: d.is_negative_hits,
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    Ok(RateLimitRequest {
        domain: wire.domain,
        descriptors,
        hits_addend,
    })
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code).unwrap_or(Code::Unknown).as_str_name()
}

/// A duration as proto3 JSON writes it: seconds with 0, 3, 6 or 9 decimals and an `s`.
fn duration(d: &envoy_types::pb::google::protobuf::Duration) -> String {
    let nanos = d.nanos.unsigned_abs();
    if nanos == 0 {
        format!("{}s", d.seconds)
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{}.{:03}s", d.seconds, nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{}.{:06}s", d.seconds, nanos / 1_000)
    } else {
        format!("{}.{:09}s", d.seconds, nanos)
    }
}

fn status(s: &DescriptorStatus) -> Value {
    let mut out = Map::new();
    if s.code != 0 {
        out.insert("code".into(), json!(code_name(s.code)));
    }
    if let Some(limit) = &s.current_limit {
        let mut l = Map::new();
        if !limit.name.is_empty() {
            l.insert("name".into(), json!(limit.name));
        }
        if limit.requests_per_unit != 0 {
            l.insert("requestsPerUnit".into(), json!(limit.requests_per_unit));
        }
        if limit.unit != 0 {
            let unit = Unit::try_from(limit.unit).unwrap_or(Unit::Unknown);
            l.insert("unit".into(), json!(unit.as_str_name()));
        }
        out.insert("currentLimit".into(), Value::Object(l));
    }
    if s.limit_remaining != 0 {
        out.insert("limitRemaining".into(), json!(s.limit_remaining));
    }
    if let Some(d) = &s.duration_until_reset {
        out.insert("durationUntilReset".into(), json!(duration(d)));
    }
    Value::Object(out)
}

/// The answer in proto3 JSON.
pub fn response(r: &RateLimitResponse) -> Value {
    let mut out = Map::new();
    if r.overall_code != 0 {
        out.insert("overallCode".into(), json!(code_name(r.overall_code)));
    }
    if !r.statuses.is_empty() {
        out.insert(
            "statuses".into(),
            Value::Array(r.statuses.iter().map(status).collect()),
        );
    }
    if !r.response_headers_to_add.is_empty() {
        out.insert(
            "responseHeadersToAdd".into(),
            Value::Array(
                r.response_headers_to_add
                    .iter()
                    .map(|h| json!({"key": h.key, "value": h.value}))
                    .collect(),
            ),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_spellings_and_integers_as_strings() {
        let r = request(
            br#"{"domain":"d","descriptors":[{"entries":[{"key":"k","value":"v"}],"hitsAddend":"5"},{"entries":[{"key":"k"}],"is_negative_hits":true}],"hits_addend":2}"#,
        )
        .unwrap();
        assert_eq!(r.domain, "d");
        assert_eq!(r.hits_addend, 2);
        assert_eq!(r.descriptors[0].hits_addend, Some(UInt64Value { value: 5 }));
        assert_eq!(r.descriptors[1].entries[0].value, "");
        assert!(r.descriptors[1].is_negative_hits);
        let err = request(br#"{"domain":"d","descriptor":[]}"#).unwrap_err();
        assert!(err.detail.contains("unknown field"), "{err}");
        let err = request(br#"{"domain":"d","hitsAddend":"x"}"#).unwrap_err();
        assert_eq!(err.field, "hits_addend");
        assert_eq!(request(b"{").unwrap_err().field, "body");
    }

    #[test]
    fn writes_what_protojson_writes() {
        use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::RateLimit;
        let r = RateLimitResponse {
            overall_code: Code::OverLimit as i32,
            statuses: vec![
                DescriptorStatus {
                    code: Code::OverLimit as i32,
                    current_limit: Some(RateLimit {
                        name: "n".into(),
                        requests_per_unit: 3,
                        unit: Unit::Minute as i32,
                    }),
                    limit_remaining: 0,
                    duration_until_reset: Some(envoy_types::pb::google::protobuf::Duration {
                        seconds: 1,
                        nanos: 500_000_000,
                    }),
                    quota: None,
                },
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            response(&r),
            json!({"overallCode":"OVER_LIMIT","statuses":[
                {"code":"OVER_LIMIT","currentLimit":{"name":"n","requestsPerUnit":3,"unit":"MINUTE"},"durationUntilReset":"1.500s"},
                {"code":"OK"}]})
        );
    }
}
