use super::*;
use proptest::prelude::*;

#[test]
fn a_batch_is_validated_check_by_check_and_names_the_bad_one() {
    let b = BatchRequest::from_json(br#"{"checks":[{"user_id":"a"},{"user_id":"b","cost":3}]}"#)
        .unwrap();
    assert_eq!(
        b.checks,
        [CheckRequest::user("a", 1), CheckRequest::user("b", 3)]
    );
    let field = |body: &[u8]| BatchRequest::from_json(body).unwrap_err().field;
    assert_eq!(
        field(br#"{"checks":[{"user_id":"a"},{"cost":2}]}"#),
        "checks[1].user_id"
    );
    assert_eq!(
        field(br#"{"checks":[{"user_id":"a","cost":0}]}"#),
        "checks[0].cost"
    );
    assert_eq!(
        field(br#"{"checks":[{"user_id":""}]}"#),
        "checks[0].user_id"
    );
    assert_eq!(field(br#"{"checks":[{"user_id":7}]}"#), "checks[0].user_id");
    assert_eq!(field(br#"{"checks":[]}"#), "checks");
    assert_eq!(field(br#"{}"#), "checks");
    assert_eq!(field(br#"[]"#), "body");
    let many = format!(
        r#"{{"checks":[{}]}}"#,
        vec![r#"{"user_id":"u"}"#; MAX_BATCH + 1].join(",")
    );
    assert_eq!(field(many.as_bytes()), "checks");
}

#[test]
fn a_batch_id_is_a_short_token_and_round_trips() {
    let b = BatchRequest::from_json(br#"{"id":"gw-7f_3","checks":[{"user_id":"a"}]}"#).unwrap();
    assert_eq!(b.id.as_deref(), Some("gw-7f_3"));
    let again = BatchRequest::from_json(&serde_json::to_vec(&b).unwrap()).unwrap();
    assert_eq!(again, b);
    let field = |body: &[u8]| BatchRequest::from_json(body).unwrap_err().field;
    for bad in [r#""""#, r#""a b""#, r#""a:b""#, r#""é""#, r#"7"#] {
        let body = format!(r#"{{"id":{bad},"checks":[{{"user_id":"a"}}]}}"#);
        assert_eq!(field(body.as_bytes()), "id", "{bad}");
    }
    let long = format!(
        r#"{{"id":"{}","checks":[{{"user_id":"a"}}]}}"#,
        "x".repeat(MAX_BATCH_ID_BYTES + 1)
    );
    assert_eq!(field(long.as_bytes()), "id");
    assert_eq!(
        field(br#"{"again":true,"checks":[{"user_id":"a"}]}"#),
        "again"
    );
}

#[test]
fn a_batch_may_carry_refusals_to_count_and_they_are_validated_too() {
    let b = BatchRequest::from_json(
        br#"{"refused":[{"check":{"user_id":"a","cost":2},"limits":["default"]}]}"#,
    )
    .unwrap();
    assert!(b.checks.is_empty());
    assert_eq!(
        b.refused,
        [RefusedCheck {
            check: CheckRequest::user("a", 2),
            limits: vec!["default".into()]
        }]
    );
    let json = serde_json::to_string(&b).unwrap();
    assert_eq!(BatchRequest::from_json(json.as_bytes()).unwrap(), b);
    // A bad notice is dropped alone: the batch's checks are still decided.
    for bad in [
        r#"{"check":{"user_id":"a"},"limits":[]}"#,
        r#"{"check":{"user_id":"a","cost":-1},"limits":["x"]}"#,
        r#"{"check":{"user_id":""},"limits":["x"]}"#,
        r#"{"limits":["x"]}"#,
        r#"{"check":{"user_id":"a"},"limits":[""]}"#,
    ] {
        let body = format!(r#"{{"checks":[{{"user_id":"b"}}],"refused":[{bad}]}}"#);
        let b = BatchRequest::from_json(body.as_bytes()).unwrap();
        assert_eq!(
            (b.checks.len(), b.refused.len(), b.dropped),
            (1, 0, 1),
            "{bad}"
        );
    }
    let field = |body: &[u8]| BatchRequest::from_json(body).unwrap_err().field;
    assert_eq!(field(br#"{"checks":[],"refused":[]}"#), "checks");
}

/// What a rule can name (a limit name of 256 bytes, 16 descriptors of 16 limits, the
/// same descriptor twice) is a notice the limiter takes; the names are sent once each.
#[test]
fn every_refusal_a_rule_can_make_is_a_notice_the_limiter_takes() {
    let long = "n".repeat(MAX_LIMIT_NAME_BYTES);
    let many: Vec<String> = (0..MAX_LIMITS_PER_REQUEST)
        .map(|i| format!("l{i}"))
        .collect();
    for names in [
        vec![long.clone()],
        many.clone(),
        vec!["burst".to_owned(), "burst".to_owned()],
    ] {
        let notice = RefusedCheck::new(CheckRequest::user("a", 1), names.clone())
            .unwrap_or_else(|| panic!("{names:?}"));
        let body = serde_json::to_string(&BatchRequest {
            refused: vec![notice.clone()],
            ..Default::default()
        })
        .unwrap();
        let b = BatchRequest::from_json(body.as_bytes()).unwrap();
        assert_eq!((b.refused, b.dropped), (vec![notice], 0));
    }
    let notice = RefusedCheck::new(
        CheckRequest::user("a", 1),
        ["b".into(), "a".into(), "b".into()],
    );
    assert_eq!(notice.unwrap().limits, ["a", "b"]);
    assert!(RefusedCheck::new(CheckRequest::user("a", 1), [long + "n"]).is_none());
}

#[test]
fn batch_results_round_trip_as_ok_or_error() {
    let response = BatchResponse {
        results: vec![
            BatchResult::Ok(CheckResponse {
                allowed: true,
                limit: 10,
                remaining: 9,
                retry_after_ms: 0,
                reset_after_ms: 100,
                window_ms: 1000,
                degraded: false,
                limits: Vec::new(),
            }),
            BatchResult::Error(CheckError::StoreUnavailable),
            BatchResult::Error(CheckError::cost_above_capacity(10)),
            BatchResult::Error(CheckError::Other(ErrorBody {
                error: "from_a_newer_limiter".into(),
                detail: "kept as sent".into(),
                field: None,
            })),
        ],
        generation: Some(3),
        incarnation: Some(7),
    };
    let json = serde_json::to_string(&response).unwrap();
    assert!(
        json.starts_with(r#"{"results":[{"ok":{"allowed":true"#),
        "{json}"
    );
    assert!(
        json.contains(r#"{"error":{"error":"unavailable""#),
        "{json}"
    );
    // The field and its detail travel apart: nothing is parsed back out of a sentence.
    assert!(
        json.contains(
            r#"{"error":{"error":"invalid_request","detail":"must be at most the bucket capacity 10","field":"cost"}}"#
        ),
        "{json}"
    );
    assert_eq!(
        serde_json::from_str::<BatchResponse>(&json).unwrap(),
        response
    );
}

#[test]
fn descriptor_requests_round_trip_and_name_their_analytics_identity() {
    let r = CheckRequest::from_json(
        br#"{"domain":"api","descriptors":[{"entries":[{"key":"plan","value":"free"},{"key":"user_id","value":"u1"}]},{"entries":[{"key":"path","value":"/x"}]}],"cost":2}"#,
    )
    .unwrap();
    assert_eq!(r.domain, "api");
    assert_eq!(r.descriptors.len(), 2);
    assert_eq!(r.user_id, "u1");
    assert_eq!(r.cost, 2);
    let again = CheckRequest::from_json(&serde_json::to_vec(&r).unwrap()).unwrap();
    assert_eq!(again, r);
    let anonymous = CheckRequest::from_json(
        br#"{"domain":"api","descriptors":[{"entries":[{"key":"api_key","value":"k1"},{"key":"path","value":"/x"}]}]}"#,
    )
    .unwrap();
    assert_eq!(anonymous.user_id, "api_key=k1/path=/x");
    // The built-in form travels as it always did.
    let plain = CheckRequest::user("u1", 1);
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"user_id":"u1","cost":1}"#
    );
    let refund = CheckRequest::from_json(br#"{"user_id":"u1","cost":-3}"#).unwrap();
    assert_eq!(refund.cost, -3);
    let many = format!(
        r#"{{"descriptors":[{}]}}"#,
        vec![r#"{"entries":[{"key":"k","value":"v"}]}"#; MAX_DESCRIPTORS + 1].join(",")
    );
    assert_eq!(
        CheckRequest::from_json(many.as_bytes()).unwrap_err().field,
        "descriptors"
    );
}

#[test]
fn accepts_a_plain_request_and_defaults_cost() {
    let r = CheckRequest::from_json(br#"{"user_id":"u1"}"#).unwrap();
    assert_eq!(r, CheckRequest::user("u1", 1));
    let r = CheckRequest::from_json(br#"{"user_id":"\u00e9\u6f22","cost":5,"extra":[1]}"#).unwrap();
    assert_eq!(r.user_id, "é漢");
    assert_eq!(r.cost, 5);
}

/// Look-alike ids: a decomposed `é` is the precomposed one; zero-width and
/// bidirectional characters are refused, naming the field.
#[test]
fn look_alike_ids_are_one_id_or_refused() {
    let decomposed =
        CheckRequest::from_json("{\"user_id\":\"caf\u{65}\u{301}\"}".as_bytes()).unwrap();
    let precomposed = CheckRequest::from_json("{\"user_id\":\"caf\u{e9}\"}".as_bytes()).unwrap();
    assert_eq!(decomposed.user_id, precomposed.user_id);
    assert_eq!(precomposed.user_id, "caf\u{e9}");
    for invisible in [
        "\u{200b}", "\u{200d}", "\u{202e}", "\u{2066}", "\u{feff}", "\u{ad}", "\u{2028}",
    ] {
        let body = format!("{{\"user_id\":\"ad{invisible}min\"}}");
        let err = CheckRequest::from_json(body.as_bytes()).unwrap_err();
        assert!(err.field == "user_id", "{invisible:?}: {err:?}");
    }
}

/// The rule keeps every id that was valid and canonical before byte for byte, so no
/// bucket moves on upgrade.
#[test]
fn canonical_ids_are_kept_byte_for_byte() {
    for id in [
        "u1",
        "user-42@example.com",
        "\u{e9}\u{6f22}",
        "\u{1f600}",
        "a b",
        "\u{5d0}\u{5d1}",
    ] {
        assert_eq!(canonical_user_id(id.to_owned()).unwrap(), id);
    }
}

#[test]
fn names_the_offending_field() {
    let cases: &[(&[u8], &str)] = &[
        (br#"{}"#, "user_id"),
        (br#"{"user_id":null}"#, "user_id"),
        (br#"{"user_id":5}"#, "user_id"),
        (br#"{"user_id":""}"#, "user_id"),
        (br#"{"user_id":"a\u0000b"}"#, "user_id"),
        (br#"{"user_id":"a\nb"}"#, "user_id"),
        (br#"{"user_id":"u","cost":0}"#, "cost"),
        (br#"{"user_id":"u","cost":-1000001}"#, "cost"),
        (br#"{"user_id":"u","descriptors":[]}"#, "descriptors"),
        (br#"{"domain":"api"}"#, "user_id"),
        (br#"{"user_id":"u","domain":"api"}"#, "descriptors"),
        (
            br#"{"descriptors":[{"entries":[]}]}"#,
            "descriptors[0].entries",
        ),
        (
            br#"{"descriptors":[{"entries":[{"key":"k"}]}]}"#,
            "descriptors[0].entries[0].value",
        ),
        (
            br#"{"descriptors":[{"entries":[{"key":"","value":"v"}]}]}"#,
            "descriptors[0].entries[0].key",
        ),
        (
            br#"{"descriptors":[{"entries":[{"key":"k","value":"a\u202eb"}]}]}"#,
            "descriptors[0].entries[0].value",
        ),
        (
            br#"{"descriptors":[{"entries":[{"key":"k","value":"v"}]}],"domain":""}"#,
            "domain",
        ),
        (br#"{"user_id":"u","cost":1.5}"#, "cost"),
        (br#"{"user_id":"u","cost":"1"}"#, "cost"),
        (br#"{"user_id":"u","cost":1000001}"#, "cost"),
        (br#"[1,2]"#, "body"),
        (br#"{"user_id":"u""#, "body"),
        (b"\xff\xfe", "body"),
    ];
    for (body, field) in cases {
        let err = CheckRequest::from_json(body).unwrap_err();
        assert_eq!(
            &err.field,
            field,
            "{}: {err}",
            String::from_utf8_lossy(body)
        );
    }
    let long = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(257));
    assert_eq!(
        CheckRequest::from_json(long.as_bytes()).unwrap_err().field,
        "user_id"
    );
    let max = format!(r#"{{"user_id":"{}"}}"#, "x".repeat(256));
    assert!(CheckRequest::from_json(max.as_bytes()).is_ok());
}

proptest! {
    // Fuzzing: many more cases than the default 256, still well under a second.
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    // Fuzz: decoding arbitrary bytes never panics, and anything accepted is valid.

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(r) = CheckRequest::from_json(&bytes) {
            prop_assert!(validate_user_id(&r.user_id).is_ok());
            prop_assert!(r.cost != 0 && r.cost.unsigned_abs() <= MAX_COST);
        }
    }

    /// Any id without control, format or separator characters is accepted as its NFC
    /// form, and that form is its own canonical id (the rule is idempotent).
    #[test]
    fn any_valid_user_id_round_trips_as_its_nfc_form(user in "[^\\p{Cc}\\p{Cf}\\p{Zl}\\p{Zp}]{1,64}") {
        use unicode_normalization::UnicodeNormalization;
        let nfc: String = user.nfc().collect();
        prop_assume!(nfc.len() <= MAX_USER_ID_BYTES);
        let body = serde_json::to_vec(&serde_json::json!({"user_id": user})).unwrap();
        let id = CheckRequest::from_json(&body).unwrap().user_id;
        prop_assert_eq!(&id, &nfc);
        prop_assert_eq!(canonical_user_id(id.clone()).unwrap(), id);
    }
}
