//! Which descriptors a proxied request produces: Envoy's route `rate_limits` actions, read
//! from the YAML file `UPSTREAM_DESCRIPTORS_PATH`.
//!
//! ```yaml
//! domain: api            # the domain requests are checked in (default: "default")
//! descriptors:           # one descriptor per item; each item is a list of actions
//!   - [{request_header: {header_name: X-Api-Key, descriptor_key: api_key}}]
//!   - [{generic_key: {descriptor_value: global}}, {remote_address: {}}]
//!   - [{method: {}}, {path: {segments: 1}}]
//! ```
//!
//! - [`DescriptorActions`]: the file, validated; [`DescriptorActions::descriptors`] turns a
//!   request ([`RequestFacts`]) into descriptors.
//! - [`ActionsError`]: why a file was refused, naming the file, line and field.
//!
//! As in Envoy, an action that cannot produce its entry (a missing header) drops its whole
//! descriptor, unless it says `skip_if_absent: true`, in which case only the entry is left
//! out; a request that produces no descriptor at all is not limited.

use std::net::IpAddr;
use std::path::Path;

use axum::http::{HeaderMap, HeaderName, Method};
use domain::api::{
    FieldError, MAX_DESCRIPTORS, MAX_ENTRIES, MAX_KEY_BYTES, MAX_USER_ID_BYTES, canonical_user_id,
};
use domain::descriptor::{DEFAULT_DOMAIN, Descriptor, Entry, USER_ID_KEY};
use serde::Deserialize;
use serde::de::IgnoredAny;

/// Longest header value an action reads, in bytes: as long as an id. A longer one is
/// refused (400 naming the header) rather than cut, since two keys that share their first
/// 256 bytes must not share a bucket.
pub const MAX_HEADER_VALUE_BYTES: usize = MAX_USER_ID_BYTES;
/// Most actions in one descriptor (one entry each).
pub const MAX_ACTIONS: usize = MAX_ENTRIES;
/// Largest descriptors file read, in bytes.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// What a request says about itself that actions read.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    /// The path as sent, without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The client: the TCP peer, or the last `X-Forwarded-For` entry when trusted.
    pub client: IpAddr,
}

/// One action: how one entry of a descriptor is made from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `request_header`: the first value of a header. Absent (or empty): the descriptor is
    /// dropped, or with `skip_if_absent` only this entry.
    RequestHeader {
        header: HeaderName,
        /// The header's name as the file spells it, for messages.
        spelled: String,
        key: String,
        skip_if_absent: bool,
    },
    /// `remote_address`: the client's IP address.
    RemoteAddress { key: String },
    /// `method`: `GET`, `POST`, ...
    Method { key: String },
    /// `path`: the path, or its first `segments` segments (`/v1/users/7` with 1: `/v1`).
    Path {
        key: String,
        segments: Option<usize>,
    },
    /// `generic_key`: a fixed entry.
    GenericKey { key: String, value: String },
}

/// What one action made of a request.
enum Produced {
    Entry(Entry),
    /// Nothing, and the descriptor goes on without it.
    Omitted,
    /// Nothing, and the descriptor is dropped.
    DropDescriptor,
}

impl Action {
    fn produce(&self, request: &RequestFacts<'_>) -> Result<Produced, FieldError> {
        let (key, value) = match self {
            Action::RequestHeader {
                header,
                spelled,
                key,
                skip_if_absent,
            } => {
                let field = || format!("header {spelled}");
                let Some(raw) = request.headers.get(header).filter(|v| !v.is_empty()) else {
                    return Ok(if *skip_if_absent {
                        Produced::Omitted
                    } else {
                        Produced::DropDescriptor
                    });
                };
                if raw.len() > MAX_HEADER_VALUE_BYTES {
                    return Err(FieldError::new(
                        field(),
                        format!("must be at most {MAX_HEADER_VALUE_BYTES} bytes"),
                    ));
                }
                let text = std::str::from_utf8(raw.as_bytes())
                    .map_err(|_| FieldError::new(field(), "must be UTF-8"))?;
                let value = canonical_user_id(text.to_owned())
                    .map_err(|e| FieldError::new(field(), e.detail))?;
                return Ok(Produced::Entry(Entry::new(key.clone(), value)));
            }
            Action::RemoteAddress { key } => (key, request.client.to_string()),
            Action::Method { key } => (key, request.method.as_str().to_owned()),
            Action::Path { key, segments } => {
                let path = match segments {
                    None => request.path.to_owned(),
                    Some(n) => first_segments(request.path, *n),
                };
                (key, path)
            }
            Action::GenericKey { key, value } => {
                return Ok(Produced::Entry(Entry::new(key.clone(), value.clone())));
            }
        };
        let value = canonical_user_id(value).map_err(|e| FieldError::new(key.clone(), e.detail))?;
        Ok(Produced::Entry(Entry::new(key.clone(), value)))
    }
}

