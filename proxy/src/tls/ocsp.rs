//! OCSP stapling (`TlsCertificate.ocsp_staple`, `ocsp_staple_policy`), as
//! Envoy 1.40: the response is parsed once (Envoy's checks and words: one
//! successful basic response for exactly one certificate, whose serial
//! number is the certificate's), its signature is not checked (it comes
//! from configuration, as Envoy), and `nextUpdate` decides per handshake
//! whether it is still good (no `nextUpdate`: expired, as Envoy).

/// A parsed OCSP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OcspResponse {
    /// The serial number it is for (INTEGER content, leading zeros removed).
    pub serial: Vec<u8>,
    /// `nextUpdate`, seconds since the epoch.
    pub next_update: Option<i64>,
}

impl OcspResponse {
    /// Envoy's `isExpired`: no `nextUpdate`, or one in the past.
    pub fn is_expired(&self, now: i64) -> bool {
        self.next_update.is_none_or(|t| t < now)
    }

    /// Whether it is for the certificate with this serial (DER INTEGER
    /// content bytes).
    pub fn matches_serial(&self, serial: &[u8]) -> bool {
        self.serial == strip_zeros(serial)
    }
}

/// `id-pkix-ocsp-basic` (1.3.6.1.5.5.7.48.1.1).
const OID_BASIC: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, 0x01, 0x01];
/// `id-pe-tlsfeature` (1.3.6.1.5.5.7.1.24).
const OID_TLS_FEATURE: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x18];
/// The TLS feature extension value meaning must-staple (`status_request`).
const MUST_STAPLE_VALUE: &[u8] = &[0x30, 0x03, 0x02, 0x01, 0x05];

const SEQUENCE: u8 = 0x30;
const ENUMERATED: u8 = 0x0a;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const GENERALIZED_TIME: u8 = 0x18;

fn strip_zeros(b: &[u8]) -> Vec<u8> {
    let start = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b[start..].to_vec()
}

/// One DER element: (tag, content, rest). Definite lengths only.
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = buf.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    let (content, rest) = rest.split_at_checked(len)?;
    Some((tag, content, rest))
}

/// The next element must have `tag`.
fn expect<'a>(buf: &'a [u8], tag: u8, what: &str) -> Result<(&'a [u8], &'a [u8]), String> {
    match tlv(buf) {
        Some((t, c, rest)) if t == tag => Ok((c, rest)),
        _ => Err(what.to_owned()),
    }
}

/// The next element, if it has `tag`.
fn optional(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match tlv(buf) {
        Some((t, c, rest)) if t == tag => Some((c, rest)),
        _ => None,
    }
}

/// Parses a DER OCSPResponse with Envoy's checks (and error texts).
pub fn parse(der: &[u8]) -> Result<OcspResponse, String> {
    let (resp, rest) = expect(
        der,
        SEQUENCE,
        "OCSP Response is not a well-formed ASN.1 SEQUENCE",
    )?;
    if !rest.is_empty() {
        return Err("Data contained more than a single OCSP response".into());
    }
    let (status, body) = expect(
        resp,
        ENUMERATED,
        "OCSP ResponseStatus is not a well-formed ASN.1 ENUMERATED",
    )?;
    match status.first() {
        Some(0) => {}
        Some(1 | 2 | 3 | 5 | 6) => return Err("OCSP response was unsuccessful".into()),
        Some(n) => return Err(format!("Unknown OCSP Response Status variant: {n}")),
        None => return Err("OCSP ResponseStatus is not a well-formed ASN.1 ENUMERATED".into()),
    }
    let Some((bytes, _)) = optional(body, 0xa0) else {
        return Err("OCSP response has no body".into());
    };
    let (bytes, _) = expect(
        bytes,
        SEQUENCE,
        "OCSP ResponseBytes is not a well-formed SEQUENCE",
    )?;
    let (oid, rest) = expect(bytes, OID, "OCSP ResponseBytes has no response type")?;
    let (basic, _) = expect(
        rest,
        OCTET_STRING,
        "Expected ASN.1 OCTETSTRING for response",
    )?;
    if oid != OID_BASIC {
        return Err("Unknown OCSP Response type".into());
    }
    let (basic, _) = expect(
        basic,
        SEQUENCE,
        "OCSP BasicOCSPResponse is not a wellf-formed ASN.1 SEQUENCE",
    )?;
    let (data, _) = expect(
        basic,
        SEQUENCE,
        "OCSP ResponseData is not a well-formed ASN.1 SEQUENCE",
    )?;
    let mut data = data;
    if let Some((version, rest)) = optional(data, 0xa0) {
        let (v, _) = expect(
            version,
            INTEGER,
            "OCSP ResponseData version is not an INTEGER",
        )?;
        if !strip_zeros(v).is_empty() {
            return Err("OCSP ResponseData version is not supported".into());
        }
        data = rest;
    }
    data = match optional(data, 0xa1).or_else(|| optional(data, 0xa2)) {
        Some((_, rest)) => rest,
        None => return Err("Unknown choice for Responder ID".into()),
    };
    let (_, data) = expect(
        data,
        GENERALIZED_TIME,
        "OCSP producedAt is not a GeneralizedTime",
    )?;
    let (responses, _) = expect(data, SEQUENCE, "OCSP responses is not a SEQUENCE")?;
    let mut list = Vec::new();
    let mut rest = responses;
    while !rest.is_empty() {
        let (single, after) = expect(
            rest,
            SEQUENCE,
            "OCSP SingleResponse is not a well-formed ASN.1 SEQUENCE",
        )?;
        list.push(single_response(single)?);
        rest = after;
    }
    if list.len() != 1 {
        return Err("OCSP Response must be for one certificate only".into());
    }
    Ok(list.remove(0))
}

