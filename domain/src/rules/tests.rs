//! Rules tests. The cases of envoyproxy/ratelimit's `test/config/config_test.go` (and their
//! YAML files, copied unchanged) come first, with their expectations; then our extensions;
//! then hostile input.

use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::descriptor::Entry;
use crate::limits::{Algorithm, Window};

fn parse_named(file: &str, text: &str) -> Result<RuleSet, RulesError> {
    RuleSet::from_files(&[(file.to_owned(), text.to_owned())])
}

fn parse(text: &str) -> Result<RuleSet, RulesError> {
    parse_named("rules.yaml", text)
}

fn refused(text: &str) -> RulesError {
    parse(text).expect_err("the rules should be refused")
}

fn desc(entries: &[(&str, &str)]) -> Descriptor {
    Descriptor {
        entries: entries.iter().map(|(k, v)| Entry::new(*k, *v)).collect(),
    }
}

/// The rule of one descriptor, alone in its request.
fn get(set: &RuleSet, domain: &str, entries: &[(&str, &str)]) -> Option<Arc<Rule>> {
    set.resolve(domain, &[desc(entries)]).pop().flatten()
}

fn per(requests: u64, secs: u64) -> LimitSpec {
    LimitSpec::new(
        Algorithm::TokenBucket,
        requests,
        Duration::from_secs(secs),
        None,
    )
    .unwrap()
}

/// The one limit of a rule.
fn only_limit(rule: &Rule) -> &NamedLimit {
    assert_eq!(rule.limits.len(), 1, "{rule:?}");
    &rule.limits[0]
}

// ---------------------------------------------------------------------------------------
// envoyproxy/ratelimit's test/config files, unchanged.

const BASIC_CONFIG: &str = r#"# Basic configuration for testing.
domain: test-domain
descriptors:
  # Top level key/value with no default rate limit.
  - key: key1
    value: value1
    descriptors:
      # 2nd level key only with default rate limit.
      - key: subkey1
        rate_limit:
          unit: second
          requests_per_unit: 5

      # 2nd level key/value with limit. Specific override at 2nd level.
      - key: subkey1
        value: subvalue1
        rate_limit:
          unit: second
          requests_per_unit: 10

  # Top level key only with default rate limit.
  - key: key2
    rate_limit:
      unit: minute
      requests_per_unit: 20

  # Top level key/value with limit. Specific override at 1st level.
  - key: key2
    value: value2
    rate_limit:
      unit: minute
      requests_per_unit: 30

  # First level override with no limit. This effectively whitelists the value.
  - key: key2
    value: value3

  - key: key3
    rate_limit:
      unit: hour
      requests_per_unit: 1

  - key: key4
    rate_limit:
      name: key4_rate_limit
      unit: day
      requests_per_unit: 1

  - key: key5
    value: value5
    rate_limit:
      unit: day
      requests_per_unit: 15
    descriptors:
      - key: subkey5
        value: subvalue5
        rate_limit:
          unit: day
          requests_per_unit: 25

  - key: key6
    rate_limit:
      unlimited: true

  # Top level key only with default rate limit.

  - key: key7
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 70
"#;

const WILDCARD: &str = r#"# Basic configuration for testing.
domain: test-domain
descriptors:
  - key: wild
    value: foo*
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: noWild
    value: foo
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: noVal
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: midWild
    value: bar*b
    rate_limit:
      unit: minute
      requests_per_unit: 20
  - key: multiWild
    value: foo*bar*baz
    rate_limit:
      unit: minute
      requests_per_unit: 10
  - key: nestedWild
    value: val1
    descriptors:
      - key: wild
        value: goo*
        rate_limit:
          unit: minute
          requests_per_unit: 20
"#;

const SHADOW_MODE: &str = r#"# Basic configuration for testing.
domain: test-domain
descriptors:
  # Top level key/value with no default rate limit.
  - key: key1
    value: value1
    descriptors:
      # 2nd level key only with default rate limit.
      - key: subkey1
        rate_limit:
          unit: second
          requests_per_unit: 5

      # 2nd level key/value with limit. Specific override at 2nd level.
      - key: subkey1
        value: subvalue1
        rate_limit:
          unit: second
          requests_per_unit: 10
        shadow_mode: true

  # Top level key only with default rate limit.
  - key: key2
    rate_limit:
      unit: minute
      requests_per_unit: 20
    shadow_mode: true
  # Top level key/value with limit. Specific override at 1st level.
  - key: key2
    value: value2
    rate_limit:
      unit: minute
      requests_per_unit: 30
"#;

const METADATA: &str = r#"domain: test-domain
descriptors:
  # Top level key/value with no default rate limit.
  - key: key1
    value: value1
    descriptors:
      # 2nd level key only with default rate limit.
      - key: subkey1
        rate_limit:
          unit: second
          requests_per_unit: 5
        metadata:
          name: service_1

      # 2nd level key/value with limit. Specific override at 2nd level.
      - key: subkey1
        value: subvalue1
        rate_limit:
          unit: second
          requests_per_unit: 10

  - key: key2
    rate_limit:
      unit: minute
      requests_per_unit: 20
    metadata:
      service_with_quota:
        name: service_2
"#;

const MERGE_DOMAIN_KEY1: &str = r#"# Basic configuration which will be merged with `merge_domain2.yaml`
domain: test-domain
descriptors:
  # Top level key/value which is not specified in `merge_domain2.yaml`
  - key: key1
    value: value1
    rate_limit:
      unit: minute
      requests_per_unit: 10
"#;

