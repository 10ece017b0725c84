//! Rules: which limits apply to a request's descriptors.
//!
//! Rules are written in envoyproxy/ratelimit's configuration format, read unchanged, plus
//! our extensions (several limits per descriptor, `algorithm`, `burst`, `window`); see
//! `docs/rules.md`. The parts:
//!
//! - [`RuleSet::from_files`] reads and validates rules files (the caller reads the files;
//!   this crate has no I/O). Every error names the file, line, column and field.
//! - [`RuleSet::resolve`] gives each descriptor of a request the [`Rule`] it matches,
//!   walking the tree exactly as envoyproxy/ratelimit's `GetLimit` does, then applies
//!   `replaces` across the request as their service does.
//! - [`RuleSet::builtin`] / [`RuleSet::with_default`]: the rule of a request that names only a
//!   user (`default` domain, `user_id` key).
//!
//! Every input has a bound, checked while reading: [`MAX_RULES_FILE_BYTES`] (by the caller,
//! before reading the file), [`MAX_RULE_NODES`], [`MAX_DEPTH`], [`MAX_KEY_BYTES`],
//! [`MAX_LIMITS_PER_DESCRIPTOR`], [`MAX_REPLACES`], [`MAX_METADATA_NODES`].

mod wire;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::bucket::Policy;
use crate::descriptor::{DEFAULT_DOMAIN, Descriptor, USER_ID_KEY};
use crate::limits::LimitSpec;

use wire::{DescriptorNode, FileWire, LimitsDraft, ReadGuard, Text};

/// The largest rules file, in bytes. The caller checks it before reading the file;
/// [`RuleSet::from_files`] refuses a longer text too.
pub const MAX_RULES_FILE_BYTES: usize = 4 * 1024 * 1024;
/// The most descriptor nodes in a rule set, all files together (each domain counts as one).
pub const MAX_RULE_NODES: usize = 10_000;
/// The deepest nesting of descriptors (a descriptor at the top level is at depth 1).
pub const MAX_DEPTH: usize = 16;
/// The longest domain, key, value or limit name, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// The most limits one descriptor's `rate_limits` may list.
pub const MAX_LIMITS_PER_DESCRIPTOR: usize = 16;
/// The most `replaces` entries of one limit.
pub const MAX_REPLACES: usize = 64;
/// The most values (scalars, lists and mappings) of `metadata` in one file.
pub const MAX_METADATA_NODES: usize = 10_000;
/// The deepest nesting of YAML flow collections (`[` and `{`), checked on the text before it
/// is parsed: libyaml's time grows with the square of this nesting. The YAML crate refuses
/// more than 128 levels of any nesting anyway.
const MAX_FLOW_NESTING: usize = 128;

/// One limit of a rule, and the name it is known by.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedLimit {
    /// The `name` written in the file or, when absent, one made from the domain and the
    /// descriptor path (`api.plan_free.user_id`), unique within the rule set.
    pub name: String,
    /// Whether `name` was written in the file: only such names are matched by `replaces`,
    /// as in envoyproxy/ratelimit, where a limit without a name is never replaced.
    pub explicit_name: bool,
    pub spec: LimitSpec,
}

/// What one matched descriptor gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The rule's place in the tree, as envoyproxy/ratelimit names it in its statistics:
    /// the domain and the composite keys (`key` or `key_value`) down to it, joined by dots.
    pub path: String,
    /// The limits to enforce, all together; empty when `unlimited`.
    pub limits: Vec<NamedLimit>,
    /// `unlimited: true`: the descriptor is never limited.
    pub unlimited: bool,
    /// `shadow_mode`: counted and reported, never refused.
    pub shadow: bool,
    /// `detailed_metric`: statistics per value rather than per rule.
    pub detailed_metric: bool,
    /// The names of the limits this rule switches off when both apply to one request.
    pub replaces: Vec<String>,
}