fn single_response(single: &[u8]) -> Result<OcspResponse, String> {
    let (cert_id, rest) = expect(
        single,
        SEQUENCE,
        "OCSP CertID is not a well-formed ASN.1 SEQUENCE",
    )?;
    let (_, id) = expect(cert_id, SEQUENCE, "OCSP CertID has no hash algorithm")?;
    let (_, id) = expect(id, OCTET_STRING, "OCSP CertID has no issuer name hash")?;
    let (_, id) = expect(id, OCTET_STRING, "OCSP CertID has no issuer key hash")?;
    let (serial, _) = expect(id, INTEGER, "OCSP CertID has no serial number")?;
    // CertStatus: good [0], revoked [1], unknown [2] (any is accepted).
    let rest = match tlv(rest) {
        Some((0x80 | 0xa1 | 0x82, _, rest)) => rest,
        Some((t, _, _)) => return Err(format!("Unknown OcspCertStatus tag: {t}")),
        None => return Err("OCSP SingleResponse has no certStatus".into()),
    };
    let (this_update, rest) = expect(
        rest,
        GENERALIZED_TIME,
        "OCSP thisUpdate is not a GeneralizedTime",
    )?;
    generalized_time(this_update).ok_or("OCSP thisUpdate is not a valid GeneralizedTime")?;
    let next_update = match optional(rest, 0xa0) {
        Some((t, _)) => {
            let (t, _) = expect(
                t,
                GENERALIZED_TIME,
                "OCSP nextUpdate is not a GeneralizedTime",
            )?;
            Some(generalized_time(t).ok_or("OCSP nextUpdate is not a valid GeneralizedTime")?)
        }
        None => None,
    };
    Ok(OcspResponse {
        serial: strip_zeros(serial),
        next_update,
    })
}

/// `YYYYMMDDHHMMSS[.fff]Z` to seconds since the epoch.
fn generalized_time(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    let s = s.strip_suffix('Z')?;
    let s = s.split('.').next()?;
    if s.len() != 14 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().ok();
    let (y, mo, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (h, mi, se) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se)
}

/// Whether a certificate carries the must-staple TLS feature extension
/// (RFC 7633), as Envoy checks it: exactly `status_request`.
pub fn is_must_staple(cert_der: &[u8]) -> bool {
    use x509_parser::prelude::*;
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else {
        return false;
    };
    cert.extensions()
        .iter()
        .any(|e| e.oid.as_bytes() == OID_TLS_FEATURE && e.value == MUST_STAPLE_VALUE)
}

/// The DER INTEGER content of a certificate's serial number.
pub fn cert_serial(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    Some(cert.raw_serial().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generalized_times() {
        assert_eq!(generalized_time(b"19700101000000Z"), Some(0));
        assert_eq!(generalized_time(b"20000301000000Z"), Some(951_868_800));
        assert_eq!(generalized_time(b"20240229120000.5Z"), Some(1_709_208_000));
        assert_eq!(generalized_time(b"2024022912Z"), None);
    }

    #[test]
    fn malformed_responses_are_errors() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0x30, 0x03, 0x0a, 0x01, 0x01])
            .expect_err("malformed")
            .contains("unsuccessful"));
        assert!(parse(&[0x30, 0x03, 0x0a, 0x01, 0x00])
            .expect_err("malformed")
            .contains("no body"));
        assert!(parse(&[0x30, 0x03, 0x0a, 0x01, 0x00, 0x00])
            .expect_err("malformed")
            .contains("more than a single"));
    }
}
