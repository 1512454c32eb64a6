//! `envoy.filters.http.header_mutation` -> [`HeaderMutationConfig`].
use std::sync::Arc;

use crate::api::envoy::config::common::mutation_rules::v3::{
    header_mutation::Action, HeaderMutation as Op,
};
use crate::api::envoy::extensions::filters::http::header_mutation::v3::{
    HeaderMutation, HeaderMutationPerRoute, Mutations as PbMutations,
};
use crate::config::{Command, FormatPart, HeaderMutationConfig, HeaderOp, Mutations};
use crate::error::{join, ConfigErrors};

use super::err;

pub const HEADER_MUTATION: &str = "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation";
pub const HEADER_MUTATION_PER_ROUTE: &str =
    "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute";

pub fn header_mutation(
    p: &HeaderMutation,
    path: &str,
) -> Result<HeaderMutationConfig, ConfigErrors> {
    Ok(HeaderMutationConfig {
        mutations: Arc::new(match &p.mutations {
            Some(m) => mutations(m, &join(path, "mutations"))?,
            None => Mutations::default(),
        }),
        most_specific_wins: p.most_specific_header_mutations_wins,
    })
}

pub fn per_route(p: &HeaderMutationPerRoute, path: &str) -> Result<Arc<Mutations>, ConfigErrors> {
    Ok(Arc::new(match &p.mutations {
        Some(m) => mutations(m, &join(path, "mutations"))?,
        None => Mutations::default(),
    }))
}

fn mutations(m: &PbMutations, path: &str) -> Result<Mutations, ConfigErrors> {
    let mut errs = ConfigErrors::default();
    let mut out = Mutations::default();
    for (list, field, request, dst) in [
        (
            &m.request_mutations,
            "request_mutations",
            true,
            &mut out.request,
        ),
        (
            &m.response_mutations,
            "response_mutations",
            false,
            &mut out.response,
        ),
    ] {
        for (i, op) in list.iter().enumerate() {
            match header_op(op, &format!("{}[{i}]", join(path, field)), request) {
                Ok(o) => dst.push(o),
                Err(e) => errs.extend(e),
            }
        }
    }
    errs.into_result(out)
}

pub(crate) fn header_op(op: &Op, path: &str, request: bool) -> Result<HeaderOp, ConfigErrors> {
    match &op.action {
        Some(Action::Remove(n)) => {
            let n = n.to_ascii_lowercase();
            if n.starts_with(':') || n == "host" {
                return Err(err(
                    join(path, "remove"),
                    format!("{n:?} cannot be removed"),
                ));
            }
            Ok(HeaderOp::Remove(super::header_name(
                &n,
                &join(path, "remove"),
            )?))
        }
        Some(Action::RemoveOnMatch(r)) => {
            let mpath = join(&join(path, "remove_on_match"), "key_matcher");
            let m = r
                .key_matcher
                .as_ref()
                .ok_or_else(|| err(&mpath, "key_matcher is required"))?;
            Ok(HeaderOp::RemoveOnMatch(super::string_matcher(m, &mpath)?))
        }
        Some(Action::Append(h)) => {
            let apath = join(path, "append");
            let a = super::header_add(h, &apath, request)?;
            for p in &a.value.parts {
                if let FormatPart::Op(o) = p {
                    let ok = super::set_filter_state::request_time(&o.cmd)
                        || (!request && matches!(o.cmd, Command::Resp(..) | Command::ResponseCode));
                    if !ok {
                        return Err(err(
                            join(&apath, "header.value"),
                            format!(
                                "format operator {:?} has no value when header_mutation runs",
                                o.cmd
                            ),
                        ));
                    }
                }
            }
            Ok(HeaderOp::Append(a))
        }
        None => Err(err(path, "an action is required")),
    }
}