/// Why rules files were refused: where, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {}{detail}", position(*.line, *.column), field_prefix(.field))]
pub struct RulesError {
    pub file: String,
    /// 1-based.
    pub line: Option<usize>,
    /// 1-based.
    pub column: Option<usize>,
    /// The path of the offending field (`descriptors[0].rate_limit.unit`), empty for an error
    /// of the file as a whole (bad YAML).
    pub field: String,
    pub detail: String,
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(":{line}:{column}"),
        (Some(line), None) => format!(":{line}"),
        _ => String::new(),
    }
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl RulesError {
    fn whole(file: &str, field: &str, detail: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line: None,
            column: None,
            field: field.to_owned(),
            detail: detail.into(),
        }
    }
}

/// One node of a domain's descriptor tree, as envoyproxy/ratelimit's `rateLimitDescriptor`.
#[derive(Debug, Default)]
struct Node {
    /// Children by composite key: `key` (any value) or `key_value`.
    children: HashMap<String, Node>,
    /// The children whose composite key holds a `*`, in file order, pre-split on `*`.
    wildcards: Vec<Wildcard>,
    rule: Option<Arc<Rule>>,
}

#[derive(Debug)]
struct Wildcard {
    key: String,
    parts: Vec<String>,
}

/// Rules of every domain: parsed, validated, ready to match.
#[derive(Debug, Default)]
pub struct RuleSet {
    domains: BTreeMap<String, Node>,
}

impl RuleSet {
    /// Parses and validates one or more rule files (name, text); one domain per file; a domain
    /// in two files is an error.
    pub fn from_files(files: &[(String, String)]) -> Result<RuleSet, RulesError> {
        let mut read: Vec<(&str, String, Vec<DescriptorNode>)> = Vec::new();
        let mut used = 0;
        for (file, text) in files {
            if text.len() > MAX_RULES_FILE_BYTES {
                return Err(RulesError::whole(
                    file,
                    "",
                    format!(
                        "the file is {} bytes; at most {MAX_RULES_FILE_BYTES} are allowed",
                        text.len()
                    ),
                ));
            }
            // The domain itself counts as a node, so many empty files are bounded too.
            if used >= MAX_RULE_NODES {
                return Err(RulesError::whole(
                    file,
                    "",
                    format!("too many descriptors: a rule set holds at most {MAX_RULE_NODES}"),
                ));
            }
            let (domain, nodes, n) = read_file(file, text, MAX_RULE_NODES - used - 1)?;
            used += n + 1;
            if let Some((other, _, _)) = read.iter().find(|(_, d, _)| *d == domain) {
                return Err(RulesError::whole(
                    file,
                    "domain",
                    format!("duplicate domain '{domain}' in config file (also in {other})"),
                ));
            }
            read.push((file, domain, nodes));
        }

        // Default names must not take a name written in a file.
        let mut taken: HashSet<String> = HashSet::new();
        for (_, _, nodes) in &read {
            collect_explicit_names(nodes, &mut taken);
        }
        let mut set = RuleSet::default();
        for (_, domain, nodes) in read {
            let mut root = Node::default();
            add_children(&mut root, &domain, nodes, &mut taken);
            set.domains.insert(domain, root);
        }
        Ok(set)
    }

    /// The built-in rule set: domain [`DEFAULT_DOMAIN`], key [`USER_ID_KEY`] (any value), one
    /// token-bucket limit from `policy` (name `default`).
    pub fn builtin(policy: Policy) -> RuleSet {
        let mut set = RuleSet::default();
        set.domains
            .insert(DEFAULT_DOMAIN.to_owned(), builtin_domain(policy));
        set
    }

    /// `self` plus the built-in default domain when `self` does not define
    /// [`DEFAULT_DOMAIN`].
    pub fn with_default(mut self, policy: Policy) -> RuleSet {
        self.domains
            .entry(DEFAULT_DOMAIN.to_owned())
            .or_insert_with(|| builtin_domain(policy));
        self
    }

    /// The domains defined, in order.
    pub fn domains(&self) -> impl Iterator<Item = &str> {
        self.domains.keys().map(String::as_str)
    }

