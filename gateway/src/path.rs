//! The path a request is limited, routed and forwarded by: normalised first, so that one
//! resource has one path. Without it `GET /%73earch`, `/./search`, `//search` or
//! `/x/../search` would escape a `path: "/search*"` rule while the upstream (which
//! normalises as every web server does) serves `/search` all the same.
//!
//! What [`normalize`] does, in order (RFC 3986 section 6.2.2, and Envoy's `normalize_path`
//! with `merge_slashes`):
//! 1. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded (`%73` is
//!    `s`, `%2E` is `.`); every other percent-encoding is kept, its hex in upper case
//!    (`%2f` is `%2F`: an encoded slash stays one, so it never splits a segment);
//! 2. repeated slashes become one;
//! 3. dot segments are removed (`/a/./b/../c` is `/a/c`; `..` never climbs above `/`).
//!
//! The normalised path is what the rules see, what decides whether a route is the
//! gateway's own, and what the upstream receives (the query is kept as sent).

use std::borrow::Cow;

/// `path` normalised (see the module documentation); borrowed when already normal.
pub fn normalize(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    // Whether the path ends in a slash once dot segments are gone (`/a/` and `/a/.`).
    let mut trailing = false;
    for segment in decoded.split('/').skip(1) {
        trailing = false;
        match segment {
            "" => trailing = true,
            "." => trailing = true,
            ".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// Whether `path` has nothing [`normalize`] would change (the common case: no `%`, no
/// empty or dot segment).
fn is_normal(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains('%')
        && !path.contains("//")
        && path.split('/').skip(1).all(|s| s != "." && s != "..")
}

/// Step 1: unreserved characters decoded, other percent-encodings in upper case.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len() + 1);
    if !path.starts_with('/') {
        out.push('/');
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let byte = hi << 4 | lo;
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                out.push(byte as char);
            } else {
                out.push('%');
                out.push(bytes[i + 1].to_ascii_uppercase() as char);
                out.push(bytes[i + 2].to_ascii_uppercase() as char);
            }
            i += 3;
            continue;
        }
        // A path is ASCII (the URI parser let nothing else through); copy char by char to
        // stay valid UTF-8 whatever it holds.
        let c = path[i..].chars().next().expect("in bounds");
        out.push(c);
        i += c.len_utf8();
    }
    out
}

/// Puts `request`'s path in its normal form (the query kept as sent).
pub fn normalize_request<B>(request: &mut axum::http::Request<B>) {
    use axum::http::uri::{PathAndQuery, Uri};
    let std::borrow::Cow::Owned(path) = normalize(request.uri().path()) else {
        return;
    };
    let target = match request.uri().query() {
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let Ok(path_and_query) = PathAndQuery::try_from(target) else {
        return;
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn one_resource_has_one_path() {
        for (sent, seen) in [
            ("/search", "/search"),
            ("/%73earch", "/search"),
            ("/%73%65arch", "/search"),
            ("/./search", "/search"),
            ("//search", "/search"),
            ("/x/../search", "/search"),
            ("/../../search", "/search"),
            ("/%2E/search", "/search"),
            ("/%2e%2E/search", "/search"),
            ("/a/b/./../c", "/a/c"),
            ("/a/", "/a/"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/", "/"),
            ("", "/"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("/%7euser", "/~user"),
            ("/%41%5a", "/AZ"),
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
            ("/%4", "/%4"),
            ("/a%20b", "/a%20b"),
        ] {
            assert_eq!(normalize(sent), seen, "{sent}");
        }
    }

    #[test]
    fn normal_paths_are_not_copied() {
        assert!(matches!(
            normalize("/v1/orders/7"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