#[test]
fn basic_config() {
    let set = parse(BASIC_CONFIG).unwrap();
    assert_eq!(set.domains().collect::<Vec<_>>(), ["test-domain"]);
    assert!(get(&set, "foo_domain", &[]).is_none());
    assert!(get(&set, "test-domain", &[]).is_none());
    assert!(get(&set, "test-domain", &[("key1", "something")]).is_none());
    assert!(get(&set, "test-domain", &[("key1", "value1")]).is_none());
    assert!(
        get(
            &set,
            "test-domain",
            &[("key2", "value2"), ("subkey", "subvalue")]
        )
        .is_none()
    );
    assert!(
        get(
            &set,
            "test-domain",
            &[("key5", "value5"), ("subkey5", "subvalue")]
        )
        .is_none()
    );

    let rule = get(
        &set,
        "test-domain",
        &[("key1", "value1"), ("subkey1", "something")],
    )
    .unwrap();
    assert_eq!(only_limit(&rule).spec, per(5, 1));
    assert_eq!(rule.path, "test-domain.key1_value1.subkey1");
    assert!(!rule.shadow && !rule.unlimited);

    let rule = get(
        &set,
        "test-domain",
        &[("key1", "value1"), ("subkey1", "subvalue1")],
    )
    .unwrap();
    assert_eq!(only_limit(&rule).spec, per(10, 1));
    assert_eq!(rule.path, "test-domain.key1_value1.subkey1_subvalue1");

    let rule = get(&set, "test-domain", &[("key2", "something")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(20, 60));
    assert_eq!(rule.path, "test-domain.key2");

    let rule = get(&set, "test-domain", &[("key2", "value2")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(30, 60));

    // The whitelisted value: a node without a limit.
    assert!(get(&set, "test-domain", &[("key2", "value3")]).is_none());

    let rule = get(&set, "test-domain", &[("key3", "foo")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(1, 3_600));
    assert_eq!(only_limit(&rule).name, "test-domain.key3");
    assert!(!only_limit(&rule).explicit_name, "no name in the file");

    let rule = get(&set, "test-domain", &[("key4", "foo")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(1, 86_400));
    assert_eq!(only_limit(&rule).name, "key4_rate_limit");
    assert!(only_limit(&rule).explicit_name);

    let rule = get(&set, "test-domain", &[("key6", "foo")]).unwrap();
    assert!(rule.unlimited);
    assert!(rule.limits.is_empty());

    let rule = get(&set, "test-domain", &[("key7", "unspecified_value")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(70, 60));
    assert!(rule.detailed_metric);

    // key5 has a limit and children: the limit applies only to a one-entry descriptor.
    let rule = get(&set, "test-domain", &[("key5", "value5")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(15, 86_400));
    let rule = get(
        &set,
        "test-domain",
        &[("key5", "value5"), ("subkey5", "subvalue5")],
    )
    .unwrap();
    assert_eq!(only_limit(&rule).spec, per(25, 86_400));
    // More entries than the tree is deep: no limit (the last entry must land on a limit).
    assert!(get(&set, "test-domain", &[("key2", "value2"), ("x", "y")]).is_none());
    assert!(
        get(
            &set,
            "test-domain",
            &[("key5", "value5"), ("subkey5", "subvalue5"), ("a", "b")]
        )
        .is_none()
    );
}

#[test]
fn domains_in_two_files_are_refused_not_merged() {
    let files = [
        ("basic_config.yaml".to_owned(), BASIC_CONFIG.to_owned()),
        (
            "duplicate_domain.yaml".to_owned(),
            "domain: test-domain\ndescriptors:\n".to_owned(),
        ),
    ];
    let err = RuleSet::from_files(&files).unwrap_err();
    assert_eq!(err.file, "duplicate_domain.yaml");
    assert_eq!(err.field, "domain");
    assert!(
        err.detail
            .contains("duplicate domain 'test-domain' in config file"),
        "{err}"
    );
    // TestDuplicateKeyDomainMerge: the same file twice.
    let twice = [
        (
            "merge_domain_key1.yaml".to_owned(),
            MERGE_DOMAIN_KEY1.to_owned(),
        ),
        (
            "merge_domain_key1.yaml".to_owned(),
            MERGE_DOMAIN_KEY1.to_owned(),
        ),
    ];
    assert!(RuleSet::from_files(&twice).is_err());
}

#[test]
fn several_files_several_domains() {
    let files = [
        ("a.yaml".to_owned(), MERGE_DOMAIN_KEY1.to_owned()),
        (
            "b.yaml".to_owned(),
            WILDCARD.replace("test-domain", "other"),
        ),
    ];
    let set = RuleSet::from_files(&files).unwrap();
    assert_eq!(set.domains().collect::<Vec<_>>(), ["other", "test-domain"]);
    assert!(get(&set, "test-domain", &[("key1", "value1")]).is_some());
    assert!(get(&set, "other", &[("wild", "foo1")]).is_some());
    assert!(get(&set, "other", &[("key1", "value1")]).is_none());
}

#[test]
fn empty_domain() {
    let err = parse_named("empty_domain.yaml", "descriptors:\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "empty_domain.yaml: domain: config file cannot have empty domain"
    );
    assert!(refused("domain: ''\n").detail.contains("empty domain"));
}

#[test]
fn empty_key() {
    let err = refused("domain: test-domain\ndescriptors:\n  - value: value1\n");
    assert!(err.detail.contains("descriptor has empty key"), "{err}");
    assert_eq!(err.field, "descriptors[0]");
    assert_eq!(err.line, Some(3));
}

#[test]
fn duplicate_key() {
    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n\n  - key: key1\n    value: value1\n",
    );
    assert!(
        err.detail
            .contains("duplicate descriptor composite key 'key1_value1'"),
        "{err}"
    );
    assert_eq!(err.field, "descriptors");
}

#[test]
fn bad_limit_unit() {
    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    rate_limit:\n      unit: foo\n      requests_per_unit: 5\n",
    );
    assert_eq!(err.field, "descriptors[0].rate_limit.unit");
    assert_eq!((err.line, err.column), (Some(6), Some(7)));
    assert!(err.detail.starts_with("unknown unit \"foo\""), "{err}");
}

#[test]
fn display_names_file_line_column_and_field() {
    let err = refused(
        "domain: api\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 5\n",
    );
    assert_eq!(
        err.to_string(),
        "rules.yaml:5:7: descriptors[0].rate_limit.unit: unknown unit \"fortnight\"; \
         choices are [second, minute, hour, day, week, month, year]"
    );
}

#[test]
fn units_are_theirs_and_case_insensitive() {
    for (unit, secs) in [
        ("second", 1),
        ("MINUTE", 60),
        ("Hour", 3_600),
        ("day", 86_400),
        ("week", 604_800),
        ("month", 2_592_000),
        ("year", 31_536_000),
    ] {
        let set = parse(&format!(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: {unit}, requests_per_unit: 400, algorithm: fixed_window}}\n"
        ))
        .unwrap();
        let rule = get(&set, "d", &[("k", "v")]).unwrap();
        assert_eq!(
            only_limit(&rule).spec,
            LimitSpec::FixedWindow(Window {
                requests: 400,
                window_us: secs * 1_000_000
            }),
            "{unit}"
        );
    }
    assert!(refused("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: unknown, requests_per_unit: 4}\n")
        .detail
        .contains("unknown unit"));
}

#[test]
fn replaces_self_and_empty() {
    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    descriptors:\n      - key: subkey1\n        rate_limit:\n          name: self\n          replaces:\n            - name: self\n          unit: second\n          requests_per_unit: 5\n",
    );
    assert!(
        err.detail
            .contains("replaces should not contain name of same descriptor"),
        "{err}"
    );
    assert_eq!(err.field, "descriptors[0].descriptors[0].rate_limit");

    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    descriptors:\n      - key: subkey1\n        rate_limit:\n          name: self\n          replaces:\n            - name:\n          unit: second\n          requests_per_unit: 5\n",
    );
    assert!(
        err.detail
            .contains("should not have an empty replaces entry"),
        "{err}"
    );
}