    /// One entry per descriptor, in order: the rule it matched (`None`: no rule, i.e.
    /// unlimited by absence, or every limit of its rule replaced), after `replaces` is applied
    /// across the request as envoyproxy/ratelimit applies it.
    ///
    /// As theirs: the names that every matched rule `replaces` (an unlimited rule's too) are
    /// gathered; then each limited rule loses its limits with those names. A rule left with
    /// none becomes `None`. An unlimited rule is kept as it is (`unlimited: true`).
    pub fn resolve(&self, domain: &str, descriptors: &[Descriptor]) -> Vec<Option<Arc<Rule>>> {
        let Some(root) = self.domains.get(domain) else {
            return vec![None; descriptors.len()];
        };
        let mut rules: Vec<Option<Arc<Rule>>> =
            descriptors.iter().map(|d| root.limit_for(d)).collect();

        let replacing: HashSet<&str> = rules
            .iter()
            .flatten()
            .flat_map(|rule| rule.replaces.iter().map(String::as_str))
            .collect();
        if replacing.is_empty() {
            return rules;
        }
        let replaced = |l: &NamedLimit| l.explicit_name && replacing.contains(l.name.as_str());
        let mut changes: Vec<(usize, Option<Arc<Rule>>)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let Some(rule) = rule else { continue };
            if rule.unlimited || !rule.limits.iter().any(replaced) {
                continue;
            }
            let kept: Vec<NamedLimit> = rule
                .limits
                .iter()
                .filter(|l| !replaced(l))
                .cloned()
                .collect();
            let resolved = (!kept.is_empty()).then(|| {
                Arc::new(Rule {
                    limits: kept,
                    ..Rule::clone(rule)
                })
            });
            changes.push((i, resolved));
        }
        for (i, resolved) in changes {
            rules[i] = resolved;
        }
        rules
    }
}

impl Node {
    /// envoyproxy/ratelimit's `GetLimit` walk: at each entry, the exact `key_value` child,
    /// else the first wildcard child (in file order) that matches `key_value`, else the
    /// `key` child (any value). The rule applies only when the descriptor's last entry lands
    /// on a node with a rule; the walk stops where nothing matches or a node has no children.
    fn limit_for(&self, descriptor: &Descriptor) -> Option<Arc<Rule>> {
        let mut node = self;
        let last = descriptor.entries.len().checked_sub(1)?;
        // `key_value`, built in place in one buffer for every entry of the descriptor.
        let mut composite = String::new();
        for (i, entry) in descriptor.entries.iter().enumerate() {
            composite.clear();
            composite.push_str(&entry.key);
            composite.push('_');
            composite.push_str(&entry.value);
            let next = node
                .children
                .get(&composite)
                .or_else(|| {
                    node.wildcards
                        .iter()
                        .find(|w| wildcard_match(&w.parts, &composite))
                        .and_then(|w| node.children.get(&w.key))
                })
                .or_else(|| node.children.get(&entry.key))?;
            if i == last {
                return next.rule.clone();
            }
            if next.children.is_empty() {
                return None;
            }
            node = next;
        }
        None
    }
}

/// envoyproxy/ratelimit's `wildcardMatch`: `parts` is the pattern split on `*`; each `*`
/// matches any run of characters, the empty one included.
fn wildcard_match(parts: &[String], value: &str) -> bool {
    let [first, .., last] = parts else {
        return parts.first().is_some_and(|only| only == value);
    };
    if !value.starts_with(first.as_str()) || !value.ends_with(last.as_str()) {
        return false;
    }
    let fixed: usize = parts.iter().map(String::len).sum();
    if value.len() < fixed {
        return false;
    }
    // Never panics: both ends are char boundaries, and the fixed parts fit in `value`.
    let Some(mut remaining) = value.get(first.len()..value.len() - last.len()) else {
        return false;
    };
    for part in &parts[1..parts.len() - 1] {
        match remaining.find(part.as_str()) {
            Some(at) => remaining = &remaining[at + part.len()..],
            None => return false,
        }
    }
    true
}