/// The first `n` non-empty segments of `path` (`/v1//users/7`, 2: `/v1/users`); `/` when
/// it has none.
fn first_segments(path: &str, n: usize) -> String {
    let mut out = String::new();
    for segment in path.split('/').filter(|s| !s.is_empty()).take(n) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The descriptors file, validated: a domain and, per descriptor, its actions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorActions {
    domain: String,
    descriptors: Vec<Vec<Action>>,
}

impl Default for DescriptorActions {
    /// Without a file: `[user_id=<client address>]` in the default domain, so that each
    /// client address gets the built-in limit.
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_owned(),
            descriptors: vec![vec![Action::RemoteAddress {
                key: USER_ID_KEY.to_owned(),
            }]],
        }
    }
}

impl DescriptorActions {
    /// The domain requests are checked in.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The descriptors `request` produces, in file order (none: not limited), or the
    /// header (or value) that cannot be used, as a client mistake.
    pub fn descriptors(&self, request: &RequestFacts<'_>) -> Result<Vec<Descriptor>, FieldError> {
        let mut out = Vec::with_capacity(self.descriptors.len());
        'descriptor: for actions in &self.descriptors {
            let mut entries = Vec::with_capacity(actions.len());
            for action in actions {
                match action.produce(request)? {
                    Produced::Entry(entry) => entries.push(entry),
                    Produced::Omitted => {}
                    Produced::DropDescriptor => continue 'descriptor,
                }
            }
            if !entries.is_empty() {
                out.push(Descriptor { entries });
            }
        }
        Ok(out)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ActionsError> {
        let file = path.display().to_string();
        let whole = |detail: String| ActionsError {
            file: file.clone(),
            line: None,
            column: None,
            field: String::new(),
            detail,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| whole(format!("cannot be read: {e}")))?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(whole(format!("is larger than {MAX_FILE_BYTES} bytes")));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| whole(format!("cannot be read: {e}")))?;
        Self::from_yaml(&file, &text)
    }

    /// Parses and validates a descriptors file's text; `file` names it in errors.
    pub fn from_yaml(file: &str, text: &str) -> Result<Self, ActionsError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let wire: FileWire =
            serde_path_to_error::deserialize(de).map_err(|e| domain::rules::yaml_error(file, e))?;
        Ok(Self {
            domain: wire
                .domain
                .map(|d| d.0)
                .unwrap_or_else(|| DEFAULT_DOMAIN.to_owned()),
            descriptors: wire.descriptors.0.into_iter().map(|d| d.0).collect(),
        })
    }
}

/// Why the descriptors file was refused: where, which field, and what is wrong (the same
/// error, and the same positions, as a rules file's).
pub type ActionsError = domain::rules::RulesError;

// The file's wire form. Each checked type validates itself as it is read, so that an
// error carries the position of the value at fault.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWire {
    #[serde(default)]
    domain: Option<Key>,
    descriptors: Descriptors,
}

/// A domain or descriptor key: 1 to [`MAX_KEY_BYTES`] bytes, the identity rule of ids.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
            return Err(serde::de::Error::custom(format!(
                "must be 1 to {MAX_KEY_BYTES} bytes of UTF-8"
            )));
        }
        canonical_user_id(raw)
            .map(Key)
            .map_err(|e| serde::de::Error::custom(e.detail))
    }
}