#[test]
fn bad_yaml() {
    let err = parse_named("bad_yaml.yaml", "'''\n").unwrap_err();
    assert_eq!(err.file, "bad_yaml.yaml");
    assert_eq!(err.field, "");
    assert_eq!(err.line, Some(2));
    assert!(err.detail.contains("unexpected end of stream"), "{err}");
}

#[test]
fn misspelled_keys_are_refused_by_name() {
    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    ratelimit:\n      unit: day\n      requests_per_unit: 5\n",
    );
    assert_eq!(err.field, "descriptors[0].ratelimit");
    assert!(err.detail.contains("unknown field `ratelimit`"), "{err}");
    assert_eq!(err.line, Some(5));

    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    rate_limit:\n      unit: day\n      requestsperunit: 5\n",
    );
    assert_eq!(err.field, "descriptors[0].rate_limit.requestsperunit");
    assert!(
        err.detail.contains("unknown field `requestsperunit`"),
        "{err}"
    );

    // The typo of the brief: it must not leave a rule without its number.
    let err = refused(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: day\n      request_per_unit: 5\n",
    );
    assert_eq!(err.field, "descriptors[0].rate_limit.request_per_unit");
    assert_eq!((err.line, err.column), (Some(6), Some(7)));
    // `domain` is known at the top level only (theirs accepts any known key anywhere).
    assert!(
        refused("domain: d\ndescriptors:\n  - key: k\n    domain: x\n")
            .detail
            .contains("unknown field `domain`")
    );
}

#[test]
fn non_string_key_and_non_map_list() {
    let err = refused(
        "0.25: test-domain\ndescriptors:\n  - key: key1\n    value: value1\n    rate_limit:\n      unit: day\n      requests_per_unit: 5\n",
    );
    assert_eq!(err.line, Some(1), "{err}");
    let err = refused("domain: test-domain\ndescriptors:\n  - a\n  - b\n  - c\n");
    assert_eq!(err.field, "descriptors[0]", "{err}");
    assert!(err.detail.contains("invalid type: string \"a\""), "{err}");
}

#[test]
fn unlimited_with_unit() {
    let err = refused(
        "domain: test-domain\ndescriptors:\n  - key: foo\n    rate_limit:\n      unlimited: true\n      unit: day\n      requests_per_unit: 25\n",
    );
    assert!(
        err.detail
            .contains("should not specify unit, requests_per_unit when unlimited"),
        "{err}"
    );
}

#[test]
fn shadow_mode_config() {
    let set = parse(SHADOW_MODE).unwrap();
    let rule = get(
        &set,
        "test-domain",
        &[("key1", "value1"), ("subkey1", "something")],
    )
    .unwrap();
    assert!(!rule.shadow);
    assert_eq!(only_limit(&rule).spec, per(5, 1));
    let rule = get(
        &set,
        "test-domain",
        &[("key1", "value1"), ("subkey1", "subvalue1")],
    )
    .unwrap();
    assert!(rule.shadow);
    assert_eq!(only_limit(&rule).spec, per(10, 1));
    let rule = get(&set, "test-domain", &[("key2", "something")]).unwrap();
    assert!(rule.shadow);
    assert_eq!(only_limit(&rule).spec, per(20, 60));
    let rule = get(&set, "test-domain", &[("key2", "value2")]).unwrap();
    assert!(!rule.shadow);
    assert_eq!(only_limit(&rule).spec, per(30, 60));
}