fn builtin_domain(policy: Policy) -> Node {
    let rule = Rule {
        path: format!("{DEFAULT_DOMAIN}.{USER_ID_KEY}"),
        limits: vec![NamedLimit {
            name: "default".to_owned(),
            explicit_name: false,
            spec: LimitSpec::TokenBucket(policy),
        }],
        unlimited: false,
        shadow: false,
        detailed_metric: false,
        replaces: Vec::new(),
    };
    let mut root = Node::default();
    root.children.insert(
        USER_ID_KEY.to_owned(),
        Node {
            rule: Some(Arc::new(rule)),
            ..Node::default()
        },
    );
    root
}

/// Reads one file: its domain, its descriptors and how many descriptor nodes they hold.
fn read_file(
    file: &str,
    text: &str,
    budget: usize,
) -> Result<(String, Vec<DescriptorNode>, usize), RulesError> {
    check_flow_nesting(file, text)?;
    let guard = ReadGuard::new(budget);
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let wire: FileWire = serde_path_to_error::deserialize(de).map_err(|e| yaml_error(file, e))?;
    let used = guard.used();
    drop(guard);
    let domain = match wire.domain {
        Some(Text(d)) if !d.is_empty() => d,
        _ => {
            return Err(RulesError::whole(
                file,
                "domain",
                "config file cannot have empty domain",
            ));
        }
    };
    Ok((domain, wire.descriptors.unwrap_or_default().0, used))
}

