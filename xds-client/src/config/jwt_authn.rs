//! `envoy.filters.http.jwt_authn` (Istio's RequestAuthentication):
//! providers with their JWKS parsed once, rules and named requirements
//! resolved to provider indices. The JWKS parser follows Envoy's
//! `jwt_verify_lib` (`Jwks::createFrom`): keys it cannot use are skipped, a
//! JWKS with no usable key is an error with Envoy's status text.
use std::sync::Arc;

use base64::Engine;
use http::HeaderName;
use serde_json::{Map, Value};

use super::RouteMatch;

/// `envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtAuthn {
    /// `providers`, sorted by name (requirements refer to them by index).
    pub providers: Vec<Arc<JwtProvider>>,
    /// `rules`, in order: the first whose match matches the request picks
    /// the requirement (`None`: no verification, as Envoy's null verifier).
    pub rules: Vec<JwtRule>,
    /// `requirement_map`, sorted by name (for `PerRouteConfig.requirement_name`).
    pub requirement_map: Vec<(String, Arc<JwtRequirement>)>,
    pub bypass_cors_preflight: bool,
    pub strip_failure_response: bool,
}

impl JwtAuthn {
    /// The named requirement of `requirement_map`.
    pub fn requirement(&self, name: &str) -> Option<&Arc<JwtRequirement>> {
        self.requirement_map
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .map(|i| &self.requirement_map[i].1)
    }

    /// The names of `requirement_map` joined by `,` (Envoy's
    /// `all_requirement_names_`, sorted).
    pub fn requirement_names(&self) -> String {
        let names: Vec<&str> = self
            .requirement_map
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        names.join(",")
    }
}

/// `RequirementRule`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtRule {
    pub matcher: RouteMatch,
    pub requires: Option<Arc<JwtRequirement>>,
}

/// `JwtRequirement`.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtRequirement {
    /// `provider_name` (`audiences: None`) or `provider_and_audiences`
    /// (its audiences replace the provider's).
    Provider {
        provider: usize,
        audiences: Option<Vec<String>>,
    },
    /// `requires_any`: the listed requirements (never `AllowMissing*`);
    /// an `allow_missing` / `allow_missing_or_failed` in the list is a flag
    /// on the group, as Envoy's `AnyVerifierImpl`.
    Any {
        requirements: Vec<JwtRequirement>,
        allow_missing: bool,
        allow_missing_or_failed: bool,
    },
    /// `requires_all`.
    All(Vec<JwtRequirement>),
    /// `allow_missing_or_failed`: tokens of every provider are verified,
    /// the request passes anyway.
    AllowMissingOrFailed,
    /// `allow_missing`: passes without a token, fails with a bad one.
    AllowMissing,
    /// A requirement with nothing set: always satisfied.
    AllowAll,
}

/// `JwtProvider`.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtProvider {
    /// The key in `providers`.
    pub name: String,
    /// `issuer` (empty: any issuer).
    pub issuer: String,
    /// `audiences` (empty: any audience).
    pub audiences: Vec<String>,
    /// `forward`: keep the token in the request.
    pub forward: bool,
    /// `from_headers`: (header, value prefix).
    pub from_headers: Vec<(HeaderName, String)>,
    pub from_params: Vec<String>,
    pub from_cookies: Vec<String>,
    pub forward_payload_header: Option<HeaderName>,
    pub pad_forward_payload_header: bool,
    /// `payload_in_metadata` (empty: not written).
    pub payload_in_metadata: String,
    /// `header_in_metadata` (empty: not written).
    pub header_in_metadata: String,
    /// `clock_skew_seconds` (0: Envoy's default 60).
    pub clock_skew_seconds: u64,
    /// `claim_to_headers`: (header, claim path with `.` between keys).
    pub claim_to_headers: Vec<(HeaderName, String)>,
    /// Where the keys come from.
    pub jwks: JwksSource,
}

/// `jwks_source_specifier`.
#[derive(Debug, Clone, PartialEq)]
pub enum JwksSource {
    /// `local_jwks`, parsed.
    Local(Arc<Jwks>),
    /// `remote_jwks`: fetched through a cluster on first use.
    Remote(Arc<RemoteJwks>),
}

/// `RemoteJwks`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteJwks {
    /// `http_uri.uri`, whole (for logs).
    pub uri: String,
    /// `:authority` of the fetch (the URI's host and port).
    pub authority: String,
    /// `:path` of the fetch (path and query).
    pub path: String,
    /// `http_uri.cluster`.
    pub cluster: String,
    /// `http_uri.timeout`.
    pub timeout: std::time::Duration,
    /// `cache_duration` (default 10 minutes, as Envoy).
    pub cache_duration: std::time::Duration,
}

/// `envoy.extensions.filters.http.jwt_authn.v3.PerRouteConfig`.
#[derive(Debug, Clone, PartialEq)]
pub enum JwtPerRoute {
    /// `disabled: true`: no verification on the route.
    Disabled,
    /// `requirement_name`: a requirement of `requirement_map`.
    RequirementName(String),
}