#[test]
fn wildcard_config() {
    let set = parse(WILDCARD).unwrap();
    let d = "test-domain";
    // A key without value matches every value, with one rule.
    let a = get(&set, d, &[("noVal", "foo1")]).unwrap();
    let b = get(&set, d, &[("noVal", "foo2")]).unwrap();
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(a.path, "test-domain.noVal");

    let w1 = get(&set, d, &[("wild", "foo1")]).unwrap();
    let w2 = get(&set, d, &[("wild", "foo2")]).unwrap();
    assert!(Arc::ptr_eq(&w1, &w2));
    assert_eq!(w1.path, "test-domain.wild_foo*");
    let w3 = get(&set, d, &[("nestedWild", "val1"), ("wild", "goo2")]).unwrap();
    assert_eq!(w3.path, "test-domain.nestedWild_val1.wild_goo*");

    assert!(get(&set, d, &[("wild", "bar")]).is_none());
    assert!(
        get(&set, d, &[("noWild", "foo1")]).is_none(),
        "no eager match"
    );
    assert!(get(&set, d, &[("noWild", "foo")]).is_some());

    let m1 = get(&set, d, &[("midWild", "barab")]).unwrap();
    let m2 = get(&set, d, &[("midWild", "bar123b")]).unwrap();
    assert!(Arc::ptr_eq(&m1, &m2));
    assert_eq!(m1.path, "test-domain.midWild_bar*b");
    assert!(
        get(&set, d, &[("midWild", "barb")]).is_some(),
        "* matches empty"
    );
    assert!(get(&set, d, &[("midWild", "bara")]).is_none());
    assert!(get(&set, d, &[("midWild", "xbarb")]).is_none());

    assert!(get(&set, d, &[("multiWild", "foo123bar456baz")]).is_some());
    assert!(get(&set, d, &[("multiWild", "foobarbaz")]).is_some());
    assert!(get(&set, d, &[("multiWild", "foo123baz")]).is_none());
    assert!(get(&set, d, &[("multiWild", "bar456baz")]).is_none());
}

#[test]
fn exact_value_wins_over_wildcard_and_first_wildcard_wins() {
    let set = parse(
        "domain: d\ndescriptors:\n  - key: file\n    value: test*\n    rate_limit: {unit: minute, requests_per_unit: 100}\n  - key: file\n    value: te*\n    rate_limit: {unit: minute, requests_per_unit: 7}\n  - key: file\n    value: test1\n    rate_limit: {unit: minute, requests_per_unit: 50}\n  - key: file\n    rate_limit: {unit: minute, requests_per_unit: 3}\n",
    )
    .unwrap();
    let spec = |v: &str| only_limit(&get(&set, "d", &[("file", v)]).unwrap()).spec;
    assert_eq!(spec("test1"), per(50, 60));
    assert_eq!(spec("test2"), per(100, 60), "first wildcard in file order");
    assert_eq!(spec("tea"), per(7, 60));
    assert_eq!(spec("other"), per(3, 60), "key only, last");
}

#[test]
fn metadata_and_value_to_metric_are_read_and_ignored() {
    let set = parse(METADATA).unwrap();
    let rule = get(&set, "test-domain", &[("key1", "value1"), ("subkey1", "x")]).unwrap();
    assert_eq!(only_limit(&rule).spec, per(5, 1));
    assert!(parse("domain: d\ndescriptors:\n  - key: k\n    value_to_metric: true\n").is_ok());
}

#[test]
fn quota_mode_and_share_threshold_are_refused_when_on() {
    let err = refused("domain: d\ndescriptors:\n  - key: k\n    quota_mode: true\n");
    assert!(err.detail.contains("quota_mode is not supported"), "{err}");
    let err =
        refused("domain: d\ndescriptors:\n  - key: k\n    value: a*\n    share_threshold: true\n");
    assert!(err.detail.contains("share_threshold"), "{err}");
    assert!(parse("domain: d\ndescriptors:\n  - key: k\n    quota_mode: false\n").is_ok());
}

#[test]
fn numbers_in_values_are_read_as_text() {
    let set = parse(
        "domain: d\ndescriptors:\n  - key: status\n    value: 200\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
    )
    .unwrap();
    assert!(get(&set, "d", &[("status", "200")]).is_some());
}

#[test]
fn empty_value_means_any_value() {
    let set = parse(
        "domain: d\ndescriptors:\n  - key: k\n    value: ''\n    rate_limit: {unit: second, requests_per_unit: 1}\n",
    )
    .unwrap();
    assert!(get(&set, "d", &[("k", "anything")]).is_some());
}

// ---------------------------------------------------------------------------------------
// replaces, as their service applies it (README, Example 7).

const EXAMPLE7: &str = r#"domain: example7
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
"#;

#[test]
fn replaces_drops_the_named_limit_across_the_request() {
    let set = parse(EXAMPLE7).unwrap();
    let one = desc(&[("key_1", "value_1"), ("user", "bkthomps")]);
    let two = desc(&[("key_2", "value_2"), ("user", "bkthomps")]);

    let alone = set.resolve("example7", std::slice::from_ref(&one));
    assert_eq!(only_limit(alone[0].as_ref().unwrap()).spec, per(5, 1));
    let alone = set.resolve("example7", std::slice::from_ref(&two));
    assert_eq!(only_limit(alone[0].as_ref().unwrap()).spec, per(10, 1));

    let both = set.resolve("example7", &[one.clone(), two.clone()]);
    assert!(both[0].is_none(), "specific_limit is replaced");
    assert_eq!(only_limit(both[1].as_ref().unwrap()).spec, per(10, 1));
    // Order does not matter.
    let both = set.resolve("example7", &[two, one]);
    assert!(both[1].is_none());
    assert!(both[0].is_some());
}