/// A fixed descriptor value: the identity rule of ids.
struct Value(String);

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        canonical_user_id(String::deserialize(d)?)
            .map(Value)
            .map_err(|e| serde::de::Error::custom(e.detail))
    }
}

struct Descriptors(Vec<Actions>);

impl<'de> Deserialize<'de> for Descriptors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let all = Vec::<Actions>::deserialize(d)?;
        if all.is_empty() || all.len() > MAX_DESCRIPTORS {
            return Err(serde::de::Error::custom(format!(
                "must hold 1 to {MAX_DESCRIPTORS} descriptors"
            )));
        }
        Ok(Self(all))
    }
}

struct Actions(Vec<Action>);

impl<'de> Deserialize<'de> for Actions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let all = Vec::<ActionWire>::deserialize(d)?;
        if all.is_empty() || all.len() > MAX_ACTIONS {
            return Err(serde::de::Error::custom(format!(
                "a descriptor must hold 1 to {MAX_ACTIONS} actions"
            )));
        }
        Ok(Self(all.into_iter().map(|a| a.0).collect()))
    }
}

/// One action: a map with exactly one of the action names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionFields {
    #[serde(default)]
    request_header: Option<RequestHeaderWire>,
    #[serde(default)]
    remote_address: Option<Empty>,
    #[serde(default)]
    method: Option<KeyOnly>,
    #[serde(default)]
    path: Option<PathWire>,
    #[serde(default)]
    generic_key: Option<GenericKeyWire>,
    /// Envoy's, not ours: named so that the error says so.
    #[serde(default)]
    header_value_match: Option<IgnoredAny>,
}

struct ActionWire(Action);