/// Refuses text whose `[` and `{` nest deeper than [`MAX_FLOW_NESTING`]. Conservative: it
/// counts brackets in strings and comments too, which a rules file would need hundreds of,
/// unbalanced, to be refused wrongly.
fn check_flow_nesting(file: &str, text: &str) -> Result<(), RulesError> {
    let mut depth = 0usize;
    let mut line = 1;
    for b in text.bytes() {
        match b {
            b'\n' => line += 1,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_NESTING {
                    return Err(RulesError {
                        line: Some(line),
                        ..RulesError::whole(
                            file,
                            "",
                            format!(
                                "nested too deep: at most {MAX_FLOW_NESTING} levels of [ and {{"
                            ),
                        )
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// A YAML or validation error, with its position and field path and without the
/// position and path the YAML crate writes into its message (also what the gateway's
/// descriptors file reports).
pub fn yaml_error(file: &str, err: serde_path_to_error::Error<serde_yaml_ng::Error>) -> RulesError {
    let path = err.path().to_string();
    let field = if path == "." || path == "?" {
        String::new()
    } else {
        path
    };
    let inner = err.into_inner();
    let location = inner.location();
    let mut detail = inner.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = detail.strip_suffix(&suffix) {
            detail = stripped.to_owned();
        }
    }
    // serde_yaml_ng prefixes the path where it caught the error ("descriptors: ..."), a
    // prefix of the field path: drop it, the field says it.
    if let Some((head, rest)) = detail.split_once(": ") {
        let is_prefix = field == head
            || field
                .strip_prefix(head)
                .is_some_and(|tail| tail.starts_with('.') || tail.starts_with('['));
        if is_prefix {
            detail = rest.to_owned();
        }
    }
    RulesError {
        file: file.to_owned(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()),
        field,
        detail,
    }
}

fn collect_explicit_names(nodes: &[DescriptorNode], taken: &mut HashSet<String>) {
    for node in nodes {
        if let Some(LimitsDraft::Limited(limits)) = &node.limits {
            taken.extend(limits.iter().filter_map(|l| l.name.clone()));
        }
        // Depth is bounded by MAX_DEPTH, checked while reading.
        collect_explicit_names(&node.children, taken);
    }
}

/// Builds the children of `parent` (whose path is `path`) from validated descriptors.
fn add_children(
    parent: &mut Node,
    path: &str,
    nodes: Vec<DescriptorNode>,
    taken: &mut HashSet<String>,
) {
    for node in nodes {
        let composite = node.composite_key();
        let node_path = format!("{path}.{composite}");
        let rule = node.limits.map(|limits| {
            let (limits, unlimited, replaces) = match limits {
                LimitsDraft::Unlimited { replaces } => (Vec::new(), true, replaces),
                LimitsDraft::Limited(limits) => {
                    let mut replaces = Vec::new();
                    let named = limits
                        .into_iter()
                        .map(|l| {
                            replaces.extend(l.replaces);
                            let explicit_name = l.name.is_some();
                            let name = l.name.unwrap_or_else(|| unique_name(&node_path, taken));
                            NamedLimit {
                                name,
                                explicit_name,
                                spec: l.spec,
                            }
                        })
                        .collect();
                    (named, false, replaces)
                }
            };
            Arc::new(Rule {
                path: node_path.clone(),
                limits,
                unlimited,
                shadow: node.shadow,
                detailed_metric: node.detailed_metric,
                replaces,
            })
        });
        let mut child = Node {
            rule,
            ..Node::default()
        };
        add_children(&mut child, &node_path, node.children, taken);
        if composite.contains('*') {
            parent.wildcards.push(Wildcard {
                parts: composite.split('*').map(str::to_owned).collect(),
                key: composite.clone(),
            });
        }
        parent.children.insert(composite, child);
    }
}

/// `path`, or `path#2`, `path#3`... when a name written in a file took it; a path longer
/// than [`crate::api::MAX_LIMIT_NAME_BYTES`] allows is shortened to its start and a hash of
/// the whole (so every limit name, written or made, fits the bound the gateway and the
/// limiter share).
fn unique_name(path: &str, taken: &mut HashSet<String>) -> String {
    let path = bounded_name(path);
    let mut name = path.clone();
    let mut n = 1;
    while taken.contains(&name) {
        n += 1;
        name = format!("{path}#{n}");
    }
    taken.insert(name.clone());
    name
}

/// `path` itself when it leaves room for a `#n` suffix within the name bound, else its
/// first bytes, `~` and a 64-bit FNV-1a hash of all of it, in hex (stable across builds).
fn bounded_name(path: &str) -> String {
    const ROOM: usize = crate::api::MAX_LIMIT_NAME_BYTES - 8;
    if path.len() <= ROOM {
        return path.to_owned();
    }
    let hash = crate::keys::stable_hash(path);
    let mut end = ROOM - 17;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}~{hash:016x}", &path[..end])
}

/// An override's limits (the admin API), from JSON: a list whose items read as the items of
/// a rules file's `rate_limits` (the same fields and checks); each needs a `name`, unique
/// in the list. `[{"unlimited": true}]` alone makes the descriptor unlimited. Returns the
/// limits and whether the descriptor is unlimited.
pub fn limits_from_json(value: serde_json::Value) -> Result<(Vec<NamedLimit>, bool), String> {
    let _guard = wire::ReadGuard::new(1);
    let drafts: Vec<wire::LimitDraft> = serde_path_to_error::deserialize(value)
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    if drafts.is_empty() || drafts.len() > MAX_LIMITS_PER_DESCRIPTOR {
        return Err(format!("must hold 1 to {MAX_LIMITS_PER_DESCRIPTOR} limits"));
    }
    let mut limits: Vec<NamedLimit> = Vec::new();
    let mut unlimited = false;
    for (i, draft) in drafts.into_iter().enumerate() {
        match draft {
            wire::LimitDraft::Unlimited { .. } => unlimited = true,
            wire::LimitDraft::Limited(one) => {
                if !one.replaces.is_empty() {
                    return Err(format!("[{i}].replaces: is not supported in an override"));
                }
                let name = one
                    .name
                    .ok_or_else(|| format!("[{i}].name: is required in an override"))?;
                if limits.iter().any(|l| l.name == name) {
                    return Err(format!("[{i}].name: {name:?} is given twice"));
                }
                limits.push(NamedLimit {
                    name,
                    explicit_name: true,
                    spec: one.spec,
                });
            }
        }
    }
    if unlimited && !limits.is_empty() {
        return Err("an unlimited override cannot also have limits".to_owned());
    }
    Ok((limits, unlimited))
}
