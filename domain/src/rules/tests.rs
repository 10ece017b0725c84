use super::*;

fn parse(text: &str) -> Result<RuleSet, RulesError> {
    RuleSet::from_files(&[("rules.yaml".to_owned(), text.to_owned())])
}

#[test]
fn probe() {
    for t in [
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 5\n",
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      request_per_unit: 5\n",
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n",
        "domain: a\ndescriptors:\n  - key: k\n    value: v\n  - key: k\n    value: v\n",
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      requests_per_unit: 1e30\n",
        "domain: a\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: second\n      requests_per_unit: -4\n",
        "'''\n",
        "domain: a\ndescriptors:\n  - value: v\n",
    ] {
        println!("{}", parse(t).unwrap_err());
        println!("{:?}", parse(t).unwrap_err());
    }
    panic!();
}
