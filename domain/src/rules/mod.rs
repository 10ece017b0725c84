//! Rules: which limits apply to a request's descriptors (being written).