impl<'de> Deserialize<'de> for ActionWire {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let f = ActionFields::deserialize(d)?;
        if f.header_value_match.is_some() {
            return Err(D::Error::custom(
                "header_value_match is not supported; use request_header",
            ));
        }
        let given = [
            f.request_header.is_some(),
            f.remote_address.is_some(),
            f.method.is_some(),
            f.path.is_some(),
            f.generic_key.is_some(),
        ]
        .into_iter()
        .filter(|g| *g)
        .count();
        if given != 1 {
            return Err(D::Error::custom(
                "an action is exactly one of request_header, remote_address, method, path, generic_key",
            ));
        }
        let key = |k: Option<Key>, default: &str| k.map_or_else(|| default.to_owned(), |k| k.0);
        let action = if let Some(h) = f.request_header {
            let header = HeaderName::from_bytes(h.header_name.as_bytes()).map_err(|_| {
                D::Error::custom(format!(
                    "request_header.header_name: {:?} is not a valid header name",
                    h.header_name
                ))
            })?;
            Action::RequestHeader {
                header,
                spelled: h.header_name,
                key: h.descriptor_key.0,
                skip_if_absent: h.skip_if_absent,
            }
        } else if let Some(Empty {}) = f.remote_address {
            Action::RemoteAddress {
                key: "remote_address".to_owned(),
            }
        } else if let Some(m) = f.method {
            Action::Method {
                key: key(m.descriptor_key, "method"),
            }
        } else if let Some(p) = f.path {
            let segments = match (p.segments, p.prefix_only) {
                (Some(0), _) => {
                    return Err(D::Error::custom("path.segments: must be at least 1"));
                }
                (Some(n), _) => Some(n),
                (None, true) => Some(1),
                (None, false) => None,
            };
            Action::Path {
                key: key(p.descriptor_key, "path"),
                segments,
            }
        } else if let Some(g) = f.generic_key {
            Action::GenericKey {
                key: key(g.descriptor_key, "generic_key"),
                value: g.descriptor_value.0,
            }
        } else {
            unreachable!("exactly one action is given")
        };
        Ok(Self(action))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestHeaderWire {
    header_name: String,
    descriptor_key: Key,
    #[serde(default)]
    skip_if_absent: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyOnly {
    #[serde(default)]
    descriptor_key: Option<Key>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PathWire {
    #[serde(default)]
    descriptor_key: Option<Key>,
    /// Only the first this many segments.
    #[serde(default)]
    segments: Option<usize>,
    /// The first segment only (`segments: 1`).
    #[serde(default)]
    prefix_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenericKeyWire {
    #[serde(default)]
    descriptor_key: Option<Key>,
    descriptor_value: Value,
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn facts<'a>(method: &'a Method, path: &'a str, headers: &'a HeaderMap) -> RequestFacts<'a> {
        RequestFacts {
            method,
            path,
            headers,
            client: "203.0.113.7".parse().unwrap(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn written(descriptors: &[Descriptor]) -> Vec<String> {
        descriptors
            .iter()
            .map(|d| {
                d.entries
                    .iter()
                    .map(|e| format!("{}={}", e.key, e.value))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .collect()
    }

    const EXAMPLE: &str = "\
domain: api
descriptors:
  - [{request_header: {header_name: X-Api-Key, descriptor_key: api_key}}]
  - [{generic_key: {descriptor_value: global}}, {remote_address: {}}]
  - [{request_header: {header_name: X-Plan, descriptor_key: plan}}, {request_header: {header_name: X-User, descriptor_key: user_id}}]
  - [{method: {}}, {path: {prefix_only: true}}]
";

    #[test]
    fn every_action_makes_its_entry() {
        let actions = DescriptorActions::from_yaml("d.yaml", EXAMPLE).unwrap();
        assert_eq!(actions.domain(), "api");
        let h = headers(&[("x-api-key", "k1"), ("x-plan", "free"), ("x-user", "u1")]);
        let got = actions
            .descriptors(&facts(&Method::POST, "/v1/orders/7", &h))
            .unwrap();
        assert_eq!(
            written(&got),
            [
                "api_key=k1",
                "generic_key=global,remote_address=203.0.113.7",
                "plan=free,user_id=u1",
                "method=POST,path=/v1",
            ]
        );
    }

    #[test]
    fn a_missing_header_drops_its_descriptor_unless_skip_if_absent() {
        let actions = DescriptorActions::from_yaml("d.yaml", EXAMPLE).unwrap();
        // No X-Api-Key, no X-User: the first and third descriptors are dropped whole.
        let h = headers(&[("x-plan", "free"), ("x-api-key", "")]);
        let got = actions.descriptors(&facts(&Method::GET, "/", &h)).unwrap();
        assert_eq!(
            written(&got),
            [
                "generic_key=global,remote_address=203.0.113.7",
                "method=GET,path=/"
            ]
        );

        let skip = DescriptorActions::from_yaml(
            "d.yaml",
            "descriptors:\n  - [{request_header: {header_name: X-Plan, descriptor_key: plan, skip_if_absent: true}}, {request_header: {header_name: X-User, descriptor_key: user_id}}]\n",
        )
        .unwrap();
        assert_eq!(skip.domain(), DEFAULT_DOMAIN);
        let h = headers(&[("x-user", "u1")]);
        let got = skip.descriptors(&facts(&Method::GET, "/", &h)).unwrap();
        assert_eq!(written(&got), ["user_id=u1"]);
        // Nothing at all: no descriptor, so the request is not limited.
        let none = skip
            .descriptors(&facts(&Method::GET, "/", &HeaderMap::new()))
            .unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn without_a_file_each_client_address_is_a_user() {
        let got = DescriptorActions::default()
            .descriptors(&facts(&Method::GET, "/x", &HeaderMap::new()))
            .unwrap();
        assert_eq!(written(&got), ["user_id=203.0.113.7"]);
    }

    #[test]
    fn path_segments_skip_empty_ones() {
        assert_eq!(first_segments("/v1//users/7", 2), "/v1/users");
        assert_eq!(first_segments("/v1", 3), "/v1");
        assert_eq!(first_segments("/", 1), "/");
        assert_eq!(first_segments("", 1), "/");
    }

    #[test]
    fn header_values_follow_the_identity_rule_and_are_bounded() {
        let actions = DescriptorActions::from_yaml(
            "d.yaml",
            "descriptors: [[{request_header: {header_name: X-Api-Key, descriptor_key: api_key}}]]",
        )
        .unwrap();
        let long = "k".repeat(MAX_HEADER_VALUE_BYTES + 1);
        let h = headers(&[("x-api-key", &long)]);
        let err = actions
            .descriptors(&facts(&Method::GET, "/", &h))
            .unwrap_err();
        assert_eq!(err.field, "header X-Api-Key");
        assert!(err.detail.contains("256"), "{err}");

        let just = "k".repeat(MAX_HEADER_VALUE_BYTES);
        let h = headers(&[("x-api-key", &just)]);
        assert_eq!(
            actions.descriptors(&facts(&Method::GET, "/", &h)).unwrap()[0].entries[0].value,
            just
        );

        // A decomposed é is the precomposed one, as for ids.
        let mut h = HeaderMap::new();
        h.insert(
            "x-api-key",
            HeaderValue::from_bytes("cafe\u{301}".as_bytes()).unwrap(),
        );
        assert_eq!(
            actions.descriptors(&facts(&Method::GET, "/", &h)).unwrap()[0].entries[0].value,
            "caf\u{e9}"
        );
        // Not UTF-8: refused, naming the header.
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        let err = actions
            .descriptors(&facts(&Method::GET, "/", &h))
            .unwrap_err();
        assert_eq!(err.field, "header X-Api-Key");
    }

    fn refused(text: &str) -> ActionsError {
        DescriptorActions::from_yaml("descriptors.yaml", text).unwrap_err()
    }

    #[test]
    fn a_bad_file_is_refused_naming_file_line_and_field() {
        let err = refused(
            "domain: api\ndescriptors:\n  - [{request_header: {header_name: X-Api-Key}}]\n",
        );
        assert_eq!(err.file, "descriptors.yaml");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(
            err.field.starts_with("descriptors[0][0].request_header"),
            "{err}"
        );
        assert!(err.to_string().contains("descriptor_key"), "{err}");

        let err = refused("descriptors:\n  - [{method: {}}]\n  - [{pathh: {}}]\n");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.field.starts_with("descriptors[1][0]"), "{err}");
        assert!(err.detail.contains("pathh"), "{err}");

        let err = refused("descriptors:\n  - [{generic_key: {descriptor_value: \"a\\u200bb\"}}]\n");
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.field.contains("descriptor_value"), "{err}");

        let err = refused("descriptors:\n  - [{header_value_match: {descriptor_value: x}}]\n");
        assert!(err.detail.contains("not supported"), "{err}");
        assert_eq!(err.line, Some(2), "{err}");

        let err = refused("descriptors:\n  - [{method: {}, path: {}}]\n");
        assert!(err.detail.contains("exactly one"), "{err}");

        let err = refused(
            "descriptors:\n  - [{request_header: {header_name: \"X Api\", descriptor_key: k}}]\n",
        );
        assert!(err.detail.contains("not a valid header name"), "{err}");

        let err = refused("domain: ''\ndescriptors: [[{method: {}}]]\n");
        assert_eq!(err.field, "domain", "{err}");
        assert_eq!(err.line, Some(1), "{err}");

        let err = refused("descriptors: [[{path: {segments: 0}}]]\n");
        assert!(err.detail.contains("at least 1"), "{err}");

        let err = refused("descriptors: [\n  ]\n");
        assert!(err.detail.contains("1 to 16 descriptors"), "{err}");

        let seventeen = format!(
            "descriptors:\n{}",
            "  - [{method: {}}]\n".repeat(MAX_DESCRIPTORS + 1)
        );
        assert!(refused(&seventeen).detail.contains("1 to 16 descriptors"));
        let long = format!(
            "descriptors:\n  - [{}]\n",
            vec!["{method: {}}"; MAX_ACTIONS + 1].join(", ")
        );
        assert!(refused(&long).detail.contains("1 to 16 actions"));

        let err = refused("descriptors: [[{method: {}}]\n");
        assert_eq!(err.file, "descriptors.yaml");
        assert!(err.line.is_some(), "{err}");
    }
}