#[test]
fn replaces_ignores_unnamed_limits_and_unlimited_rules_still_replace() {
    // A default name is never replaced, even when written in `replaces`.
    let set = parse(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1}\n  - key: b\n    rate_limit:\n      unlimited: true\n      replaces: [{name: d.a}, {name: named}]\n  - key: c\n    rate_limit: {name: named, unit: second, requests_per_unit: 2}\n",
    )
    .unwrap();
    let out = set.resolve(
        "d",
        &[
            desc(&[("a", "1")]),
            desc(&[("b", "1")]),
            desc(&[("c", "1")]),
        ],
    );
    assert!(out[0].is_some(), "an unnamed limit is never replaced");
    assert!(out[1].as_ref().unwrap().unlimited, "unlimited stays");
    assert!(out[2].is_none(), "replaced by an unlimited rule");
}

#[test]
fn replaces_with_several_limits_keeps_the_others() {
    let set = parse(
        "domain: d\ndescriptors:\n  - key: a\n    rate_limits:\n      - {name: per_second, unit: second, requests_per_unit: 5}\n      - {name: per_day, unit: day, requests_per_unit: 1000}\n  - key: b\n    rate_limit:\n      unit: second\n      requests_per_unit: 9\n      replaces: [{name: per_day}]\n",
    )
    .unwrap();
    let out = set.resolve("d", &[desc(&[("a", "x")]), desc(&[("b", "y")])]);
    let a = out[0].as_ref().unwrap();
    assert_eq!(a.limits.len(), 1);
    assert_eq!(a.limits[0].name, "per_second");
    assert_eq!(a.path, "d.a");
    // The stored rule is untouched.
    assert_eq!(get(&set, "d", &[("a", "x")]).unwrap().limits.len(), 2);
}

// ---------------------------------------------------------------------------------------
// Our extensions.

#[test]
fn several_limits_algorithm_burst_and_window() {
    let set = parse(
        r#"domain: api
descriptors:
  - key: plan
    value: free
    descriptors:
      - key: user_id
        rate_limits:
          - name: burst
            window: 1500ms
            requests_per_unit: 3
            burst: 10
          - name: hourly
            unit: hour
            requests_per_unit: 100
            algorithm: sliding_window
          - name: daily
            window: 1d
            requests_per_unit: 1000
            algorithm: fixed_window
"#,
    )
    .unwrap();
    let rule = get(&set, "api", &[("plan", "free"), ("user_id", "u1")]).unwrap();
    let names: Vec<&str> = rule.limits.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["burst", "hourly", "daily"]);
    assert_eq!(
        rule.limits[0].spec,
        LimitSpec::new(
            Algorithm::TokenBucket,
            3,
            Duration::from_millis(1500),
            Some(10)
        )
        .unwrap()
    );
    assert_eq!(rule.limits[0].spec.limit(), 10);
    assert_eq!(
        rule.limits[1].spec,
        LimitSpec::SlidingWindow(Window {
            requests: 100,
            window_us: 3_600_000_000
        })
    );
    assert_eq!(
        rule.limits[2].spec,
        LimitSpec::FixedWindow(Window {
            requests: 1000,
            window_us: 86_400_000_000
        })
    );
}

#[test]
fn windows() {
    for (text, ms) in [
        ("1500ms", 1_500),
        ("30s", 30_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
    ] {
        assert_eq!(
            wire::parse_window(text).unwrap(),
            Duration::from_millis(ms),
            "{text}"
        );
    }
    for bad in [
        "",
        "s",
        "5",
        "5 s",
        "-5s",
        "1.5s",
        "5w",
        "99999999999999999999d",
    ] {
        assert!(wire::parse_window(bad).is_err(), "{bad}");
    }
    let err = refused(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {window: 400d, requests_per_unit: 1, algorithm: fixed_window}\n",
    );
    assert!(
        err.detail.contains("window must be from 1 ms to 366 days"),
        "{err}"
    );
    let err = refused(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {window: 0s, requests_per_unit: 1}\n",
    );
    assert!(err.detail.contains("window"), "{err}");
}

#[test]
fn extension_mistakes_are_refused() {
    let cases = [
        (
            "rate_limit: {unit: second, window: 1s, requests_per_unit: 1}",
            "either unit or window",
        ),
        ("rate_limit: {requests_per_unit: 1}", "unit is required"),
        (
            "rate_limit: {unit: second, requests_per_unit: 1, burst: 5, algorithm: fixed_window}",
            "burst applies to the token bucket only",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: 1, algorithm: leaky}",
            "unknown algorithm",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: 1}\n    rate_limits: [{name: a, unit: second, requests_per_unit: 1}]",
            "either rate_limit or rate_limits",
        ),
        (
            "rate_limits: [{unit: second, requests_per_unit: 1}]",
            "needs a name",
        ),
        (
            "rate_limits: [{name: a, unit: second, requests_per_unit: 1}, {name: a, unit: day, requests_per_unit: 9}]",
            "used twice",
        ),
        (
            "rate_limits: [{name: a, unit: second, requests_per_unit: 1}, {name: b, unit: day, requests_per_unit: 9, replaces: [{name: a}]}]",
            "same descriptor",
        ),
        (
            "rate_limits: [{unlimited: true, name: a}]",
            "only allowed in rate_limit",
        ),
        ("rate_limits: []", "at least one"),
        (
            "rate_limit: {unit: second, requests_per_unit: 0}",
            "must be from 1 to",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: 1000000001}",
            "must be from 1 to",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: 1e30}",
            "invalid type: floating point",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: -5}",
            "invalid type: integer `-5`",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: five}",
            "invalid type: string",
        ),
        (
            "rate_limit: {unit: second, requests_per_unit: 1, burst: 2000000000}",
            "capacity must be at most",
        ),
        // A token bucket refills at least one token a day: 5 a month must say what to do.
        (
            "rate_limit: {unit: month, requests_per_unit: 5}",
            "algorithm: fixed_window",
        ),
        (
            "rate_limit: {unlimited: true, algorithm: fixed_window}",
            "should not specify algorithm",
        ),
        ("shadow_mode: maybe", "invalid type"),
        ("rate_limit: [1, 2]", "invalid type: sequence"),
    ];
    for (yaml, expected) in cases {
        let text = format!("domain: d\ndescriptors:\n  - key: k\n    {yaml}\n");
        let err = refused(&text);
        assert!(
            err.to_string().contains(expected),
            "{yaml}: expected {expected:?} in {err}"
        );
        assert!(err.line.is_some(), "{yaml}: {err}");
        assert!(err.field.starts_with("descriptors[0]"), "{yaml}: {err}");
    }
}

