//! `{{NAME}}` placeholders in bootstraps and cases.
//!
//! Variables: `LISTENER_PORT`, `ADMIN_PORT` (per proxy), `UPSTREAM_A_PORT`,
//! `UPSTREAM_B_PORT`, `UPSTREAM_H2_PORT`, `CLOSED_PORT` (a port nothing
//! listens on), and `UPSTREAM_A` / `UPSTREAM_B` / `UPSTREAM_H2`
//! (`127.0.0.1:<port>`). One function: `{{REPEAT <n> <text>}}` expands to
//! `<text>` repeated `n` times (for oversized headers).
use std::collections::BTreeMap;

use anyhow::{anyhow, bail};

/// Placeholder values.
#[derive(Debug, Clone, Default)]
pub struct Vars(pub BTreeMap<String, String>);

impl Vars {
    pub fn set(&mut self, k: &str, v: impl ToString) -> &mut Self {
        self.0.insert(k.to_owned(), v.to_string());
        self
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }
}

/// Expands every `{{...}}` in `text`; unknown names are an error.
pub fn render(text: &str, vars: &Vars) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| anyhow!("unterminated {{{{ in {:?}", &rest[start..]))?;
        // The REPEAT text is taken verbatim (it may end in "\r\n").
        let expr = after[..end].trim_start();
        if let Some(args) = expr.strip_prefix("REPEAT ") {
            let (n, what) = args
                .split_once(' ')
                .ok_or_else(|| anyhow!("REPEAT needs a count and a text: {expr:?}"))?;
            let n: usize = n.parse().map_err(|_| anyhow!("bad REPEAT count {n:?}"))?;
            if n > 1 << 20 {
                bail!("REPEAT count {n} too large");
            }
            out.push_str(&what.repeat(n));
        } else {
            let expr = expr.trim_end();
            let v = vars
                .get(expr)
                .ok_or_else(|| anyhow!("unknown placeholder {{{{{expr}}}}}"))?;
            out.push_str(v);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let mut v = Vars::default();
        v.set("A", 1);
        assert_eq!(
            render("x{{A}}y{{ REPEAT 3 ab}}", &v).expect("render"),
            "x1yababab"
        );
        assert!(render("{{B}}", &v).is_err());
        assert!(render("{{A", &v).is_err());
    }
}
