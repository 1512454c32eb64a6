//! String, header and query-parameter matchers (`envoy.type.matcher.v3`).
use regex::Regex;

use super::HeaderKey;

/// A compiled regex that compares by its source text.
#[derive(Debug, Clone)]
pub struct Pattern(pub Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Pattern {
    /// Envoy's `safe_regex` matches the *whole* value (RE2 full match).
    pub fn full(re: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{re})$")).map(Pattern)
    }
    /// An unanchored regex (used by rewrites, which substitute every match).
    pub fn unanchored(re: &str) -> Result<Self, regex::Error> {
        Regex::new(re).map(Pattern)
    }
    pub fn is_match(&self, s: &str) -> bool {
        self.0.is_match(s)
    }
}

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct StringMatcher {
    pub kind: StringMatch,
    pub ignore_case: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Pattern),
}

impl StringMatcher {
    pub fn exact(s: impl Into<String>) -> Self {
        StringMatcher {
            kind: StringMatch::Exact(s.into()),
            ignore_case: false,
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match &self.kind {
            StringMatch::Regex(re) => re.is_match(v),
            StringMatch::Exact(s) if self.ignore_case => v.eq_ignore_ascii_case(s),
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) if self.ignore_case => {
                v.len() >= s.len()
                    && v.is_char_boundary(s.len())
                    && v[..s.len()].eq_ignore_ascii_case(s)
            }
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) if self.ignore_case => {
                v.len() >= s.len()
                    && v.is_char_boundary(v.len() - s.len())
                    && v[v.len() - s.len()..].eq_ignore_ascii_case(s)
            }
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Contains(s) if self.ignore_case => {
                v.to_ascii_lowercase().contains(&s.to_ascii_lowercase())
            }
            StringMatch::Contains(s) => v.contains(s.as_str()),
        }
    }
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct HeaderMatcher {
    pub name: HeaderKey,
    pub kind: HeaderMatch,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatch {
    /// `present_match`.
    Present(bool),
    /// `range_match`: `[start, end)`.
    Range(i64, i64),
    /// `exact_match`, `prefix_match`, ..., `safe_regex_match`, `string_match`.
    String(StringMatcher),
}

impl HeaderMatcher {
    /// Matches a header with several values: the comma-joined value, or
    /// (as Envoy 1.40 does for string matchers) any single value.
    pub fn matches_values(&self, values: &[&str]) -> bool {
        if values.len() <= 1 {
            return self.matches(values.first().copied());
        }
        let joined = values.join(",");
        if self.matches(Some(&joined)) {
            return true;
        }
        if self.invert || !matches!(self.kind, HeaderMatch::String(_)) {
            return false;
        }
        values.iter().any(|v| self.matches(Some(v)))
    }

    /// Envoy's `HeaderUtility::matchHeaders` against a request: a regular
    /// header is read from `headers` (several values as
    /// [`Self::matches_values`]); a pseudo-header from `pseudo`. Allocates
    /// only for a header with several values.
    pub fn matches_request<'a>(
        &self,
        headers: &http::HeaderMap,
        pseudo: impl FnOnce(&HeaderKey) -> Option<&'a str>,
    ) -> bool {
        let HeaderKey::Name(n) = &self.name else {
            return self.matches(pseudo(&self.name));
        };
        let mut all = headers.get_all(n).iter();
        match (all.next(), all.next()) {
            (None, _) => self.matches(None),
            (Some(v), None) => self.matches(Some(&String::from_utf8_lossy(v.as_bytes()))),
            _ => {
                let vals: Vec<std::borrow::Cow<'_, str>> = headers
                    .get_all(n)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()))
                    .collect();
                let refs: Vec<&str> = vals.iter().map(|v| &**v).collect();
                self.matches_values(&refs)
            }
        }
    }

    /// [`Self::matches_request`] on a request head: pseudo-headers read its
    /// method, URI (`:path` with the query) and `Host`.
    pub fn matches_head(&self, head: &http::request::Parts) -> bool {
        self.matches_request(&head.headers, |k| request_pseudo(head, k))
    }

    /// Matches against the header's value (several values joined with `,`).
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            None if self.treat_missing_as_empty => Some(""),
            v => v,
        };
        let hit = match (&self.kind, value) {
            (HeaderMatch::Present(p), v) => {
                // As Envoy: invert applies on top of present_match.
                return (v.is_some() == *p) != self.invert;
            }
            (_, None) => {
                // A missing header never matches, inverted or not (Envoy).
                return false;
            }
            (HeaderMatch::Range(lo, hi), Some(v)) => v
                .parse::<i64>()
                .map(|n| n >= *lo && n < *hi)
                .unwrap_or(false),
            (HeaderMatch::String(m), Some(v)) => m.matches(v),
        };
        hit != self.invert
    }
}

/// A pseudo-header of a request head (`None` for `:status` and regular
/// headers).
pub fn request_pseudo<'a>(head: &'a http::request::Parts, key: &HeaderKey) -> Option<&'a str> {
    match key {
        HeaderKey::Method => Some(head.method.as_str()),
        HeaderKey::Path => head.uri.path_and_query().map(|p| p.as_str()),
        HeaderKey::Authority => head.uri.authority().map(|a| a.as_str()).or_else(|| {
            head.headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
        }),
        HeaderKey::Scheme => head.uri.scheme_str(),
        HeaderKey::Status | HeaderKey::Name(_) => None,
    }
}

/// `envoy.config.route.v3.QueryParameterMatcher`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryMatcher {
    pub name: String,
    /// `None` is `present_match: true`.
    pub matcher: Option<StringMatcher>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(kind: HeaderMatch, invert: bool) -> HeaderMatcher {
        HeaderMatcher {
            name: HeaderKey::Name(http::HeaderName::from_static("x")),
            kind,
            invert,
            treat_missing_as_empty: false,
        }
    }

    #[test]
    fn header_matcher_semantics() {
        let exact = hm(HeaderMatch::String(StringMatcher::exact("a")), false);
        assert!(exact.matches(Some("a")));
        assert!(!exact.matches(Some("b")));
        assert!(!exact.matches(None));
        let inv = hm(HeaderMatch::String(StringMatcher::exact("a")), true);
        assert!(inv.matches(Some("b")));
        assert!(!inv.matches(None), "missing header does not match inverted");
        let absent = hm(HeaderMatch::Present(false), false);
        assert!(absent.matches(None));
        let range = hm(HeaderMatch::Range(1, 10), false);
        assert!(range.matches(Some("9")));
        assert!(!range.matches(Some("10")));
        assert!(!range.matches(Some("x")));
    }

    #[test]
    fn ignore_case_prefix_suffix() {
        let m = StringMatcher {
            kind: StringMatch::Prefix("AbC".into()),
            ignore_case: true,
        };
        assert!(m.matches("abcdef"));
        let m = StringMatcher {
            kind: StringMatch::Suffix("ÉF".into()),
            ignore_case: true,
        };
        assert!(!m.matches("a")); // shorter, no panic
    }
}