#[test]
fn default_names_come_from_the_path_and_are_unique() {
    let set = parse(
        "domain: api\ndescriptors:\n  - key: plan\n    value: free\n    descriptors:\n      - key: user_id\n        rate_limit: {unit: second, requests_per_unit: 5}\n  - key: other\n    rate_limit: {name: api.plan_free.user_id, unit: second, requests_per_unit: 1}\n",
    )
    .unwrap();
    let rule = get(&set, "api", &[("plan", "free"), ("user_id", "u")]).unwrap();
    // The path name is taken by a name written in the file: the default gets a suffix.
    assert_eq!(only_limit(&rule).name, "api.plan_free.user_id#2");
    let set = parse(
        "domain: api\ndescriptors:\n  - key: plan\n    value: free\n    descriptors:\n      - key: user_id\n        rate_limit: {unit: second, requests_per_unit: 5}\n",
    )
    .unwrap();
    let rule = get(&set, "api", &[("plan", "free"), ("user_id", "u")]).unwrap();
    assert_eq!(only_limit(&rule).name, "api.plan_free.user_id");
}

#[test]
fn builtin_and_with_default() {
    let policy = Policy::new(10, 2.0).unwrap();
    let set = RuleSet::builtin(policy);
    assert_eq!(set.domains().collect::<Vec<_>>(), [DEFAULT_DOMAIN]);
    let rule = set
        .resolve(DEFAULT_DOMAIN, &[Descriptor::user("u1")])
        .pop()
        .flatten()
        .unwrap();
    assert_eq!(only_limit(&rule).name, "default");
    assert_eq!(only_limit(&rule).spec, LimitSpec::TokenBucket(policy));
    assert!(get(&set, DEFAULT_DOMAIN, &[("plan", "x")]).is_none());

    let set = parse(WILDCARD).unwrap().with_default(policy);
    assert_eq!(
        set.domains().collect::<Vec<_>>(),
        [DEFAULT_DOMAIN, "test-domain"]
    );
    // A file that defines the default domain keeps its own rules.
    let own = parse("domain: default\ndescriptors:\n  - key: user_id\n    rate_limit: {unit: second, requests_per_unit: 3}\n")
        .unwrap()
        .with_default(policy);
    let rule = own
        .resolve(DEFAULT_DOMAIN, &[Descriptor::user("u1")])
        .pop()
        .flatten()
        .unwrap();
    assert_eq!(only_limit(&rule).spec, per(3, 1));
}

// ---------------------------------------------------------------------------------------
// Hostile input: refused with a clear error, never a panic, never unbounded work.