/// A parsed JSON Web Key Set: the keys weir can verify with.
#[derive(Debug, Clone, PartialEq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// One usable key.
#[derive(Debug, Clone, PartialEq)]
pub struct Jwk {
    /// `kid` (empty when absent).
    pub kid: String,
    /// `alg` (empty when absent).
    pub alg: String,
    pub key: JwkKey,
}

/// Key material, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum JwkKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// P-256 or P-384 (`x`, `y`: the point's coordinates).
    Ec {
        p384: bool,
        x: Vec<u8>,
        y: Vec<u8>,
    },
    Ed25519 {
        x: Vec<u8>,
    },
    /// `oct`: an HMAC secret.
    Oct {
        k: Vec<u8>,
    },
}

/// Base64url as `absl::WebSafeBase64Unescape`: with or without padding.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

impl Jwks {
    /// Parses a JWKS as Envoy's `Jwks::createFrom(.., JWKS)`; the error is
    /// Envoy's status text (`Jwks doesn't have any valid public key`, ...).
    pub fn parse(json: &str) -> Result<Jwks, &'static str> {
        let v: Value = serde_json::from_str(json).map_err(|_| "Jwks is an invalid JSON")?;
        let Some(obj) = v.as_object() else {
            return Err("Jwks is an invalid JSON");
        };
        let Some(keys) = obj.get("keys") else {
            return Err("Jwks does not have [keys] field");
        };
        let Some(keys) = keys.as_array() else {
            return Err("[keys] in Jwks is not an array");
        };
        // As jwt_verify_lib: keys that cannot be used are skipped.
        let out: Vec<Jwk> = keys
            .iter()
            .filter_map(|k| jwk(k.as_object()?).ok())
            .collect();
        if out.is_empty() {
            return Err("Jwks doesn't have any valid public key");
        }
        Ok(Jwks { keys: out })
    }
}

/// A string member: `Ok(None)` when missing, `Err` when not a string.
fn string<'a>(k: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>, ()> {
    match k.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(()),
    }
}

