//! The identity rule: how user ids, domains and descriptor entries are compared, stored
//! and keyed, and who the analytics count a request for.

use super::{FieldError, MAX_KEY_BYTES, MAX_USER_ID_BYTES};
use crate::descriptor::{Descriptor, USER_ID_KEY};

/// The identity rule: a user id is compared, stored and keyed in Unicode Normalization
/// Form C, so a decomposed `é` (`e` + U+0301) and a precomposed one (U+00E9) are one user;
/// and it may not hold characters that render as nothing or reorder what is around them
/// (control characters, format characters such as U+200B zero-width space, U+200D
/// zero-width joiner, U+202E right-to-left override or U+FEFF, and the line and
/// paragraph separators), so two ids that look the same on the dashboard are the same id.
///
/// Stable across versions: an id that is already NFC and free of those characters (every
/// ASCII id without control characters is) is used byte for byte as before, so its bucket
/// and counters do not move on upgrade. Returns the canonical id, or why it is refused.
pub fn canonical_user_id(raw: String) -> Result<String, FieldError> {
    let id = if raw.is_ascii()
        || unicode_normalization::is_nfc_quick(raw.chars())
            == unicode_normalization::IsNormalized::Yes
    {
        raw
    } else {
        use unicode_normalization::UnicodeNormalization;
        raw.nfc().collect()
    };
    validate_user_id(&id)?;
    Ok(id)
}

/// Whether `user_id` is a valid id as it stands: 1..=256 bytes of UTF-8 without control,
/// format or separator characters (see [`canonical_user_id`], which also normalises it).
pub fn validate_user_id(user_id: &str) -> Result<(), FieldError> {
    if user_id.is_empty() || user_id.len() > MAX_USER_ID_BYTES {
        return Err(FieldError::new(
            "user_id",
            format!("must be 1 to {MAX_USER_ID_BYTES} bytes of UTF-8"),
        ));
    }
    if user_id.chars().any(char::is_control) {
        return Err(FieldError::new(
            "user_id",
            "must not contain control characters",
        ));
    }
    if !user_id.is_ascii() && user_id.chars().any(is_invisible) {
        return Err(FieldError::new(
            "user_id",
            "must not contain invisible format characters (zero-width characters, bidirectional controls, line or paragraph separators)",
        ));
    }
    Ok(())
}

/// Format characters (general category Cf) and the line and paragraph separators.
fn is_invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

/// A domain or descriptor key: 1 to [`MAX_KEY_BYTES`] bytes, the identity rule of ids.
pub(super) fn canonical_key(field: &str, raw: String) -> Result<String, FieldError> {
    if raw.is_empty() || raw.len() > MAX_KEY_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be 1 to {MAX_KEY_BYTES} bytes of UTF-8"),
        ));
    }
    canonical_user_id(raw).map_err(|e| FieldError::new(field, e.detail))
}

/// Who the analytics count a descriptor request for, when it names no `user_id`: the
/// `user_id` entry of the first descriptor that has one, else the first descriptor's
/// entries as `key=value/key=value`, cut at a character boundary to the longest id.
pub fn analytics_identity(descriptors: &[Descriptor]) -> String {
    if let Some(entry) = descriptors
        .iter()
        .flat_map(|d| &d.entries)
        .find(|e| e.key == USER_ID_KEY)
    {
        return entry.value.clone();
    }
    let mut id = String::new();
    for (i, e) in descriptors
        .first()
        .map(|d| d.entries.as_slice())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if i > 0 {
            id.push('/');
        }
        id.push_str(&e.key);
        id.push('=');
        id.push_str(&e.value);
    }
    if id.len() > MAX_USER_ID_BYTES {
        let mut cut = MAX_USER_ID_BYTES;
        while !id.is_char_boundary(cut) {
            cut -= 1;
        }
        id.truncate(cut);
    }
    if id.is_empty() {
        id.push('-');
    }
    id
}