#[test]
fn billion_laughs_is_bounded() {
    let mut text = String::from("domain: d\nx0: &a0 [{key: k}]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        text.push_str(&format!(
            "x{i}: &a{i} [{}]\n",
            [prev.as_str(); 10].join(", ")
        ));
    }
    // Refused for the unknown fields first; put the bomb where it is read too.
    let err = refused(&text);
    assert!(err.detail.contains("unknown field"), "{err}");

    let mut text =
        String::from("domain: d\ndescriptors:\n  - key: a0\n    descriptors: &a0 [{key: k}]\n");
    for i in 1..10 {
        let refs = (0..10).map(|j| format!("{{key: k{j}, descriptors: *a{}}}", i - 1));
        text.push_str(&format!(
            "  - key: a{i}\n    descriptors: &a{i} [{}]\n",
            refs.collect::<Vec<_>>().join(", ")
        ));
    }
    let started = std::time::Instant::now();
    let err = refused(&text);
    assert!(
        err.detail.contains("too many descriptors") || err.detail.contains("nested too deep"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // A huge string replayed through aliases is refused before it is copied.
    let big = "x".repeat(1_000_000);
    let mut text = format!("domain: d\ndescriptors:\n  - key: &big {big}\n");
    for i in 0..1_000 {
        text.push_str(&format!("  - key: *big\n    value: v{i}\n"));
    }
    let err = refused(&text);
    assert!(err.detail.contains("at most 256 bytes"), "{err}");
    assert_eq!(err.field, "descriptors[0].key");
}

#[test]
fn metadata_bombs_are_bounded() {
    let mut text = String::from(
        "domain: d\ndescriptors:\n  - key: k\n    metadata:\n      m0: &m0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n",
    );
    for i in 1..12 {
        let refs = vec![format!("*m{}", i - 1); 10].join(", ");
        text.push_str(&format!("      m{i}: &m{i} [{refs}]\n"));
    }
    let started = std::time::Instant::now();
    let err = refused(&text);
    assert!(
        err.detail.contains("metadata too large") || err.detail.contains("repetition limit"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The stack of a spawned thread (a test's, a tokio worker's) unless set otherwise.
const STACK: usize = 2 * 1024 * 1024;

#[test]
fn deep_nesting_is_refused_without_overflowing_the_stack() {
    // 10,000 levels of descriptors, in flow style, read on a small stack.
    let depth = 10_000;
    let mut text = String::from("domain: d\ndescriptors: ");
    for _ in 0..depth {
        text.push_str("[{key: k, descriptors: ");
    }
    text.push_str("[]");
    for _ in 0..depth {
        text.push_str("}]");
    }
    let started = std::time::Instant::now();
    let err = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || parse(&text).map(|_| ()))
        .unwrap()
        .join()
        .expect("no stack overflow")
        .unwrap_err();
    assert!(err.detail.contains("nested too deep"), "{err}");
    // libyaml takes time quadratic in flow nesting: refused before it is parsed.
    assert!(started.elapsed() < Duration::from_secs(1));

    // Plain YAML nesting, no descriptors at all.
    let text = format!(
        "domain: d\ndescriptors: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let err = std::thread::Builder::new()
        .stack_size(STACK)
        .spawn(move || parse(&text).map(|_| ()))
        .unwrap()
        .join()
        .expect("no stack overflow")
        .unwrap_err();
    assert!(err.detail.contains("nested too deep"), "{err}");
    assert_eq!(err.line, Some(2), "{err}");

    // Block style, which YAML reads in linear time: our own bound stops it.
    let mut text = String::from("domain: d\ndescriptors:\n");
    for level in 0..100 {
        let indent = "  ".repeat(level * 2);
        text.push_str(&format!("{indent}- key: k\n{indent}  descriptors:\n"));
    }
    let err = refused(&text);
    assert!(
        err.detail.contains("nested too deep: at most 16 levels"),
        "{err}"
    );
    assert_eq!(err.line, Some(35), "{err}");

    // MAX_DEPTH levels are fine, one more is not.
    let nested = |levels: usize| {
        let mut text = String::from("domain: d\ndescriptors: ");
        for _ in 0..levels {
            text.push_str("[{key: k, descriptors: ");
        }
        text.push_str("[]");
        for _ in 0..levels {
            text.push_str("}]");
        }
        text
    };
    assert!(parse(&nested(MAX_DEPTH)).is_ok());
    let err = refused(&nested(MAX_DEPTH + 1));
    assert!(
        err.detail.contains("nested too deep: at most 16 levels"),
        "{err}"
    );
}

#[test]
fn node_count_is_bounded_across_files() {
    let many = |n: usize| {
        let mut text = String::from("domain: d\ndescriptors:\n");
        for i in 0..n {
            text.push_str(&format!("  - key: k{i}\n"));
        }
        text
    };
    // The domain counts as one node.
    assert!(parse(&many(MAX_RULE_NODES - 1)).is_ok());
    let err = refused(&many(MAX_RULE_NODES));
    assert!(err.detail.contains("too many descriptors"), "{err}");
    assert!(err.line.is_some());

    let half = many(MAX_RULE_NODES / 2);
    let files = [
        ("a.yaml".to_owned(), half.clone()),
        ("b.yaml".to_owned(), half.replace("domain: d", "domain: e")),
    ];
    let err = RuleSet::from_files(&files).unwrap_err();
    assert_eq!(err.file, "b.yaml");
    assert!(err.detail.contains("too many descriptors"), "{err}");
}

#[test]
fn file_size_is_bounded() {
    let mut text = String::from("domain: d\n");
    text.push_str(&"#".repeat(MAX_RULES_FILE_BYTES));
    let err = refused(&text);
    assert!(err.detail.contains("at most 4194304"), "{err}");
}

#[test]
fn long_or_control_character_strings_are_refused() {
    let long = "k".repeat(MAX_KEY_BYTES + 1);
    let ok = "k".repeat(MAX_KEY_BYTES);
    // A value of 256 bytes; a key is held to a request's bound (128 bytes, see
    // `rules_no_request_can_match_are_refused_naming_the_line`).
    assert!(
        parse(&format!(
            "domain: d\ndescriptors:\n  - key: k\n    value: {ok}\n"
        ))
        .is_ok()
    );
    for yaml in [
        format!("domain: d\ndescriptors:\n  - key: {long}\n"),
        format!("domain: d\ndescriptors:\n  - key: k\n    value: {long}\n"),
        format!("domain: {long}\n"),
        format!(
            "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{name: {long}, unit: second, requests_per_unit: 1}}\n"
        ),
    ] {
        let err = refused(&yaml);
        assert!(err.detail.contains("at most 256 bytes"), "{err}");
    }
    for yaml in [
        "domain: d\ndescriptors:\n  - key: \"a\\tb\"\n",
        "domain: d\ndescriptors:\n  - key: k\n    value: \"a\\u0000b\"\n",
        "domain: \"x\\ny\"\n",
    ] {
        let err = refused(yaml);
        assert!(err.detail.contains("control characters"), "{err}");
    }
}

#[test]
fn more_hostile_shapes() {
    for yaml in [
        "",
        "[]",
        "just a string",
        "domain: [a]\n",
        "domain: d\ndescriptors: {key: k}\n",
        "domain: d\ndomain: e\n",
        "domain: d\n---\ndomain: e\n",
        "domain: d\ndescriptors:\n  - key: k\n    key: j\n",
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      replaces: {name: x}\n",
        "domain: d\ndescriptors:\n  - *unknown\n",
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 18446744073709551616}\n",
    ] {
        let err = refused(yaml);
        assert!(!err.to_string().is_empty());
    }
    // Too many replaces entries.
    let names: Vec<String> = (0..=MAX_REPLACES)
        .map(|i| format!("{{name: n{i}}}"))
        .collect();
    let err = refused(&format!(
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {{unit: second, requests_per_unit: 1, replaces: [{}]}}\n",
        names.join(", ")
    ));
    assert!(err.detail.contains("at most 64 entries"), "{err}");
}

#[test]
fn resolve_handles_odd_requests() {
    let set = parse(BASIC_CONFIG).unwrap();
    let out = set.resolve("test-domain", &[]);
    assert!(out.is_empty());
    let out = set.resolve("nope", &[desc(&[("key2", "x")]), desc(&[])]);
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(Option::is_none));
    // Entries with underscores meet envoyproxy/ratelimit's composite keys as theirs do.
    assert!(get(&set, "test-domain", &[("key2", "value2")]).is_some());
}

// ---------------------------------------------------------------------------------------
// Properties.

/// A plain glob matcher: `*` matches any run of characters.
fn glob(pattern: &[char], value: &[char]) -> bool {
    match pattern.split_first() {
        None => value.is_empty(),
        Some(('*', rest)) => (0..=value.len()).any(|i| glob(rest, &value[i..])),
        Some((c, rest)) => value.first() == Some(c) && glob(rest, &value[1..]),
    }
}

proptest! {
    #[test]
    fn wildcard_match_is_a_glob(pattern in "[ab*é]{0,8}", value in "[abé]{0,10}") {
        prop_assume!(pattern.contains('*'));
        let parts: Vec<String> = pattern.split('*').map(str::to_owned).collect();
        let p: Vec<char> = pattern.chars().collect();
        let v: Vec<char> = value.chars().collect();
        prop_assert_eq!(wildcard_match(&parts, &value), glob(&p, &v));
    }

    #[test]
    fn resolve_never_panics(
        entries in proptest::collection::vec(
            proptest::collection::vec((".{0,12}", ".{0,12}"), 0..5), 0..6),
        domain in prop_oneof![Just("test-domain".to_owned()), ".{0,8}"],
    ) {
        let set = parse(WILDCARD).unwrap();
        let set2 = parse(BASIC_CONFIG).unwrap();
        let descriptors: Vec<Descriptor> = entries
            .iter()
            .map(|e| Descriptor { entries: e.iter().map(|(k, v)| Entry::new(k.clone(), v.clone())).collect() })
            .collect();
        prop_assert_eq!(set.resolve(&domain, &descriptors).len(), descriptors.len());
        prop_assert_eq!(set2.resolve(&domain, &descriptors).len(), descriptors.len());
    }

    #[test]
    fn arbitrary_text_never_panics(text in "[a-z_:\\- \\[\\]{}&*!#'\"0-9\n]{0,200}") {
        let _ = parse(&text);
    }
}

/// A limit without a name is named after its place in the tree; deep in a tree of long
/// values that place is longer than a limit name may be: shortened, with a hash of the
/// whole, so two such limits keep two names and every name fits the bound the gateway's
/// refusal notices are held to.
#[test]
fn made_names_fit_the_limit_name_bound() {
    let v = |c: char| c.to_string().repeat(200);
    let text = format!(
        "domain: d\ndescriptors:\n  - key: a\n    value: {a}\n    descriptors:\n      - key: b\n        value: {b}\n        rate_limit: {{unit: minute, requests_per_unit: 1}}\n      - key: b\n        value: {c}\n        rate_limit: {{unit: minute, requests_per_unit: 2}}\n",
        a = v('a'),
        b = v('b'),
        c = v('c'),
    );
    let set = parse(&text).unwrap();
    let name = |last: char| {
        get(&set, "d", &[("a", &v('a')), ("b", &v(last))])
            .unwrap()
            .limits[0]
            .name
            .clone()
    };
    let (one, two) = (name('b'), name('c'));
    assert_ne!(one, two);
    for n in [&one, &two] {
        assert!(
            n.len() <= crate::api::MAX_LIMIT_NAME_BYTES,
            "{} bytes",
            n.len()
        );
        assert!(n.starts_with("d.a_aaaa"), "{n}");
    }
    // A short place keeps its name as before.
    let set = parse("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: 1}\n").unwrap();
    assert_eq!(get(&set, "d", &[("k", "x")]).unwrap().limits[0].name, "d.k");
}

/// A rule that no request could ever match is a mistake, refused at load naming the line:
/// a key longer than a request's (128 bytes), a value with a format character, a value not
/// in NFC (requests are compared in NFC).
#[test]
fn rules_no_request_can_match_are_refused_naming_the_line() {
    let rule = |key: &str, value: &str| {
        format!(
            "domain: d\ndescriptors:\n  - key: ok\n    rate_limit: {{unit: minute, requests_per_unit: 1}}\n  - key: \"{key}\"\n    value: \"{value}\"\n    rate_limit: {{unit: minute, requests_per_unit: 1}}\n"
        )
    };
    for (key, value, says) in [
        ("k".repeat(129), "v".to_owned(), "128"),
        ("k".to_owned(), "a\u{200b}b".to_owned(), "format"),
        ("k".to_owned(), "e\u{301}".to_owned(), "NFC"),
        ("k\u{202e}".to_owned(), "v".to_owned(), "format"),
    ] {
        let err = refused(&rule(&key, &value)).to_string();
        // The file, the line of the descriptors list and the descriptor's index.
        assert!(err.contains("rules.yaml:3:3: descriptors[1]"), "{err}");
        assert!(err.contains(says), "{err}");
    }
    // NFC text, and the longest key a request may carry, are fine.
    parse(&rule(&"k".repeat(128), "\u{e9}t\u{e9}")).unwrap();
}