/// As jwt_verify_lib's `extractJwk`.
fn jwk(k: &Map<String, Value>) -> Result<Jwk, &'static str> {
    let kty = match string(k, "kty") {
        Ok(Some(s)) => s,
        Ok(None) => return Err("[kty] is missing in [keys]"),
        Err(()) => return Err("[kty] is bad in [keys]"),
    };
    let kid = string(k, "kid").ok().flatten().unwrap_or("").to_owned();
    let alg = string(k, "alg").ok().flatten().unwrap_or("").to_owned();
    let member = |name: &str, missing: &'static str, bad: &'static str| match string(k, name) {
        Ok(Some(s)) => Ok(s),
        Ok(None) => Err(missing),
        Err(()) => Err(bad),
    };
    let key = match kty {
        "RSA" => {
            if !alg.is_empty() && !alg.starts_with("RS") && !alg.starts_with("PS") {
                return Err("[alg] is not started with [RS] or [PS] for an RSA key");
            }
            let n = member(
                "n",
                "[n] field is missing for a RSA key",
                "[n] field is not string for a RSA key",
            )?;
            let e = member(
                "e",
                "[e] field is missing for a RSA key",
                "[e] field is not string for a RSA key",
            )?;
            const RSA: &str = "Jwks RSA [n] or [e] field is missing or has a parse error";
            let n = base64url_decode(n).ok_or(RSA)?;
            let e = base64url_decode(e).ok_or(RSA)?;
            if n.is_empty() || e.is_empty() {
                return Err(RSA);
            }
            JwkKey::Rsa { n, e }
        }
        "EC" => {
            if !alg.is_empty() && !alg.starts_with("ES") {
                return Err("[alg] is not started with [ES] for an EC key");
            }
            let crv = match string(k, "crv") {
                Ok(c) => c.unwrap_or(""),
                Err(()) => return Err("[crv] field is not string for an EC key"),
            };
            // The curve from `crv`, else from `alg` (P-256 by default).
            let crv = match (crv, alg.as_str()) {
                ("", "ES384") => "P-384",
                ("", "ES512") => "P-521",
                ("", _) => "P-256",
                (c, _) => c,
            };
            let p384 = match crv {
                "P-256" => false,
                "P-384" => true,
                // P-521 (ES512) has no implementation here (ring).
                _ => return Err("[crv] or [alg] field is not supported for an EC key"),
            };
            let compatible = match alg.as_str() {
                "" => true,
                "ES256" => !p384,
                "ES384" => p384,
                _ => false,
            };
            if !compatible {
                return Err("[crv] field specified is not compatible with [alg] for an EC key");
            }
            let x = member(
                "x",
                "[x] field is missing for an EC key",
                "[x] field is not string for an EC key",
            )?;
            let y = member(
                "y",
                "[y] field is missing for an EC key",
                "[y] field is not string for an EC key",
            )?;
            const B64: &str = "Jwks EC [x] or [y] field is an invalid Base64.";
            let x = base64url_decode(x).ok_or(B64)?;
            let y = base64url_decode(y).ok_or(B64)?;
            let len = if p384 { 48 } else { 32 };
            if x.len() != len || y.len() != len {
                return Err("Jwks EC [x] and [y] fields have a parse error.");
            }
            JwkKey::Ec { p384, x, y }
        }
        "OKP" => {
            if !alg.is_empty() && alg != "EdDSA" {
                return Err("[alg] is not [EdDSA] for an OKP key");
            }
            let crv = member(
                "crv",
                "[crv] field is missing for an OKP key",
                "[crv] field is not string for an OKP key",
            )?;
            if crv != "Ed25519" {
                return Err("[crv] field is not supported for an OKP key");
            }
            let x = member(
                "x",
                "[x] field is missing for an OKP key",
                "[x] field is not string for an OKP key",
            )?;
            let x = base64url_decode(x).ok_or("Jwks OKP [x] field is an invalid Base64.")?;
            if x.len() != 32 {
                return Err("Jwks OKP [x] field is wrong length.");
            }
            JwkKey::Ed25519 { x }
        }
        "oct" => {
            if !alg.is_empty() && !alg.starts_with("HS") {
                return Err("[alg] does not start with [HS] for an HMAC key");
            }
            let kv = member(
                "k",
                "[k] field is missing for an HMAC key",
                "[k] field is not string for an HMAC key",
            )?;
            let k = base64url_decode(kv).ok_or("Jwks Oct key is an invalid Base64")?;
            if k.is_empty() {
                return Err("Jwks Oct key is an invalid Base64");
            }
            JwkKey::Oct { k }
        }
        _ => return Err("[kty] is not supported in [keys]"),
    };
    Ok(Jwk { kid, alg, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_statuses_as_envoy() {
        assert_eq!(Jwks::parse("{"), Err("Jwks is an invalid JSON"));
        assert_eq!(Jwks::parse("{}"), Err("Jwks does not have [keys] field"));
        assert_eq!(
            Jwks::parse(r#"{"keys": 1}"#),
            Err("[keys] in Jwks is not an array")
        );
        assert_eq!(
            Jwks::parse(r#"{"keys": [{"kty": "RSA", "n": "!!", "e": "AQAB"}]}"#),
            Err("Jwks doesn't have any valid public key")
        );
        // An unusable key is skipped when another one is usable.
        let j = Jwks::parse(
            r#"{"keys": [{"kty": "XX"}, {"kty": "RSA", "kid": "a", "alg": "RS256", "n": "AQAB", "e": "AQAB"},
                {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}]}"#,
        )
        .expect("one usable key");
        assert_eq!(j.keys.len(), 1);
        assert_eq!(j.keys[0].kid, "a");
        assert_eq!(j.keys[0].alg, "RS256");
    }

    #[test]
    fn jwk_checks() {
        let one = |s: &str| {
            let v: Value = serde_json::from_str(s).expect("json");
            jwk(v.as_object().expect("object"))
        };
        assert_eq!(one(r#"{}"#), Err("[kty] is missing in [keys]"));
        assert_eq!(one(r#"{"kty": 1}"#), Err("[kty] is bad in [keys]"));
        assert_eq!(
            one(r#"{"kty": "RSA", "alg": "ES256", "n": "AQAB", "e": "AQAB"}"#),
            Err("[alg] is not started with [RS] or [PS] for an RSA key")
        );
        assert_eq!(
            one(r#"{"kty": "RSA", "e": "AQAB"}"#),
            Err("[n] field is missing for a RSA key")
        );
        let x32 = "A".repeat(43);
        assert!(matches!(
            one(&format!(r#"{{"kty": "EC", "x": "{x32}", "y": "{x32}"}}"#)),
            Ok(Jwk {
                key: JwkKey::Ec { p384: false, .. },
                ..
            })
        ));
        assert_eq!(
            one(&format!(
                r#"{{"kty": "EC", "alg": "ES384", "crv": "P-256", "x": "{x32}", "y": "{x32}"}}"#
            )),
            Err("[crv] field specified is not compatible with [alg] for an EC key")
        );
        assert_eq!(
            one(&format!(
                r#"{{"kty": "OKP", "crv": "Ed448", "x": "{x32}"}}"#
            )),
            Err("[crv] field is not supported for an OKP key")
        );
        assert!(one(&format!(
            r#"{{"kty": "OKP", "crv": "Ed25519", "x": "{x32}"}}"#
        ))
        .is_ok());
        assert!(one(r#"{"kty": "oct", "k": "c2VjcmV0"}"#).is_ok());
        assert_eq!(base64url_decode("AQAB=="), Some(vec![1, 0, 1]));
    }
}
